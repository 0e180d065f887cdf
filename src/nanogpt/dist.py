"""Distributed runtime: torchrun environment, process group, rank-aware helpers."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


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


def max_over_ranks(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise maximum of ``x`` over all ranks (a copy; ``x`` is left as it was)."""
    x = x.clone()
    if info.enabled:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x
