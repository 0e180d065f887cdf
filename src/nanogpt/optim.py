"""Optimizers and the learning-rate schedule: their settings, parameter groups (decay only on
matrices and embeddings), the factory that picks one by name, StripedAdamW, Muon, and the
optimizer-step-in-backward wrapper."""

from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass

import torch

from .config import Section, setting
from .errors import ConfigError

OPTIMIZERS = ("adamw", "striped_adamw", "adafactor", "muon")


@dataclass
class OptimConfig(Section):
    """The optimizer and its hyper-parameters."""

    optimizer: str = setting("adamw", "Optimizer: 'adamw' (8 bytes of state per parameter), 'striped_adamw' (Adam's first moment, factored second moment: about 4), 'adafactor' (torch's, no momentum: about 0), 'muon' (Muon for the matrices inside the blocks, AdamW for the rest).",
                             choices=OPTIMIZERS)
    learning_rate: float = setting(6e-4, "Peak learning rate.", gt=0)
    weight_decay: float = setting(1e-1, "Decoupled weight decay, applied to parameters with 2 or more dimensions only.", ge=0)
    beta1: float = setting(0.9, "Adam beta1.", ge=0, lt=1)
    beta2: float = setting(0.95, "Adam beta2.", ge=0, lt=1)
    eps: float = setting(1e-8, "Adam epsilon, added outside the square root.", gt=0)
    grad_clip: float = setting(1.0, "Clip the global gradient norm to this value; 0.0 disables clipping.", ge=0, note="0 disables it")
    muon_lr: float = setting(0.02, "optimizer='muon': peak learning rate of the Muon matrices (the others take learning_rate; one schedule scales both).",
                             gt=0)
    muon_momentum: float = setting(0.95, "optimizer='muon': momentum of the Muon matrices (Nesterov).", ge=0, lt=1)
    optimizer_state_dtype: str = setting("float32", "Dtype of striped_adamw's first moment: 'float32' or 'bfloat16' (stochastic rounding, half the bytes).",
                                         choices=("float32", "bfloat16"))
    optimizer_in_backward: bool = setting(False, "Step each parameter inside backward as soon as its gradient is ready and free it: no full set of gradients is held. Needs gradient_accumulation_steps=1, grad_clip=0, one process, no float16.")

    def check(self) -> None:
        if self.optimizer_state_dtype == "bfloat16" and self.optimizer != "striped_adamw":
            raise ConfigError("optimizer_state_dtype='bfloat16' works with optimizer='striped_adamw' only; got optimizer=%r" % self.optimizer)
        if self.optimizer == "muon" and self.optimizer_in_backward:
            raise ConfigError("optimizer='muon' cannot step inside backward; pass --optimizer_in_backward=False")
        if self.optimizer_in_backward and self.grad_clip > 0:
            raise ConfigError("optimizer_in_backward=True needs grad_clip=0 (clipping needs every gradient at once)")


@dataclass
class ScheduleConfig(Section):
    """The learning-rate schedule: linear warmup, cosine decay, a floor."""

    decay_lr: bool = setting(True, "Cosine decay of the learning rate after a linear warmup; False keeps it constant.")
    warmup_iters: int = setting(2000, "Linear warmup steps.", ge=0)
    lr_decay_iters: int = setting(600000, "Step at which the cosine decay reaches min_lr (about max_iters).", ge=0)
    min_lr: float = setting(6e-5, "Floor of the learning rate (about learning_rate/10).", ge=0)

    def check(self) -> None:
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            raise ConfigError("warmup_iters (%d) must not exceed lr_decay_iters (%d)" % (self.warmup_iters, self.lr_decay_iters))


def get_lr(it: int, sched: ScheduleConfig, learning_rate: float) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not sched.decay_lr:
        return learning_rate
    if it < sched.warmup_iters:
        return learning_rate * (it + 1) / (sched.warmup_iters + 1)
    if it >= sched.lr_decay_iters:
        return sched.min_lr
    ratio = (it - sched.warmup_iters) / max(1, sched.lr_decay_iters - sched.warmup_iters)
    return sched.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - sched.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _dtensor_type():
    """DTensor's class once torch.distributed.tensor is loaded (no DTensor exists before), else None:
    importing it up front would cost every run about a second."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (a view: in-place updates reach the DTensor); other tensors as they are."""
    dt = _dtensor_type()
    return t.to_local() if dt is not None and isinstance(t, dt) else t


