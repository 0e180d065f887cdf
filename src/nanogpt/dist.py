"""Distributed runtime: torchrun environment, process group, rank-aware helpers.

Every rank runs the same loop and must call the same collectives in the same order: gradient
all-reduces inside backward (all but the last micro-step skip them), the loss average at each
evaluation, and the stop checks at log steps. A rank that dies or hangs makes the next collective
on the others fail (or time out after ``dist_timeout``); :func:`peer_failures` turns that into
one line instead of a hang or a page of traceback.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError, PeerError


@dataclass
class DistInfo:
    enabled: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return int(os.environ.get("RANK", "-1")) != -1 and "WORLD_SIZE" in os.environ


def world_size_from_env() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1


def init(device: str, backend: str = "auto", timeout_s: float = 600.0) -> tuple[DistInfo, str]:
    """Start the process group when launched by torchrun. Returns (info, device for this rank)."""
    if not under_torchrun():
        return DistInfo(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ["WORLD_SIZE"])
    kind = device.split(":")[0]
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError("LOCAL_RANK %d but only %d CUDA device(s); lower --nproc_per_node" % (local_rank, torch.cuda.device_count()))
        device = "cuda:%d" % local_rank
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if kind == "cuda" else "gloo"
    if backend == "nccl" and kind != "cuda":
        raise ConfigError("backend='nccl' needs device='cuda'; use --backend=gloo on %s" % kind)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": torch.device(device)} if kind == "cuda" else {}))
    return DistInfo(True, rank, local_rank, world), device


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # The DDP wrapper sits in reference cycles of the training loop's closures. Left for the
        # interpreter's exit, its teardown aborts the process ("terminate called without an
        # active exception") in about one gloo run in six; freed here, while the group lives, never.
        gc.collect()
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world_size
    return x


def any_rank(flag: bool, info: DistInfo, device: str) -> bool:
    """True on every rank when it is true on any rank (e.g. one of them caught SIGTERM)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def any_ranks(flags: list[bool], info: DistInfo, device: str) -> list[bool]:
    """Each flag true on every rank when it is true on any rank: one collective for all of them."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def earliest_over_ranks(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """For an integer ``x`` where -1 means "not yet": the smallest non-negative value over all
    ranks, or -1 when no rank has one (a copy; ``x`` is left as it was)."""
    if not info.enabled:
        return x.clone()
    never = torch.iinfo(x.dtype).max
    y = torch.where(x < 0, torch.full_like(x, never), x)
    dist.all_reduce(y, op=dist.ReduceOp.MIN)
    return torch.where(y == never, torch.full_like(y, -1), y)


# how a lost or silent peer reads in a failed collective (gloo raises plain RuntimeErrors)
_PEER_WORDS = re.compile(r"connection (reset|closed|refused)|closed by peer|broken pipe|timed out|timeout", re.I)


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because of another rank, not a bug on this one."""
    network = tuple(t for t in (getattr(dist, "DistNetworkError", None), getattr(dist, "DistStoreError", None)) if t)
    if network and isinstance(e, network):
        return True
    return isinstance(e, RuntimeError) and bool(_PEER_WORDS.search(str(e)))


def _first_sentence(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # gloo's [file.cc:line] prefix
    line = line.split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def peer_failures(info: DistInfo, out_dir: str):
    """Inside a distributed run, a collective that fails because of another rank becomes a
    :class:`PeerError` naming this rank and saying what was kept; anything else passes through.

    From then on this process ignores SIGTERM: torchrun sends it to the surviving ranks as soon as
    one dies, and it would otherwise cut the error line short; the process is on its way out."""
    try:
        yield
    except RuntimeError as e:
        if not info.enabled or not lost_peer(e):
            raise
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ckpt = os.path.join(out_dir, "ckpt.pt")
        kept = ("%s is left as it was (resume with --init_from=resume)" % ckpt if os.path.exists(ckpt)
                else "no checkpoint had been written")
        raise PeerError("rank %d of %d lost contact with the other processes (%s): another rank died, hung or was "
                        "stopped (its own output and torchrun's summary name it); %s"
                        % (info.rank, info.world_size, _first_sentence(str(e)), kept)) from e


def gather_states(states: dict, info: DistInfo, device: str) -> list[dict] | None:
    """Every rank's ``states`` (a dict of uint8 tensors of equal shapes on all ranks, such as RNG
    states), as a list indexed by rank; one all-gather per entry. Without a process group: [states]."""
    if not info.enabled:
        return [states]
    out = [dict() for _ in range(info.world_size)]
    for k, t in states.items():
        local = t.to(device)
        parts = [torch.empty_like(local) for _ in range(info.world_size)]
        dist.all_gather(parts, local)
        for r, part in enumerate(parts):
            out[r][k] = part.cpu()
    return out
