"""Checkpoints: atomic writes, weights-only loading, every RNG state for exact resume."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from .config import UserError

FORMAT = 1
REQUIRED = ("model", "model_args", "iter_num")


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


def load(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError("no checkpoint at %s: train into that out_dir first, or set --init_from=scratch" % path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError("checkpoint %s is truncated or corrupt (%s); restore a good copy or start again with --init_from=scratch"
                              % (path, str(e).splitlines()[0][:120] if str(e) else type(e).__name__)) from None
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


def load_model(path: str, dropout: float = 0.0):
    """The model stored in a training checkpoint, and the checkpoint itself."""
    from .model import GPT, GPTConfig
    ckpt = load(path)
    margs = dict(ckpt["model_args"], dropout=dropout)
    model = GPT(GPTConfig(**margs))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError("weights in %s do not fit the model: %s" % (path, str(e).splitlines()[0])) from None
    return model, ckpt
