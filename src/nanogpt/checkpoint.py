"""Checkpoints: a save committed as one unit, weights-only loading, and one run per out_dir.

A checkpoint is two files. ``ckpt.pt`` holds the weights, the model shape, the config and the
iteration (all that sampling, evaluation and export read) and names its optimizer file,
``ckpt.optim.<save_id>.pt``, which holds the optimizer, grad-scaler and random states that only a
resumed run needs. A save writes the new optimizer file under its own name, then renames the
new ``ckpt.pt`` over the old one (the commit), then removes the optimizer file nobody names any
more. A crash at any point leaves ``ckpt.pt`` whole, old or new, beside the optimizer file it
names; the next run into the folder removes what the crash left behind. A LoRA run's
``ckpt.pt`` holds only the adapters as its weights, and ``lora``: the settings and a reference
to the base weights (lora.py); the commit is the same.

With ``checkpoint_format='safetensors'`` the weights go into a third file of the same save,
``ckpt.model.<save_id>.safetensors`` (with the model shape in its metadata), written before the
commit like the optimizer file; ``ckpt.pt`` then names both and holds no tensor. Such weights load
with ``safetensors`` alone, no pickle machinery at all.

Every file is written to a temporary name, flushed to disk and renamed. The ``.pt`` files load
with ``torch.load(weights_only=True)``: no pickle is ever executed. Older layouts still load: one
file with the optimizer inside (format 1) and ``ckpt.optim.pt`` beside ``ckpt.pt`` (format 2).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
from dataclasses import dataclass

import numpy as np
import torch

from .config import Section, setting
from .errors import CheckpointError, ConfigError, first_line

FORMAT = 3  # 1: optimizer inside ckpt.pt; 2: ckpt.optim.pt beside it (both still read)
REQUIRED = ("model", "model_args", "iter_num")
NUMBERED = re.compile(r"^ckpt_(\d+)\.pt$")
OPTIM = re.compile(r"^ckpt(_\d+)?\.optim(\.[0-9a-f]+)?\.pt$")
WEIGHTS = re.compile(r"^ckpt\.model\.[0-9a-f]+\.safetensors$")
TEMP = re.compile(r"^(ckpt.*\.(pt|safetensors)|metrics\.jsonl)\.tmp\d+$")
FORMATS = ("torch", "safetensors")
LOCK = ".lock"


@dataclass
class CheckpointConfig(Section):
    """Where a run writes, and when it saves."""

    out_dir: str = setting("out", "Folder for ckpt.pt and logs.", path="out")
    always_save_checkpoint: bool = setting(True, "Save at every evaluation, not only when val loss improves; also save on Ctrl-C/SIGTERM.")
    keep_last_k: int = setting(0, "Also keep the last k checkpoints as ckpt_{iter}.pt (hard links where possible), pruning older ones; 0 keeps only ckpt.pt.",
                               ge=0)
    checkpoint_interval_s: float = setting(0.0, "Also save when this many seconds of wall time have passed since the last save (for pre-emptible machines); 0 saves at evaluations only.",
                                           ge=0)
    overwrite: bool = setting(False, "Let a new run (init_from other than 'resume') replace the checkpoint and metrics already in out_dir.")
    checkpoint_format: str = setting("torch", "How ckpt.pt keeps the weights: 'torch' (inside it, as nanoGPT does) or 'safetensors' (in ckpt.model.<id>.safetensors beside it, loadable with no pickle machinery).",
                                     choices=FORMATS)


# --------------------------------------------------------------------------------------------
# writing: each step can be interrupted, and the folder stays usable

_fault = None  # tests: a function called with the name of each step of a save, after it is done


def _step(name: str) -> None:
    if _fault is not None:
        _fault(name)


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are durable enough
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tensor_bytes(obj) -> int:
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _no_space(folder: str, need: int) -> CheckpointError:
    free = shutil.disk_usage(folder).free
    if os.path.exists(os.path.join(folder, "ckpt.pt")):
        todo = "the previous checkpoint is intact: free some space (or lower keep_last_k) and resume with --init_from=resume"
    else:
        todo = "no checkpoint was written: free some space or choose another --out_dir"
    return CheckpointError("no room in %s to save the checkpoint: it needs about %s bytes and %s are free; %s"
                           % (folder, f"{need:,}", f"{free:,}", todo))


def save(obj: dict, path: str, name: str = "file", write=None) -> None:
    """Write ``obj`` to a temp file beside ``path``, flush it to disk, then rename it over
    ``path``: an interrupted save leaves the previous file intact and no temp file behind.
    ``write(obj, f)`` writes the bytes (default: ``torch.save``)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = "%s.tmp%d" % (path, os.getpid())
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        _step("write " + name)
        os.replace(tmp, path)
        _fsync_dir(folder)
        _step("rename " + name)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _no_space(folder, _tensor_bytes(obj)) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def optim_name(save_id: str) -> str:
    return "ckpt.optim.%s.pt" % save_id


