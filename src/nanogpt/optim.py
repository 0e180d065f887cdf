"""Optimizer factory: parameter groups (decay only on matrices and embeddings) and the
optimizer chosen by name."""

from __future__ import annotations

import inspect

import torch

from .config import ConfigError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, name: str, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], device_type: str) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        extra = {}
        if device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
            extra["fused"] = True  # one kernel for all parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
    raise ConfigError("unknown optimizer %r; choose 'adamw'" % name)


def describe(groups: list[dict]) -> str:
    n = [sum(p.numel() for p in g["params"]) for g in groups]
    return "optimizer: %d decayed tensors (%s parameters), %d not decayed (%s parameters)" % (
        len(groups[0]["params"]), f"{n[0]:,}", len(groups[1]["params"]), f"{n[1]:,}")
