"""Checkpoints: atomic writes, weights-only loading, every RNG state for exact resume.

A checkpoint is two files: ``ckpt.pt`` holds the weights, the model shape, the config and the
iteration (all that sampling, evaluation and export read), and ``ckpt.optim.pt`` beside it holds
the optimizer, grad-scaler and random states that only a resumed run needs. Both carry the same
``save_id``, so a resume never pairs weights with the optimizer state of another save.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

from .config import UserError

FORMAT = 2  # 1: optimizer state inside ckpt.pt (still read)
REQUIRED = ("model", "model_args", "iter_num")
NUMBERED = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(UserError):
    pass


def save(obj: dict, path: str) -> None:
    """Write to a temp file beside ``path``, flush it to disk, then rename over ``path``: an
    interrupted save leaves the previous checkpoint intact."""
    tmp = "%s.tmp%d" % (path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def optimizer_path(path: str) -> str:
    """``out/ckpt.pt`` -> ``out/ckpt.optim.pt``."""
    return path[:-3] + ".optim.pt" if path.endswith(".pt") else path + ".optim"


def save_pair(weights: dict, train_state: dict, path: str, keep_last_k: int = 0) -> None:
    """Write the optimizer file, then the weights file (each atomically), tagged with one id.
    With ``keep_last_k`` > 0 also keep ``ckpt_{iter}.pt`` copies (hard links where the file system
    allows), the oldest pruned beyond k."""
    save_id = os.urandom(8).hex()
    save(dict(train_state, save_id=save_id, iter_num=weights["iter_num"]), optimizer_path(path))
    save(dict(weights, save_id=save_id), path)
    if keep_last_k > 0:
        folder = os.path.dirname(path) or "."
        numbered = os.path.join(folder, "ckpt_%d.pt" % weights["iter_num"])
        for src, dst in ((path, numbered), (optimizer_path(path), optimizer_path(numbered))):
            _link_or_copy(src, dst)
        prune(folder, keep_last_k)


def _link_or_copy(src: str, dst: str) -> None:
    tmp = "%s.tmp%d" % (dst, os.getpid())
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network or FAT file systems): copy
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def numbered_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(iter, path) of every ``ckpt_{iter}.pt`` in folder, oldest first."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = NUMBERED.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def prune(folder: str, keep: int) -> None:
    for _, path in numbered_checkpoints(folder)[:-keep]:
        for p in (path, optimizer_path(path)):
            if os.path.exists(p):
                os.remove(p)


def load_train_state(path: str, ckpt: dict) -> dict:
    """The optimizer/scaler/RNG state that belongs to the weights ``ckpt`` loaded from ``path``."""
    if "optimizer" in ckpt:  # format 1: everything in one file
        return {k: ckpt[k] for k in ("optimizer", "scaler", "rng") if k in ckpt}
    opath = optimizer_path(path)
    if not os.path.isfile(opath):
        raise CheckpointError("%s has no optimizer state beside it (%s is missing); restore that file to resume, "
                              "or start a new run from scratch" % (path, os.path.basename(opath)))
    state = _torch_load(opath)
    if not isinstance(state, dict) or state.get("save_id") != ckpt.get("save_id"):
        raise CheckpointError("%s belongs to another save than %s (iter %s vs %s); restore the matching pair to resume"
                              % (opath, path, state.get("iter_num") if isinstance(state, dict) else "?", ckpt["iter_num"]))
    return state


def _torch_load(path: str, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError("checkpoint %s is truncated or corrupt (%s); restore a good copy or start again with --init_from=scratch"
                              % (path, str(e).splitlines()[0][:120] if str(e) else type(e).__name__)) from None


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError("no checkpoint at %s: train into that out_dir first, or set --init_from=scratch" % path)
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise CheckpointError("%s is not a training checkpoint (missing %s)" % (path, ", ".join(k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt)))
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def clean_state_dict(sd: dict) -> dict:
    """Drop wrapper prefixes (torch.compile's _orig_mod., DDP's module.) from older files."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_error_line(e: RuntimeError) -> str:
    """The informative line of load_state_dict's error: the first size mismatch or missing key."""
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
    return next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else str(e))


def load_model(path: str, dropout: float = 0.0):
    """The model stored in a training checkpoint, and the checkpoint itself."""
    from .model import GPT, GPTConfig
    ckpt = load(path)
    margs = dict(ckpt["model_args"], dropout=dropout)
    model = GPT(GPTConfig(**margs))
    try:
        got = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise CheckpointError("weights in %s do not fit the model: %s" % (path, load_error_line(e))) from None
    if got.missing_keys or got.unexpected_keys:
        raise CheckpointError("weights in %s do not fit the model: missing %s; unexpected %s" % (
            path, ", ".join(got.missing_keys[:3]) or "none", ", ".join(got.unexpected_keys[:3]) or "none"))
    return model, ckpt
