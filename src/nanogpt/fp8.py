"""Float8 matrix products for the Linear layers inside the blocks (``--fp8=True``).

Each product scales its operands by one number per tensor so that the largest magnitude lands at
the format's largest value, casts them to float8 (e4m3 for inputs and weights, e5m2 for the
gradients flowing back, which need range more than precision) and multiplies them with
``torch._scaled_mm``, which undoes the scales in its float32 accumulation (on the CPU, where
that kernel is slow, the same sums come from float32 products of the float8 values). The weights stay as
they are (float32 masters), so checkpoints, the optimizer and sampling do not change; only the
three products of each layer's step (forward, input gradient, weight gradient) are float8. The
output layer and attention stay in the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError
from .runtime import autocast_dtype

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def unsupported(device_type: str, device: str) -> str | None:
    """Why float8 products cannot run here, or None."""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return "this GPU (compute capability %d.%d) has no float8 matrix units; they need 8.9 or newer (H100, L4, RTX 40xx)" % (major, minor)
        return None
    if device_type == "cpu":
        return None  # the same numbers from float32 products: for checking, not for speed
    return "float8 matrix products run on CUDA (and, slowly, the CPU), not on %s" % device_type


def to_float8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` scaled so its largest magnitude is the format's largest value, in float8; and the
    scale that undoes it (float32, one element), as ``torch._scaled_mm`` takes it."""
    top = torch.finfo(dtype).max
    amax = t.detach().abs().max().float().clamp(min=1e-12)
    scale = top / amax
    t8 = (t.float() * scale).clamp(-top, top).to(dtype)
    return t8, scale.reciprocal()


def scaled_product(a8: torch.Tensor, b8: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, out_dtype) -> torch.Tensor:
    """(a8 * sa) @ (b8 * sb), accumulated in float32. ``a8`` (M, K) row-major, ``b8`` (K, N)
    column-major, as the CUDA kernel wants them. Off CUDA the same sum is formed from the float8
    values widened to float32 (torch's CPU kernel gives it too, but far more slowly)."""
    if a8.is_cuda:
        return torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return ((a8.float() @ b8.float()) * (sa * sb)).to(out_dtype)


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column, as ``_scaled_mm``'s second operand must be."""
    return t.t().contiguous().t()


class _Float8Product(torch.autograd.Function):
    """y = x @ w.T with x (M, K), w (N, K); float8 in all three products."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        x8, sx = to_float8(x, E4M3)  # (M, K)
        w8, sw = to_float8(w, E4M3)  # (N, K)
        ctx.save_for_backward(x8, sx, w8, sw)  # float8 copies: a quarter of float32 activations
        ctx.dtypes = (x.dtype, w.dtype)
        return scaled_product(x8, w8.t(), sx, sw, out_dtype)  # (M, N)

    @staticmethod
    def backward(ctx, grad):
        x8, sx, w8, sw = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g8, sg = to_float8(grad.contiguous(), E5M2)  # (M, N)
        grad_x = scaled_product(g8, _column_major(w8), sg, sw, x_dtype)  # (M, K)
        grad_w = scaled_product(g8.t().contiguous(), _column_major(x8), sg, sx, w_dtype)  # (N, K)
        return grad_x, grad_w, None


def fits(m: int, k: int, n: int) -> bool:
    """The float8 kernels need every dimension of the product to be a multiple of 16."""
    return m % 16 == 0 and k % 16 == 0 and n % 16 == 0


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose product runs in float8 when its shapes allow (else as usual)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.weight.shape
        m = x.numel() // k
        if not fits(m, k, n):
            return F.linear(x, self.weight, self.bias)
        kind = x.device.type
        out_dtype = autocast_dtype(kind, x.dtype)
        with torch.autocast(kind, enabled=False):
            y = _Float8Product.apply(x.reshape(m, k), self.weight, out_dtype).view(*x.shape[:-1], n)  # (..., N)
            if self.bias is not None:
                y = y + self.bias.to(out_dtype)
        return y


def enable(model: nn.Module) -> int:
    """Turn the Linear layers inside the blocks into Float8Linear, keeping their parameters (and
    so their names, values and optimizer state); returns how many."""
    count = 0
    for block in model.transformer.h:
        for module in block.modules():
            if type(module) is nn.Linear:
                module.__class__ = Float8Linear
                count += 1
    return count


def apply(model: nn.Module, device_type: str, device: str) -> int:
    """``enable`` where float8 products can run; otherwise a one-line error naming the key."""
    why = unsupported(device_type, device)
    if why:
        raise ConfigError("fp8=True: %s; or pass --fp8=False" % why)
    return enable(model)
