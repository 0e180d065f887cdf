"""Fully sharded data parallel training (``--parallelism=fsdp``), with PyTorch's FSDP2.

Every rank holds 1/world of each parameter, of its gradient and of its optimizer state, as
DTensors sharded on dim 0. Each Transformer block is one unit: its weights are all-gathered just
before it runs (forward and backward) and freed after, and its gradients are reduce-scattered
back to their shards. The root unit holds the rest: token and position embeddings, the final
LayerNorm and the head, whose weight is the embedding's (tied, so sharded once).

Checkpoints are gathered to rank 0 and written exactly as one process writes them (full
tensors, optimizer state keyed by parameter index), so ``sample.py``, a single-process resume
or a DDP resume read them as they are; an FSDP resume shards them again on load.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import chain

import torch
import torch.distributed as dist

from .runtime import PTDTYPE


def _api():
    """(fully_shard, MixedPrecisionPolicy): public since torch 2.6, private before."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def unavailable() -> str | None:
    """Why FSDP2 cannot run with this torch, or None when it can."""
    if not dist.is_available():
        return "this torch is built without torch.distributed"
    try:
        _api()
        import torch.distributed.checkpoint.state_dict  # noqa: F401
    except ImportError as e:
        return "this torch has no FSDP2 (fully_shard): %s; upgrade to torch>=2.6" % e
    return None


def shard(model: torch.nn.Module, dtype: str = "float32") -> torch.nn.Module:
    """Shard ``model`` (a GPT) in place over the default process group: one unit per block and
    the root. Rank 0's weights are broadcast first, so every rank shards the same model (each
    rank initialised its own from its own seed). ``dtype`` 'bfloat16'/'float16' runs forward and
    backward in that dtype, all-gathering half-size weights, while the shards, gradients and
    their reduction stay float32."""
    fully_shard, MixedPrecisionPolicy = _api()
    with torch.no_grad():
        for t in chain(model.parameters(), model.buffers()):  # a tied weight is listed once
            dist.broadcast(t, src=0)
    kw = {"mesh": mesh_for(model)}
    if dtype != "float32":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=PTDTYPE[dtype], reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, **kw)
    fully_shard(model, **kw)  # the root: embeddings, ln_f and the tied head, in one unit
    return model


def mesh_for(model: torch.nn.Module):
    """A one-dimensional mesh of all ranks on the model's device type. Named explicitly because
    fully_shard's default is a CUDA mesh whenever CUDA exists, even for a CPU run."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))


@contextmanager
def no_sync(model: torch.nn.Module):
    """Inside: backward accumulates full (unsharded) gradients without reduce-scattering them,
    for all but the last micro-step of a step. This trades one full gradient buffer per rank (as
    DDP keeps) for one reduce-scatter per step instead of one per micro-step."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (a collective: every rank must call it); other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict:
    """The model's full state dict on CPU, the same keys and shapes as ``model.state_dict()`` of
    an unsharded model, on rank 0 (other ranks get an empty dict). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options())


def load_model_state(model: torch.nn.Module, state: dict, strict: bool = True) -> None:
    """Full weights, read by every rank, into the sharded model: each rank keeps its shards
    (``strict=False``: some of them, e.g. LoRA adapters)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def _fqns(model: torch.nn.Module, optimizer) -> list[str]:
    """The name of each parameter of ``optimizer``, in the order ``optimizer.state_dict()``
    numbers them."""
    names = {p: n for n, p in model.named_parameters()}
    return [names[p] for p in chain.from_iterable(g["params"] for g in optimizer.param_groups)]


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's full state dict on CPU, in the layout one process's
    ``optimizer.state_dict()`` has (parameters numbered, not named), on rank 0 (other ranks get an
    empty dict). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    named = get_optimizer_state_dict(model, optimizer, options=_options())
    if not named:
        return {}
    index = {n: i for i, n in enumerate(_fqns(model, optimizer))}
    return {"state": {index[n]: v for n, v in named["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in named["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Load a full optimizer state dict (as ``full_optimizer_state`` or one process writes it),
    which every rank has read, into the sharded optimizer: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _fqns(model, optimizer)
    groups = state["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(h["params"]) for g, h in zip(groups, optimizer.param_groups)):
        raise ValueError("the saved optimizer has %s parameters per group, this one %s"
                         % ([len(g["params"]) for g in groups], [len(h["params"]) for h in optimizer.param_groups]))
    named = {"state": {names[i]: v for i, v in state["state"].items()},
             "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in groups]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