def optimizer_path(path: str) -> str:
    """Format 2's optimizer file: ``out/ckpt.pt`` -> ``out/ckpt.optim.pt``."""
    return path[:-3] + ".optim.pt" if path.endswith(".pt") else path + ".optim"


def model_name(save_id: str) -> str:
    return "ckpt.model.%s.safetensors" % save_id


def _write_safetensors(weights: dict, f) -> None:
    """The weights and, in the metadata, the model shape and iteration. A tensor shared by two
    names (GPT-2's tied embedding and head) is written once; the metadata names its aliases."""
    try:
        from safetensors.torch import save as to_bytes
    except ImportError:
        raise CheckpointError("checkpoint_format='safetensors' needs safetensors: pip install safetensors") from None
    tensors, aliases, seen = {}, {}, {}
    for k, t in weights["model"].items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            tensors[k] = t.detach().contiguous()
    meta = {"model_args": json.dumps(weights["model_args"]), "iter_num": str(weights["iter_num"]), "aliases": json.dumps(aliases)}
    f.write(to_bytes(tensors, metadata=meta))


def load_safetensors_weights(path: str) -> dict:
    """The state dict of a ``ckpt.model.<id>.safetensors`` file, its aliases restored."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError("%s holds safetensors weights: pip install safetensors" % path) from None
    try:
        with safe_open(path, framework="pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as e:
        raise CheckpointError("weights file %s is truncated or corrupt (%s); restore a good copy or start again with "
                              "--init_from=scratch" % (path, first_line(e, 120))) from None
    for name, target in aliases.items():
        sd[name] = sd[target]
    return sd


def save_pair(weights: dict, train_state: dict, path: str, keep_last_k: int = 0, fmt: str = "torch") -> str:
    """Commit one checkpoint: the optimizer file (and with ``fmt='safetensors'`` the weights file)
    under a new name, then ``path`` naming them (the commit), then the numbered copy
    (``keep_last_k``) and the removal of what no file names any more. Returns the save id."""
    folder = os.path.dirname(os.path.abspath(path))
    need = int(1.02 * (_tensor_bytes(weights) + _tensor_bytes(train_state))) + (64 << 10)  # tensors and the pickled rest
    if shutil.disk_usage(folder).free < need:
        raise _no_space(folder, need)
    save_id = os.urandom(8).hex()
    opt = optim_name(save_id)
    save(dict(train_state, save_id=save_id, iter_num=weights["iter_num"]), os.path.join(folder, opt), "optimizer state")
    head = dict(weights, format=FORMAT, save_id=save_id, optim_file=opt)
    if fmt == "safetensors":
        head["model_file"] = model_name(save_id)
        save(weights, os.path.join(folder, head["model_file"]), "weights file", write=_write_safetensors)
        head["model"] = {}
    save(head, path, "weights")
    if keep_last_k > 0:
        numbered = os.path.join(folder, "ckpt_%d.pt" % weights["iter_num"])
        _link_or_copy(path, numbered)
        _step("link numbered")
        for _, old in numbered_checkpoints(folder)[:-keep_last_k]:
            os.remove(old)
            _step("remove numbered")
    remove_unreferenced(folder)
    return save_id


def _link_or_copy(src: str, dst: str) -> None:
    tmp = "%s.tmp%d" % (dst, os.getpid())
    try:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links here (some network or FAT file systems): copy
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def numbered_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(iter, path) of every ``ckpt_{iter}.pt`` in folder, oldest first."""
    found = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = NUMBERED.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found)