def _split_groups(p: torch.Tensor) -> tuple[list, list]:
    """For a sharded (DTensor) matrix, the process groups whose ranks each hold part of its rows
    (dim -2) and part of its columns (dim -1): statistics summed over that dimension must be
    summed over those ranks too. Empty for ordinary tensors and for splits of batch dimensions."""
    dt = _dtensor_type()
    rows, cols = [], []
    if dt is not None and isinstance(p, dt) and p.dim() >= 2:
        for i, pl in enumerate(p.placements):
            if pl.is_shard():
                d = pl.dim % p.dim()
                if d == p.dim() - 2:
                    rows.append(p.device_mesh.get_group(i))
                elif d == p.dim() - 1:
                    cols.append(p.device_mesh.get_group(i))
            elif not pl.is_replicate():
                raise ValueError("StripedAdamW cannot step a parameter placed as %s" % pl)
    return rows, cols


def _sum_over(tensors: list, groups: list) -> None:
    """All-reduce (sum) each tensor, in place, over the process groups listed for it; the tensors
    of one group travel in a single collective."""
    buckets: dict = {}
    for t, gs in zip(tensors, groups):
        for g in gs:
            buckets.setdefault(g, []).append(t)
    for g, ts in buckets.items():
        flat = torch.cat([t.reshape(-1) for t in ts])
        torch.distributed.all_reduce(flat, group=g)
        for t, piece in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(piece.view_as(t))


def _row_means(rs: list, ps: list) -> list:
    """mean(r) over the last dimension (kept) for the row statistics of each matrix in ps,
    adding the pieces held by other ranks where the rows are split."""
    groups = [_split_groups(p)[0] for p in ps]
    if not any(groups):
        return [r.mean(dim=-1, keepdim=True) for r in rs]
    sums = [r.sum(dim=-1, keepdim=True) for r in rs]
    _sum_over(sums, groups)
    return [s.div_(p.shape[-2]) for s, p in zip(sums, ps)]  # p.shape: the full size, also for a DTensor


def _stat_zeros(p: torch.Tensor, shape: torch.Size, rows: bool) -> torch.Tensor:
    """Zeros for the row (``rows=True``) or column statistics of matrix p. For a DTensor they are
    DTensors too, so a gathered state dict holds them in full: a split of a batch dimension carries
    over, a split of the rows splits the row statistics and replicates the column ones, and the
    reverse for a split of the columns."""
    dt = _dtensor_type()
    if dt is None or not isinstance(p, dt):
        return torch.zeros(shape, dtype=torch.float32, device=p.device)
    from torch.distributed.tensor import Replicate, Shard, zeros
    nd, placements = p.dim(), []
    for pl in p.placements:
        d = pl.dim % nd if pl.is_shard() else None
        if d is None or d == (nd - 1 if rows else nd - 2):
            placements.append(Replicate())
        else:
            placements.append(Shard(nd - 2 if d == nd - 1 else d))
    return zeros(shape, dtype=torch.float32, device_mesh=p.device_mesh, placements=placements)


