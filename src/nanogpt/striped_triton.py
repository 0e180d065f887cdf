"""StripedAdamW's step for a CUDA matrix as two Triton kernels (``StripedAdamW(..., fused=True)``).

The multi-tensor path reads the gradient three times (the update of m and two norms), writes and
reads a full-size denominator, and passes over the weights twice (weight decay, then the update).
Here one kernel reads g once for its squared sums per row and per column (partial sums per tile,
added up in a fixed order, so the result does not depend on scheduling), small vector operations
update the row and column statistics, and a second kernel reads g, m and p once and writes m and
p once:

    m <- m + (1 - b1) (g - m)
    p <- p (1 - lr wd) - lr / (1 - b1^t) * m / (sr_i sc_j + eps)

with sr = sqrt(r / (mean(r) (1 - b2^t))) and sc = sqrt(c), as in StripedAdamW's docstring.
``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (slowly), which is how they are checked
without a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the multi-tensor path serves instead
    triton = None

BR, BC = 32, 128  # tile rows x columns of both kernels


def usable(p: torch.Tensor) -> bool:
    """Whether this parameter can take the fused step: a contiguous float32 matrix on CUDA (or
    any device under the Triton interpreter), not a DTensor."""
    if triton is None or p.dim() != 2 or p.dtype != torch.float32 or not p.is_contiguous():
        return False
    if type(p) is not torch.nn.Parameter and type(p) is not torch.Tensor:
        return False  # a DTensor (FSDP): its local pieces need cross-rank sums
    return p.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def _square_sums(g_ptr, rows_ptr, cols_ptr, R, C, BR: tl.constexpr, BC: tl.constexpr):
        # one (BR, BC) tile: its squared sums per row go to rows[tile column, :], per column to cols[tile row, :]
        tr, tc = tl.program_id(0), tl.program_id(1)
        r = tr * BR + tl.arange(0, BR)
        c = tc * BC + tl.arange(0, BC)
        inside = (r[:, None] < R) & (c[None, :] < C)
        g = tl.load(g_ptr + r[:, None] * C + c[None, :], mask=inside, other=0.0)
        g2 = g * g
        tl.store(rows_ptr + tc * R + r, tl.sum(g2, axis=1), mask=r < R)
        tl.store(cols_ptr + tr * C + c, tl.sum(g2, axis=0), mask=c < C)

    @triton.jit
    def _update(p_ptr, g_ptr, m_ptr, sr_ptr, sc_ptr, R, C, decay, step, one_minus_b1, eps,
                BR: tl.constexpr, BC: tl.constexpr):
        tr, tc = tl.program_id(0), tl.program_id(1)
        r = tr * BR + tl.arange(0, BR)
        c = tc * BC + tl.arange(0, BC)
        inside = (r[:, None] < R) & (c[None, :] < C)
        at = r[:, None] * C + c[None, :]
        g = tl.load(g_ptr + at, mask=inside, other=0.0)
        m = tl.load(m_ptr + at, mask=inside, other=0.0)
        p = tl.load(p_ptr + at, mask=inside, other=0.0)
        sr = tl.load(sr_ptr + r, mask=r < R, other=1.0)
        sc = tl.load(sc_ptr + c, mask=c < C, other=1.0)
        m = m + one_minus_b1 * (g - m)
        p = p * decay - step * (m / (sr[:, None] * sc[None, :] + eps))
        tl.store(m_ptr + at, m, mask=inside)
        tl.store(p_ptr + at, p, mask=inside)


def step_matrix(p: torch.Tensor, st: dict, lr: float, b1: float, b2: float, eps: float, wd: float) -> None:
    """One StripedAdamW step of matrix ``p`` (its state ``st`` already counts this step)."""
    g = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
    R, C = p.shape
    t = st["step"]
    grid = (triton.cdiv(R, BR), triton.cdiv(C, BC))
    rows = torch.empty(grid[1], R, device=p.device, dtype=torch.float32)  # partial sums per tile column
    cols = torch.empty(grid[0], C, device=p.device, dtype=torch.float32)  # partial sums per tile row
    _square_sums[grid](g, rows, cols, R, C, BR=BR, BC=BC)
    r, c = st["row"], st["col"]
    r.lerp_(rows.sum(dim=0).div_(C), 1 - b2)  # mean of g^2 per row
    c.lerp_(cols.sum(dim=0).div_(R), 1 - b2)  # mean of g^2 per column
    sr = (r / r.mean().clamp_min(1e-30)).div_(1 - b2 ** t).sqrt_()
    sc = c.sqrt()
    _update[grid](p, g, st["exp_avg"], sr, sc, R, C, 1 - lr * wd, lr / (1 - b1 ** t), 1 - b1, eps, BR=BR, BC=BC)