def _references(path: str) -> set[str]:
    """The files a weights file names: its optimizer file (format 2: the pair's name; none for
    format 1) and its safetensors weights, read without loading the weights."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    named = {ckpt["model_file"]} if "model_file" in ckpt else set()
    if "optim_file" in ckpt:
        return named | {ckpt["optim_file"]}
    return named if "optimizer" in ckpt else named | {os.path.basename(optimizer_path(path))}


def remove_unreferenced(folder: str) -> list[str]:
    """Remove optimizer and safetensors files no weights file names (a save cut short, pruned
    copies) and temp files of interrupted writes. Nothing is removed while a weights file cannot
    be read. Returns the names removed."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    removed = [n for n in names if TEMP.match(n)]
    weights = [n for n in names if n == "ckpt.pt" or NUMBERED.match(n)]
    try:
        named = set().union(*(_references(os.path.join(folder, n)) for n in weights))
    except Exception:  # a corrupt weights file: it may name any of them, so keep them all
        named = None
    if named is not None:
        removed += [n for n in names if (OPTIM.match(n) or WEIGHTS.match(n)) and n not in named]
    for n in removed:
        try:
            os.remove(os.path.join(folder, n))
        except FileNotFoundError:
            pass
        _step("remove " + n)
    return removed


def has_checkpoint(folder: str) -> bool:
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return any(n == "ckpt.pt" or NUMBERED.match(n) for n in names)


def remove_run(folder: str) -> None:
    """Remove a run's checkpoints and metrics from ``folder`` (``overwrite=True``)."""
    for n in os.listdir(folder):
        if n in ("ckpt.pt", "metrics.jsonl") or NUMBERED.match(n) or OPTIM.match(n) or WEIGHTS.match(n) or TEMP.match(n):
            os.remove(os.path.join(folder, n))


# --------------------------------------------------------------------------------------------
# one run per out_dir