class StripedAdamW(torch.optim.Optimizer):
    """AdamW whose second moment is factored for matrices, as in Adafactor.

    For a parameter with two or more dimensions (the last two are factored, leading ones are a
    batch), with gradient g at step t:

        m <- b1 m + (1 - b1) g                          first moment, kept in full
        r <- b2 r + (1 - b2) mean over columns of g^2   one number per row
        c <- b2 c + (1 - b2) mean over rows of g^2      one number per column
        v = r c^T / mean(r)                             rank-1 estimate of the second moment
        p <- p - lr wd p                                decoupled weight decay
        p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Vectors (biases, LayerNorm) keep a full second moment, exactly as AdamW. eps sits outside the
    square root, as in AdamW, so with eps=1e-8 the update matches AdamW's scale wherever the
    estimate is good; Adafactor's 1e-30 inside the root would let rows of tiny gradients take
    steps of full size. State: 4 bytes per matrix entry for m (2 with ``state_dtype=bfloat16``)
    plus rows + columns, against AdamW's 8.

    ``state_dtype=torch.bfloat16`` stores m in bfloat16 with stochastic rounding (unbiased in
    expectation), its noise drawn from a generator seeded by (seed, step), so a resumed run
    repeats an uninterrupted one.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: torch.dtype | None = None, seed: int = 0,
                 foreach: bool | None = None, fused: bool = False):
        if lr < 0 or eps < 0 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError("invalid StripedAdamW hyper-parameters: lr=%r betas=%r eps=%r" % (lr, betas, eps))
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError("state_dtype must be float32 or bfloat16")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype
        self.seed = seed
        self.foreach = foreach  # None: the multi-tensor path on CUDA, one parameter at a time elsewhere
        self.fused = fused  # matrices on CUDA through the Triton kernels of striped_triton.py (float32 state only)

    def _init_state(self, p: torch.Tensor) -> dict:
        st = {"step": 0,  # a Python int: reading it needs no device sync
              "exp_avg": torch.zeros_like(p, dtype=self.state_dtype or p.dtype, memory_format=torch.preserve_format)}
        if p.dim() >= 2:
            st["row"] = _stat_zeros(p, p.shape[:-1], rows=True)
            st["col"] = _stat_zeros(p, p.shape[:-2] + p.shape[-1:], rows=False)
        else:
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                want = {k: tuple(v) for k, v in self._init_state_meta(p).items()}
                got = {k: tuple(v.shape) for k, v in st.items() if k != "step"}
                if got != want:
                    raise ValueError("StripedAdamW state for a parameter of shape %s holds %s, expected %s"
                                     % (tuple(p.shape), got, want))
                if self.state_dtype is not None:  # the base class cast it to the parameter's dtype
                    st["exp_avg"] = st["exp_avg"].to(self.state_dtype)

    @staticmethod
    def _init_state_meta(p: torch.Tensor) -> dict:
        if p.dim() >= 2:
            return {"exp_avg": torch.Size(p.shape), "row": torch.Size(p.shape[:-1]),
                    "col": torch.Size(p.shape[:-2] + p.shape[-1:])}
        return {"exp_avg": torch.Size(p.shape), "exp_avg_sq": torch.Size(p.shape)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if self.fused and self.state_dtype is None:
                params = self._fused_step(params, group)
            if not params:
                continue
            fast = self.foreach if self.foreach is not None else params[0].is_cuda
            if fast and self.state_dtype is None:
                mats, vecs, rest = [], [], []
                for p in params:  # float32 dense gradients go to the multi-tensor path
                    if p.grad.dtype != torch.float32 or p.dtype != torch.float32 or p.grad.is_sparse:
                        rest.append(p)
                    else:
                        (mats if p.dim() >= 2 else vecs).append(p)
                self._foreach_step(mats, vecs, group)
                params = rest
            for p in params:
                self._update(p, group)
        return loss

    @torch.no_grad()
    def _fused_step(self, params: list, group: dict) -> list:
        """Step the matrices the Triton kernels can take; return the other parameters."""
        from . import striped_triton
        rest = []
        for p in params:
            if not striped_triton.usable(p) or p.grad.dtype != torch.float32 or p.grad.is_sparse:
                rest.append(p)
                continue
            st = self.state[p]
            if not st:
                st.update(self._init_state(p))
            st["step"] += 1
            striped_triton.step_matrix(p, st, group["lr"], *group["betas"], group["eps"], group["weight_decay"])
        return rest

    @torch.no_grad()
    def _foreach_step(self, mats: list, vecs: list, group: dict) -> None:
        """The same update for many tensors with few kernels: element-wise work is done by
        torch._foreach_* over all tensors at once; each matrix adds only its row/column
        reductions and one rank-1 denominator (so temporaries stay one matrix at a time)."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        for p in mats + vecs:
            st = self.state[p]
            if not st:
                st.update(self._init_state(p))
            st["step"] += 1
        # DTensor (FSDP) parameters are stepped through their local pieces, the sums that span
        # ranks all-reduced; p.shape stays the full shape
        if wd and (mats or vecs):
            torch._foreach_mul_([_local(p) for p in mats + vecs], 1 - lr * wd)  # decoupled weight decay
        if mats:
            sts = [self.state[p] for p in mats]
            grads = [_local(p.grad) for p in mats]
            ms = [_local(st["exp_avg"]) for st in sts]
            torch._foreach_lerp_(ms, grads, 1 - b1)  # m <- b1 m + (1 - b1) g
            # mean of g^2 over columns (per row) and over rows (per column), without a g^2 temporary
            rows = [torch.linalg.vector_norm(g, dim=-1).square_() for g in grads]
            cols = [torch.linalg.vector_norm(g, dim=-2).square_() for g in grads]
            splits = [_split_groups(p) for p in mats]
            _sum_over(rows + cols, [s[1] for s in splits] + [s[0] for s in splits])
            for p, x, y in zip(mats, rows, cols):
                x.div_(p.shape[-1])
                y.div_(p.shape[-2])
            rs, cs = [_local(st["row"]) for st in sts], [_local(st["col"]) for st in sts]
            torch._foreach_lerp_(rs, rows, 1 - b2)
            torch._foreach_lerp_(cs, cols, 1 - b2)
            del rows, cols
            eps_t = torch.tensor(eps, device=ms[0].device)
            for p, st, m, r, c, r_mean in zip(mats, sts, ms, rs, cs, _row_means(rs, mats)):
                t = st["step"]
                # sqrt(r c^T / mean(r) / (1 - b2^t)) = sqrt(r / (mean(r) (1 - b2^t))) sqrt(c)^T: one rank-1 product
                sr = (r / r_mean.clamp_min(1e-30)).div_(1 - b2 ** t).sqrt_()
                sc = c.sqrt()
                if p.dim() == 2:
                    denom = torch.addr(eps_t, sr, sc)  # (rows, cols)
                else:
                    denom = (sr.unsqueeze(-1) * sc.unsqueeze(-2)).add_(eps)
                _local(p).addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                del denom
        if vecs:
            sts = [self.state[p] for p in vecs]
            grads = [_local(p.grad) for p in vecs]
            ms = [_local(st["exp_avg"]) for st in sts]
            vs = [_local(st["exp_avg_sq"]) for st in sts]
            torch._foreach_lerp_(ms, grads, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
            denom = torch._foreach_div(vs, [1 - b2 ** st["step"] for st in sts])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_([_local(p) for p in vecs], ms, denom, [-lr / (1 - b1 ** st["step"]) for st in sts])

    @torch.no_grad()
    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("StripedAdamW does not support sparse gradients")
        st = self.state[p]
        if not st:
            st.update(self._init_state(p))
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        st["step"] += 1
        t = st["step"]
        # a DTensor (FSDP) parameter is stepped through its local piece; p.shape stays the full shape
        g, exp_avg = _local(p.grad), _local(st["exp_avg"])
        g = g if g.dtype == torch.float32 else g.float()
        if wd:
            _local(p).mul_(1 - lr * wd)
        m = exp_avg if exp_avg.dtype == torch.float32 else exp_avg.float()
        m.mul_(b1).add_(g, alpha=1 - b1)
        # temporaries of full size are kept to one (v), so a huge embedding needs little headroom
        if p.dim() >= 2:
            r, c = _local(st["row"]), _local(st["col"])
            g2 = g.square()
            # sums over this rank's piece, then over the ranks that split the matrix (none when it
            # is whole), divided by the full size
            rows, cols = g2.sum(dim=-1), g2.sum(dim=-2)
            split_rows, split_cols = _split_groups(p)
            _sum_over([rows, cols], [split_cols, split_rows])
            rows.div_(p.shape[-1])
            cols.div_(p.shape[-2])
            r.mul_(b2).add_(rows, alpha=1 - b2)  # (..., rows)
            c.mul_(b2).add_(cols, alpha=1 - b2)  # (..., cols)
            del g2, rows, cols
            v = (r / _row_means([r], [p])[0].clamp_min(1e-30)).unsqueeze(-1) * c.unsqueeze(-2)
            v.div_(1 - b2 ** t)
        else:
            v = _local(st["exp_avg_sq"]).mul_(b2).addcmul_(g, g, value=1 - b2) / (1 - b2 ** t)
        v.sqrt_().add_(eps)  # the denominator, in place
        _local(p).addcdiv_(m, v, value=-lr / (1 - b1 ** t))
        if exp_avg.dtype == torch.bfloat16:
            gen = torch.Generator(device=p.device).manual_seed(self.seed * 1000003 + int(t) * 7919 + p.numel())
            exp_avg.copy_(stochastic_round_bf16(m, gen))

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (step counters excluded)."""
        return sum(_local(v).numel() * v.element_size() for st in self.state.values() for k, v in st.items()
                   if k != "step" and torch.is_tensor(v))


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round float32 to bfloat16 up or down at random, with probability proportional to the
    distance: unbiased in expectation, unlike round-to-nearest that loses small updates."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # low 16 bits are zero: exact


# --------------------------------------------------------------------------------------------
# Muon


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g (..., m, n), approximately: a quintic Newton-Schulz
    iteration pushes every singular value of g / |g| towards 1 (into about [0.7, 1.2]) while
    keeping the singular vectors. Runs in bfloat16 on CUDA, float32 elsewhere."""
    a, b, c = 3.4445, -4.7750, 2.0315  # pulls small singular values up fast; stays bounded
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT  # iterate on the short side: (m, m) products
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        s = x @ x.mT  # (..., m, m)
        x = a * x + (b * s + c * s @ s) @ x
    return (x if wide else x.mT).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the hidden matrices, AdamW for everything else, in one optimizer.

    Groups with ``muon=True`` hold 2-D weights. Each step keeps a momentum buffer
    (``buf <- mu buf + (1 - mu) g``), takes the Nesterov blend ``g + mu (buf - g)``, replaces it
    by its orthogonalised form (every singular value about 1: each direction moves the same
    amount) and steps ``p <- p - lr sqrt(max(1, m/n)) O``. ``split=k`` orthogonalises k equal
    row blocks on their own (the fused q, k, v projection is three matrices). Decoupled weight
    decay ``p <- p - (lr / lr_ratio) wd p``: a group's ``lr_ratio`` (Muon's learning rate over
    AdamW's, 1 when absent) is divided out, so a weight decay shrinks the weights per step as
    much as it would under AdamW.

    Other groups (embeddings, the head, biases and norms) take a plain AdamW step with
    ``betas``/``eps``. State: one buffer per Muon matrix (4 bytes per entry), two per AdamW one.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, ns_steps: int = 5):
        if lr < 0 or not 0.0 <= momentum < 1.0 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError("invalid Muon hyper-parameters: lr=%r momentum=%r betas=%r" % (lr, momentum, betas))
        super().__init__(params, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay,
                                      ns_steps=ns_steps, muon=False, split=1))
        for group in self.param_groups:
            for p in group["params"]:
                if group["muon"] and p.dim() != 2:
                    raise ValueError("Muon groups take matrices only; got a tensor of shape %s" % tuple(p.shape))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["muon"]:
                    self._muon(p, group)
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        g, st, mu = p.grad, self.state[p], group["momentum"]
        if not st:
            st["momentum_buffer"] = torch.zeros_like(p)
        buf = st["momentum_buffer"]
        buf.lerp_(g, 1 - mu)
        u = g.lerp(buf, mu)  # Nesterov: look one momentum step ahead
        k = group["split"]
        u = u.view(k, p.size(0) // k, p.size(1))  # (k, m, n)
        o = orthogonalize(u, group["ns_steps"]).view_as(p)
        m, n = u.shape[-2:]
        p.mul_(1 - group["lr"] / group.get("lr_ratio", 1.0) * group["weight_decay"])
        p.add_(o, alpha=-group["lr"] * max(1.0, m / n) ** 0.5)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        g, st = p.grad, self.state[p]
        (b1, b2), lr = group["betas"], group["lr"]
        if not st:
            st["step"] = 0  # a Python int: no device sync to read it
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        t = st["step"]
        st["exp_avg"].lerp_(g, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        p.mul_(1 - lr * group["weight_decay"])
        denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))


