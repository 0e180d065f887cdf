"""The language-model loss without the full logits: the output layer and cross-entropy a chunk
of positions at a time (``loss_chunk``). With GPT-2's 50,304-entry vocabulary the (B*T, V) logits
of a 12 x 1024 batch are 2.4 GB in float32; in chunks of 1024 positions they are 0.2 GB."""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from .runtime import autocast_dtype


class _ChunkedLMLoss(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight^T against targets, one chunk of rows at a time:
    the (N, V) logits never exist at once, only (chunk, V). The gradients are computed on the way
    (softmax minus one-hot, times weight or x), so backward only scales them."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int):
        # x (N, C), weight (V, C), targets (N,) with -1 = ignored
        dev = x.device.type
        amp = torch.is_autocast_enabled(dev)
        dt = autocast_dtype(dev, weight.dtype)  # the matmuls' dtype, as lm_head would use
        if dt == torch.float16:
            dt = torch.float32  # gradients are formed here, before any loss scaling: float16 would underflow
        count = (targets != -1).sum().clamp(min=1).float()
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        with torch.autocast(dev, enabled=False) if amp else contextlib.nullcontext():
            w = weight.to(dt)
            for s in range(0, x.size(0), chunk):
                xc, tc = x[s:s + chunk].to(dt), targets[s:s + chunk]
                keep = (tc != -1).float()[:, None]  # (n, 1)
                safe = tc.clamp(min=0)[:, None]  # (n, 1)
                logits = (xc @ w.t()).float()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
                total += ((lse - logits.gather(1, safe)) * keep).sum()
                p = logits.sub_(lse).exp_()  # softmax, in the logits' memory
                p = p.scatter_add_(1, safe, -torch.ones_like(keep)).mul_(keep).to(dt)  # d loss_sum / d logits
                grad_x[s:s + chunk] = p @ w  # (n, C)
                grad_w += p.t() @ xc  # (V, C)
        ctx.save_for_backward(grad_x.div_(count), grad_w.div_(count))  # in place: no second (V, C) buffer
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, grad_w * grad_out, None, None


def chunked_cross_entropy(x, weight, targets, chunk: int):
    """F.cross_entropy(x @ weight^T, targets, ignore_index=-1) without the (N, V) logits."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLMLoss.apply(x, weight, targets, chunk)
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    for s in range(0, x.size(0), chunk):
        logits = (x[s:s + chunk] @ weight.t()).float()
        total += F.cross_entropy(logits, targets[s:s + chunk], ignore_index=-1, reduction="sum")
    return total / (targets != -1).sum().clamp(min=1)
