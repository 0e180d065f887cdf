"""Optimizers: parameter groups (decay only on matrices and embeddings), the factory that picks
one by name, StripedAdamW, and the optimizer-step-in-backward wrapper."""

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
                 foreach: bool | None = None):
        if lr < 0 or eps < 0 or not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError("invalid StripedAdamW hyper-parameters: lr=%r betas=%r eps=%r" % (lr, betas, eps))
        if state_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError("state_dtype must be float32 or bfloat16")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype
        self.seed = seed
        self.foreach = foreach  # None: the multi-tensor path on CUDA, one parameter at a time elsewhere

    def _init_state(self, p: torch.Tensor) -> dict:
        st = {"step": 0,  # a Python int: reading it needs no device sync
              "exp_avg": torch.zeros_like(p, dtype=self.state_dtype or p.dtype, memory_format=torch.preserve_format)}
        if p.dim() >= 2:
            st["row"] = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
            st["col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32, device=p.device)
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
            if not params:
                continue
            fast = self.foreach if self.foreach is not None else params[0].is_cuda
            if fast and self.state_dtype is None:
                simple = [p for p in params if p.grad.dtype == p.dtype == torch.float32 and not p.grad.is_sparse]
                self._foreach_step([p for p in simple if p.dim() >= 2], [p for p in simple if p.dim() < 2], group)
                params = [p for p in params if not any(p is q for q in simple)]
            for p in params:
                self._update(p, group)
        return loss

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
        if wd and (mats or vecs):
            torch._foreach_mul_(mats + vecs, 1 - lr * wd)  # decoupled weight decay
        if mats:
            sts = [self.state[p] for p in mats]
            grads = [p.grad for p in mats]
            ms = [st["exp_avg"] for st in sts]
            torch._foreach_lerp_(ms, grads, 1 - b1)  # m <- b1 m + (1 - b1) g
            # mean of g^2 over columns (per row) and over rows (per column), without a g^2 temporary
            rows = [torch.linalg.vector_norm(g, dim=-1).square_().div_(g.shape[-1]) for g in grads]
            cols = [torch.linalg.vector_norm(g, dim=-2).square_().div_(g.shape[-2]) for g in grads]
            torch._foreach_lerp_([st["row"] for st in sts], rows, 1 - b2)
            torch._foreach_lerp_([st["col"] for st in sts], cols, 1 - b2)
            del rows, cols
            eps_t = torch.tensor(eps, device=mats[0].device)
            for p, st in zip(mats, sts):
                t = st["step"]
                r, c = st["row"], st["col"]
                # sqrt(r c^T / mean(r) / (1 - b2^t)) = sqrt(r / (mean(r) (1 - b2^t))) sqrt(c)^T: one rank-1 product
                sr = (r / r.mean(dim=-1, keepdim=True).clamp_min(1e-30)).div_(1 - b2 ** t).sqrt_()
                sc = c.sqrt()
                if p.dim() == 2:
                    denom = torch.addr(eps_t, sr, sc)  # (rows, cols)
                else:
                    denom = (sr.unsqueeze(-1) * sc.unsqueeze(-2)).add_(eps)
                p.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))
                del denom
        if vecs:
            sts = [self.state[p] for p in vecs]
            grads = [p.grad for p in vecs]
            ms = [st["exp_avg"] for st in sts]
            vs = [st["exp_avg_sq"] for st in sts]
            torch._foreach_lerp_(ms, grads, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, 1 - b2)
            denom = torch._foreach_div(vs, [1 - b2 ** st["step"] for st in sts])
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_([p for p in vecs], ms, denom, [-lr / (1 - b1 ** st["step"]) for st in sts])

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
        g = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
        if wd:
            p.mul_(1 - lr * wd)
        m = st["exp_avg"] if st["exp_avg"].dtype == torch.float32 else st["exp_avg"].float()
        m.mul_(b1).add_(g, alpha=1 - b1)
        # temporaries of full size are kept to one (v), so a huge embedding needs little headroom
        if p.dim() >= 2:
            r, c = st["row"], st["col"]
            g2 = g.square()
            r.mul_(b2).add_(g2.mean(dim=-1), alpha=1 - b2)  # (..., rows)
            c.mul_(b2).add_(g2.mean(dim=-2), alpha=1 - b2)  # (..., cols)
            del g2
            v = (r / r.mean(dim=-1, keepdim=True).clamp_min(1e-30)).unsqueeze(-1) * c.unsqueeze(-2)
            v.div_(1 - b2 ** t)
        else:
            v = st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2) / (1 - b2 ** t)
        v.sqrt_().add_(eps)  # the denominator, in place
        p.addcdiv_(m, v, value=-lr / (1 - b1 ** t))
        if st["exp_avg"].dtype == torch.bfloat16:
            gen = torch.Generator(device=p.device).manual_seed(self.seed * 1000003 + int(t) * 7919 + p.numel())
            st["exp_avg"].copy_(stochastic_round_bf16(m, gen))

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (step counters excluded)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for k, v in st.items()
                   if k != "step" and torch.is_tensor(v))


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Round float32 to bfloat16 up or down at random, with probability proportional to the
    distance: unbiased in expectation, unlike round-to-nearest that loses small updates."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # low 16 bits are zero: exact


class OptimizerInBackward:
    """Runs the optimizer for each parameter as soon as its gradient is ready (a
    post-accumulate-grad hook) and frees that gradient, so no full set of gradients is ever held.
    Presents the parts of the optimizer interface the training loop uses."""

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


OPTIMIZERS = ("adamw", "striped_adamw", "adafactor")


def build_optimizer(model: torch.nn.Module, name: str, learning_rate: float, weight_decay: float,
                    betas: tuple[float, float], device_type: str, eps: float = 1e-8, state_dtype: str = "float32",
                    in_backward: bool = False, seed: int = 0):
    groups = param_groups(model, weight_decay)
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