def muon_groups(model: torch.nn.Module, weight_decay: float, learning_rate: float, muon_lr: float) -> list[dict]:
    """Muon takes the 2-D weights inside the Transformer blocks; AdamW the embeddings, the head
    and every vector. ``lr_ratio`` (Muon's learning rate over AdamW's) rides along in the Muon
    groups so that one schedule drives both."""
    lr_ratio = muon_lr / learning_rate
    qkv, hidden, other_decay, other = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() == 2 and ".h." in "." + name:
            (qkv if name.endswith("attn.c_attn.weight") else hidden).append(p)
        elif p.dim() >= 2:
            other_decay.append(p)
        else:
            other.append(p)
    muon = dict(muon=True, weight_decay=weight_decay, lr=muon_lr, lr_ratio=lr_ratio)
    groups = [dict(muon, params=qkv, split=3), dict(muon, params=hidden),
              {"params": other_decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class OptimizerInBackward:
    """Runs the optimizer for each parameter as soon as its gradient is ready (a
    post-accumulate-grad hook) and frees that gradient, so no full set of gradients is ever held.
    Presents the parts of the optimizer interface the training loop uses."""

    in_backward = True  # no gradients are left after backward: nothing to clip or measure

    def __init__(self, make, groups: list[dict]):
        self.optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {}
        self.order: list[torch.Tensor] = []
        self._handles = []
        for group in groups:
            extra = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                opt = make([{"params": [p], **extra}])
                self.optimizers[p] = opt
                self.order.append(p)
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, p: torch.Tensor) -> None:
        self.optimizers[p].step()
        p.grad = None

    @property
    def param_groups(self) -> list[dict]:
        return [g for p in self.order for g in self.optimizers[p].param_groups]

    def step(self) -> None:  # the work was done during backward
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.order:
            p.grad = None

    def state_dict(self) -> dict:
        return {"per_parameter": [self.optimizers[p].state_dict() for p in self.order]}

    def load_state_dict(self, state: dict) -> None:
        per = state.get("per_parameter")
        if per is None or len(per) != len(self.order):
            raise ValueError("checkpoint optimizer state was not written with optimizer_in_backward=True")
        for p, s in zip(self.order, per):
            self.optimizers[p].load_state_dict(s)

    def state_bytes(self) -> int:
        return sum(optimizer_state_bytes(o) for o in self.optimizers.values())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def optimizer_state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return opt.state_bytes()
    return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if k != "step" and torch.is_tensor(v))


