"""How a model is spread over processes: one strategy object per run owns the wrapping, the
skipped gradient reductions of early micro-steps, clipping, and gathering and loading state.

* :class:`Single` -- one process (also the base: everything is local).
* :class:`DDP` -- torchrun, every rank holds the whole model; gradients are all-reduced on the
  last micro-step of a step.
* :class:`FSDP` -- torchrun with ``parallelism='fsdp'``: each block and the root are sharded with
  FSDP2 (see fsdp.py); checkpoints are gathered whole to rank 0.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from . import dist
from .config import Section, setting
from .errors import ConfigError


@dataclass
class ParallelConfig(Section):
    """Several processes under torchrun."""

    backend: str = setting("auto", "torch.distributed backend under torchrun: 'auto' (nccl on CUDA, gloo otherwise), 'nccl' or 'gloo'.",
                           choices=("auto", "nccl", "gloo"))
    parallelism: str = setting("ddp", "Under torchrun: 'ddp' (every rank holds the whole model and optimizer state) or 'fsdp' (each block and the rest sharded over the ranks with FSDP2: about 1/world of the weights, gradients and optimizer state per rank; checkpoints are still written whole by rank 0).",
                               choices=("ddp", "fsdp"))
    dist_timeout: float = setting(600.0, "Seconds a collective may wait before the process group gives up (a dead rank cannot hang the others forever).",
                                  gt=0)


class Single:
    """One process: nothing to wrap, reduce or gather."""

    sharded = False

    def __init__(self, info: dist.DistInfo, device: str):
        self.info, self.device = info, device
        self.raw = self.model = None

    def describe(self) -> str:
        return "one process"

    def shard(self, raw: torch.nn.Module, dtype: str) -> None:
        """Called before the optimizer is built (it must hold the parameters as they will be)."""
        self.raw = raw

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the training step calls (``model`` may be compiled)."""
        self.model = model
        return model

    def no_sync(self):
        """For a micro-step that is not its step's last: skip the gradient reduction."""
        return nullcontext()

    def clip_grad_norm(self, params: list, max_norm: float) -> torch.Tensor:
        """The global gradient norm before clipping (clipped in place when max_norm is finite)."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def model_state(self) -> dict:
        """Full weights (rank 0 gets them; called on every rank)."""
        return self.raw.state_dict()

    def load_model_state(self, state: dict, strict: bool = True) -> None:
        """Full weights (as ``model_state`` gives them, read by every rank) back into the model;
        ``strict=False`` for part of them (a LoRA checkpoint's adapters)."""
        self.raw.load_state_dict(state, strict=strict)

    def optimizer_state(self, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def rank_states(self, mine: dict) -> list[dict] | None:
        """Every rank's random states (uint8 tensors), indexed by rank; None for one process."""
        return None


class DDP(Single):
    """torchrun, the whole model on every rank (DistributedDataParallel)."""

    def describe(self) -> str:
        return "DDP over %d processes" % self.info.world_size

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.info.local_rank] if self.device.startswith("cuda") else None
        self.model = DistributedDataParallel(model, device_ids=ids)
        return self.model

    def no_sync(self):
        return self.model.no_sync()

    def rank_states(self, mine: dict) -> list[dict]:
        return dist.gather_states(mine, self.info, self.device)


class FSDP(DDP):
    """torchrun with every block and the root sharded by FSDP2."""

    sharded = True

    def describe(self) -> str:
        return "FSDP2 over %d processes: each block and the root sharded" % self.info.world_size

    def shard(self, raw, dtype):
        from . import fsdp
        why = fsdp.unavailable()
        if why:
            raise ConfigError("parallelism='fsdp': %s; or use --parallelism=ddp" % why)
        fsdp.shard(raw, dtype)
        self.raw = raw

    def wrap(self, model):
        self.model = model  # the sharded modules do their own communication
        return model

    def no_sync(self):
        from . import fsdp
        return fsdp.no_sync(self.raw)

    def clip_grad_norm(self, params, max_norm):
        return super().clip_grad_norm(params, max_norm).full_tensor()  # a replicated DTensor

    def model_state(self):
        from . import fsdp
        return fsdp.full_model_state(self.raw)

    def load_model_state(self, state, strict=True):
        from . import fsdp
        fsdp.load_model_state(self.raw, state, strict)

    def optimizer_state(self, optimizer):
        from . import fsdp
        return fsdp.full_optimizer_state(self.raw, optimizer)

    def load_optimizer_state(self, optimizer, state):
        from . import fsdp
        fsdp.load_optimizer_state(self.raw, optimizer, state)  # every rank read the full state; each keeps its shards


def strategy_for(parallelism: str, info: dist.DistInfo, device: str, log=print) -> Single:
    if not info.enabled:
        if parallelism == "fsdp":
            log("fsdp: one process, nothing to shard; launch with torchrun to shard the model")
        return Single(info, device)
    return (FSDP if parallelism == "fsdp" else DDP)(info, device)