class RunLock:
    """``out_dir/.lock``, held for the whole run: a second run into the same folder refuses with
    one line naming the holder. The lock is the operating system's (flock, or msvcrt on
    Windows), so a process that died released it and the next run takes it over. A folder this
    run created is removed again when the run fails before writing anything into it."""

    def __init__(self, folder: str):
        self.folder = folder
        self.created = not os.path.exists(folder)
        self.path = os.path.join(folder, LOCK)
        self.file = None

    def acquire(self) -> "RunLock":
        try:
            os.makedirs(self.folder, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as e:
            raise ConfigError("out_dir %r is not writable (%s); choose another --out_dir" % (self.folder, e.strerror or e)) from None
        if not _try_lock(self.file):
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            self.file = None
            raise CheckpointError("out_dir %s is in use by another run (%s); wait for it to finish, stop it, or choose "
                                  "another --out_dir" % (self.folder, holder))
        self.file.seek(0)
        self.file.truncate()
        self.file.write("pid %d on %s" % (os.getpid(), socket.gethostname()))
        self.file.flush()
        return self

    def release(self, failed: bool = False) -> None:
        if self.file is None:
            return
        self.file.close()  # closing the file releases the lock
        self.file = None
        try:
            os.remove(self.path)
        except OSError:
            pass
        if failed and self.created:
            try:
                os.rmdir(self.folder)  # only when empty: nothing of the run is lost
            except OSError:
                pass


def _try_lock(f) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a file system without flock (some network mounts): nothing to enforce
        return True


# --------------------------------------------------------------------------------------------
# reading


def _torch_load(path: str, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError("checkpoint %s is truncated or corrupt (%s); restore a good copy or start again with --init_from=scratch"
                              % (path, first_line(e, 120))) from None


def load(path: str, map_location="cpu", hint: str = "train into that out_dir first, or set --init_from=scratch") -> dict:
    """A weights file, checked: its fields, its model_args and every tensor (no nan/inf)."""
    if os.path.isdir(path):
        raise CheckpointError("%s is a folder, not a checkpoint file" % path)
    if not os.path.isfile(path):
        raise CheckpointError("no checkpoint at %s: %s" % (path, hint))
    ckpt = _torch_load(path, map_location)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_file"), str):  # checkpoint_format='safetensors'
        wpath = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(ckpt["model_file"]))
        if not os.path.isfile(wpath):
            raise CheckpointError("%s names its weights file %s, which is missing; restore it, or start again with "
                                  "--init_from=scratch" % (path, os.path.basename(wpath)))
        ckpt["model"] = load_safetensors_weights(wpath)
        if map_location not in (None, "cpu"):
            ckpt["model"] = {k: v.to(map_location) for k, v in ckpt["model"].items()}
    missing = [k for k in REQUIRED if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError("%s is not a training checkpoint (missing %s)" % (path, ", ".join(missing)))
    if not isinstance(ckpt["model"], dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in ckpt["model"].items()):
        raise CheckpointError("%s: 'model' must map weight names to tensors; restore a good copy" % path)
    if not isinstance(ckpt["model_args"], dict):
        raise CheckpointError("%s: 'model_args' must be a dict; restore a good copy" % path)
    if not isinstance(ckpt["iter_num"], int) or ckpt["iter_num"] < 0:
        raise CheckpointError("%s: 'iter_num' must be a non-negative integer, got %r" % (path, ckpt["iter_num"]))
    ckpt["model"] = clean_state_dict(ckpt["model"])
    check_finite(ckpt["model"], path)
    return ckpt


def check_finite(state: dict, where: str) -> None:
    """Refuse weights holding nan or inf, naming the first such tensor."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError("weights in %s hold nan/inf in %s; they cannot be used: restore an earlier checkpoint "
                                  "(keep_last_k keeps ckpt_{iter}.pt copies) or retrain" % (where, name))


def load_train_state(path: str, ckpt: dict) -> dict:
    """The optimizer/scaler/RNG state that belongs to the weights ``ckpt`` loaded from ``path``."""
    if "optimizer" in ckpt:  # format 1: everything in one file
        return {k: ckpt[k] for k in ("optimizer", "scaler", "rng") if k in ckpt}
    opath = os.path.join(os.path.dirname(os.path.abspath(path)), ckpt["optim_file"]) if "optim_file" in ckpt \
        else optimizer_path(path)
    if not os.path.isfile(opath):
        raise CheckpointError("%s has no optimizer state beside it (%s is missing); restore that file to resume, "
                              "or start a new run from scratch" % (path, os.path.basename(opath)))
    state = _torch_load(opath)
    if not isinstance(state, dict) or state.get("save_id") != ckpt.get("save_id"):
        raise CheckpointError("%s belongs to another save than %s (iter %s vs %s); restore the matching pair to resume"
                              % (opath, path, state.get("iter_num") if isinstance(state, dict) else "?", ckpt["iter_num"]))
    return state


def clean_state_dict(sd: dict) -> dict:
    """Drop wrapper prefixes (torch.compile's _orig_mod., DDP's module.) from older files."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_error_line(e: RuntimeError) -> str:
    """The informative line of load_state_dict's error: the first size mismatch or missing key."""
    lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
    return next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else str(e))


def model_config(ckpt: dict, path: str, dropout: float = 0.0):
    """The GPTConfig of a checkpoint's model_args (each key and value checked)."""
    from .model import GPTConfig
    try:
        return GPTConfig.from_args(ckpt["model_args"], dropout=dropout)
    except (ConfigError, TypeError) as e:
        raise CheckpointError("model_args in %s: %s; the checkpoint is from another version or damaged" % (path, e)) from None


def load_model(path: str, dropout: float = 0.0, hint: str | None = None):
    """The model stored in a training checkpoint, and the checkpoint itself. A LoRA checkpoint
    gives its base with the adapters on (see lora.py)."""
    from .model import GPT
    ckpt = load(path, hint=hint) if hint else load(path)
    if "lora" in ckpt:  # adapters only: the base comes from the reference it holds
        from . import lora
        model_config(ckpt, path, dropout)
        return lora.load_model(ckpt, path, dropout), ckpt
    model = GPT(model_config(ckpt, path, dropout))
    try:
        got = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise CheckpointError("weights in %s do not fit the model: %s" % (path, load_error_line(e))) from None
    if got.missing_keys or got.unexpected_keys:
        raise CheckpointError("weights in %s do not fit the model: missing %s; unexpected %s" % (
            path, ", ".join(got.missing_keys[:3]) or "none", ", ".join(got.unexpected_keys[:3]) or "none"))
    return model, ckpt


def load_for_inference(init_from: str, out_dir: str, dropout: float | None = 0.0):
    """(model, the training run's config or None) for sample, eval and export: ``out_dir``'s
    checkpoint (``init_from='resume'``; a LoRA one with its adapters merged), else GPT-2 weights
    by name or from a local folder.
    ``dropout=None`` keeps the dropout the weights were trained (or published) with."""
    if init_from == "resume":
        path = os.path.join(out_dir, "ckpt.pt")
        hint = "train into that out_dir first, or pass --init_from=gpt2 (or a Hugging Face folder)"
        if dropout is None:
            dropout = load(path, hint=hint)["model_args"].get("dropout", 0.0)
        model, ckpt = load_model(path, dropout=dropout, hint=hint)
        if "lora" in ckpt:
            from . import lora
            lora.merge(model)  # one matrix per layer again: the same outputs, and faster
        return model, ckpt.get("config") or {}
    from .hf import load_pretrained
    try:
        return load_pretrained(init_from, dropout=dropout), None
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError("cannot load %s: %s" % (init_from, first_line(e))) from None


# --------------------------------------------------------------------------------------------
# random states


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