def build(model: torch.nn.Module, cfg: OptimConfig, device_type: str, seed: int = 0):
    """The optimizer ``cfg`` names, over ``model``'s parameters (see :func:`build_optimizer`)."""
    return build_optimizer(model, cfg.optimizer, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2), device_type,
                           eps=cfg.eps, state_dtype=cfg.optimizer_state_dtype, in_backward=cfg.optimizer_in_backward,
                           seed=seed, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum)


def build_optimizer(model: torch.nn.Module, name: str, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], device_type: str, eps: float = 1e-8, state_dtype: str = "float32",
                    in_backward: bool = False, seed: int = 0, muon_lr: float = 0.02, muon_momentum: float = 0.95):
    groups = param_groups(model, weight_decay)
    if name == "muon":
        if in_backward or state_dtype != "float32":
            raise ConfigError("optimizer='muon' works with optimizer_in_backward=False and optimizer_state_dtype='float32' only")
        return Muon(muon_groups(model, weight_decay, learning_rate, muon_lr), lr=learning_rate,
                    momentum=muon_momentum, betas=betas, eps=eps)
    if name == "adamw":
        if state_dtype != "float32":
            raise ConfigError("optimizer_state_dtype=%r works with optimizer='striped_adamw' only" % state_dtype)
        extra = {}
        if device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters:
            extra["fused"] = True  # one kernel for all parameters

        def make(gs):
            return torch.optim.AdamW(gs, lr=learning_rate, betas=betas, eps=eps, **extra)
    elif name == "striped_adamw":
        sd = torch.bfloat16 if state_dtype == "bfloat16" else None

        def make(gs):
            return StripedAdamW(gs, lr=learning_rate, betas=betas, eps=eps, state_dtype=sd, seed=seed)
    elif name == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise ConfigError("optimizer='adafactor' needs torch>=2.5 (torch.optim.Adafactor); upgrade torch or pick 'striped_adamw'")
        if state_dtype != "float32":
            raise ConfigError("optimizer_state_dtype=%r works with optimizer='striped_adamw' only" % state_dtype)

        def make(gs):
            return torch.optim.Adafactor(gs, lr=learning_rate, beta2_decay=-0.8, eps=(None, 1e-3))
    else:
        raise ConfigError("unknown optimizer %r; choose one of %s" % (name, ", ".join(OPTIMIZERS)))
    return OptimizerInBackward(make, groups) if in_backward else make(groups)


def describe(groups: list[dict]) -> str:
    n = [sum(p.numel() for p in g["params"]) for g in groups]
    return "optimizer: %d decayed tensors (%s parameters), %d not decayed (%s parameters)" % (
        len(groups[0]["params"]), f"{n[0]:,}", len(groups[1]["params"]), f"{n[1]:,}")
