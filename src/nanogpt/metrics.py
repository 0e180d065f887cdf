"""What a run reports: the log line of each log step (the step report: loss, learning rate,
gradient norm, ms/iter, tokens/s, MFU, ETA, clipping, spikes, layer statistics), and where the
numbers go: ``out_dir/metrics.jsonl`` (one JSON object a line), optionally TensorBoard and
Weights & Biases.

Each line of metrics.jsonl has ``kind`` ("train" at log steps, "eval" at evaluations, "rewind"
when a fault was rewound), ``iter`` and ``tokens`` (training tokens seen so far) and the figures
of that moment. A resumed run first drops the lines written after its checkpoint, so the file
never holds an iteration twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from .config import Section, setting
from .errors import ConfigError

FILENAME = "metrics.jsonl"


@dataclass
class MetricsConfig(Section):
    """How often and where a run reports."""

    log_interval: int = setting(1, "Print a log line every this many iterations.", gt=0)
    progress_bar: bool = setting(False, "Show a tqdm progress bar of the iterations (for an interactive terminal); log lines print above it.")
    log_layer_stats: bool = setting(False, "At log steps, also record per-layer gradient norm, weight norm and update/weight ratio in metrics.jsonl.")
    loss_spike_factor: float = setting(3.0, "Report a loss spike when a logged loss exceeds this factor times its running mean (0 disables).", ge=0)
    tensorboard_log: bool = setting(False, "Also write the logged metrics as TensorBoard events into out_dir/tensorboard (needs the tensorboard package).")
    wandb_log: bool = setting(False, "Log to Weights & Biases (wandb is imported only when this is on).")
    wandb_project: str = setting("owt", "wandb project name.")
    wandb_run_name: str = setting("gpt2", "wandb run name.")

    def check(self) -> None:
        if self.loss_spike_factor and self.loss_spike_factor <= 1:
            raise ConfigError("loss_spike_factor must be > 1 (or 0 to disable); got %r" % self.loss_spike_factor)
        if self.wandb_log and not self.wandb_project:
            raise ConfigError("wandb_project must be set when wandb_log=True")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no nan/inf
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


def read(path: str) -> list[dict]:
    """Every complete record of a metrics file; a torn last line (a crash mid-write) is skipped."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def keep_before_resume(path: str, resume_iter: int) -> None:
    """Drop records a resumed run will write again: train lines from ``resume_iter`` on and
    evaluations after it (the evaluation at ``resume_iter`` preceded the save)."""
    if not os.path.isfile(path):
        return
    kept = [r for r in read(path) if isinstance(r.get("iter"), int) and
            (r["iter"] < resume_iter or (r.get("kind") == "eval" and r["iter"] == resume_iter))]
    tmp = path + ".tmp%d" % os.getpid()
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Appends records to metrics.jsonl (rank 0 only) and mirrors them to TensorBoard / wandb."""

    def __init__(self, out_dir: str, enabled: bool, resume_iter: int | None, tensorboard: bool = False,
                 wandb_run=None):
        self.path = os.path.join(out_dir, FILENAME)
        self.enabled = enabled
        self.wandb = wandb_run
        self.tb = None
        if not enabled:
            return
        if resume_iter is None:  # a new run in this folder starts a new file
            if os.path.exists(self.path):
                os.remove(self.path)
        else:
            keep_before_resume(self.path, resume_iter)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard_log=True but tensorboard is not installed: pip install tensorboard, "
                                  "or pass --tensorboard_log=False") from None
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def write(self, kind: str, it: int, tokens: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "iter": it, "tokens": tokens, **_clean(values), "time": time.time()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        scalars = {("%s/%s" % (kind, k) if "/" not in k else k): v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, it)
        if self.wandb is not None:
            self.wandb.log({"iter": it, "tokens": tokens, **scalars})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def open_wandb(cfg: MetricsConfig, config: dict):
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb_log=True but wandb is not installed: pip install wandb, or pass --wandb_log=False") from None
    wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=config)
    return wandb


# --------------------------------------------------------------------------------------------
# per-layer statistics


def layer_of(name: str) -> str:
    """transformer.h.3.attn.c_attn.weight -> transformer.h.3; transformer.wte.weight -> transformer.wte"""
    parts = name.split(".")
    return ".".join(parts[:3]) if len(parts) > 2 and parts[1] == "h" else ".".join(parts[:2])


def _scalar(t: torch.Tensor) -> float:
    """A scalar tensor as a float; a DTensor (under FSDP) is first reduced over the ranks, which all call this."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


class LayerStats:
    """One step's per-layer gradient norm (None where gradients were freed in backward), weight
    norm, and the norm of the step's update over the weight norm. The step calls
    :meth:`grads` between clipping and the optimizer step."""

    def __init__(self, named: list):
        self.named = named
        self.before = {n: p.detach().float().clone() for n, p in named}
        self.grad_norms = None

    def grads(self) -> None:
        self.grad_norms = {n: (p.grad.detach().float().norm() if p.grad is not None else None) for n, p in self.named}

    def report(self) -> dict:
        sq = {}
        for n, p in self.named:
            acc = sq.setdefault(layer_of(n), {"grad": 0.0, "weight": 0.0, "update": 0.0, "has_grad": True})
            w = p.detach().float()
            acc["weight"] += _scalar(w.square().sum())
            acc["update"] += _scalar((w - self.before[n]).square().sum())
            g = self.grad_norms.get(n) if self.grad_norms else None
            if g is None:
                acc["has_grad"] = False
            else:
                acc["grad"] += _scalar(g) ** 2
        return {k: {"grad_norm": math.sqrt(v["grad"]) if v["has_grad"] else None, "weight_norm": math.sqrt(v["weight"]),
                    "update_ratio": math.sqrt(v["update"]) / max(math.sqrt(v["weight"]), 1e-12)} for k, v in sq.items()}


# --------------------------------------------------------------------------------------------
# the step report


def eta_text(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return "%dh%02dm" % (h, m) if h else "%dm%02ds" % (m, s) if m else "%ds" % s


class StepReport:
    """Counts what happens between log lines and writes them: throughput over the steps since
    the last line (evaluation and saving time left out), MFU against ``peak`` FLOP/s per device,
    the share of steps clipped (counted on the device: no sync per step), loss spikes against a
    running mean, per-layer statistics, and the ETA to ``max_iters``."""

    def __init__(self, cfg: MetricsConfig, sink: MetricsLog, log, *, device: str, grad_clip: float, max_iters: int,
                 flops_per_token: float, peak: float | None, world: int, ramp: bool, memory=lambda: 0):
        self.cfg, self.sink, self.log = cfg, sink, log
        self.grad_clip, self.max_iters = grad_clip, max_iters
        self.flops_per_token, self.peak, self.world, self.ramp = flops_per_token, peak, world, ramp
        self.memory = memory
        self.clipped = torch.zeros((), dtype=torch.long, device=device)  # steps clipped since the last line
        self.total_clipped, self.spikes, self.loss_ema = 0, 0, None
        self.history = []  # (iter, train loss) at each log step
        self.last_loss = None
        self.bar = None
        self.restart()

    def restart(self) -> None:
        """Start a new timing window (after an evaluation or a save, which are not training time)."""
        self.t_last, self.iters, self.tokens = time.time(), 0, 0

    def open_bar(self, start: int, enabled: bool) -> None:
        if self.cfg.progress_bar and enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=self.max_iters, initial=start, unit="it", dynamic_ncols=True, file=sys.stdout)
            self.log = self.bar.write

    def step(self, clipped, tokens: int) -> None:
        """After each optimizer step: ``clipped`` a device bool (or None), ``tokens`` trained on."""
        if clipped is not None:
            self.clipped += clipped
        self.iters += 1
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(1)

    def write(self, it: int, tokens_seen: int, loss: float, lr: float, grad_norm, step_tokens: int,
              layers: LayerStats | None, sync) -> dict:
        """The log line and metrics.jsonl record of iteration ``it`` (its loss already read)."""
        sync()
        now = time.time()
        dt = (now - self.t_last) / max(1, self.iters)
        tok_s = self.tokens / max(now - self.t_last, 1e-9)
        n_clipped = int(self.clipped.item())
        self.clipped.zero_()
        self.total_clipped += n_clipped
        clip_frac = n_clipped / max(1, self.iters) if self.grad_clip > 0 else None
        gn = float(grad_norm) if grad_norm is not None else None
        self.last_loss = loss
        self.history.append((it, loss))
        parts = ["iter %d: loss %.4f" % (it, loss), "lr %.3e" % lr]
        if gn is not None:  # None: the gradients were consumed in backward (optimizer_in_backward)
            parts.append("grad norm %.3f" % gn)
        parts += ["%.2f ms/iter" % (dt * 1000), "%s tok/s" % f"{tok_s:,.0f}"]
        mfu = None
        if self.peak:
            mfu = 100 * self.flops_per_token * tok_s / (self.peak * self.world)
            parts.append("mfu %.1f%%" % mfu)
        if self.ramp:
            parts.append("%s tokens/step" % f"{step_tokens:,}")
        if it + 1 < self.max_iters:
            parts.append("eta %s" % eta_text(dt * (self.max_iters - it - 1)))
        self.log(", ".join(parts))
        mem = self.memory()
        rec = dict(loss=loss, lr=lr, grad_norm=gn, clip_frac=clip_frac, ms_per_iter=dt * 1000, tokens_per_s=tok_s,
                   mfu=mfu, memory_gib=mem / 2**30 if mem else None, tokens_per_step=step_tokens)
        if self._spike(it, loss):
            rec["spike"] = True
        if layers is not None:
            rec["layers"] = layers.report()
            worst = max(rec["layers"].items(), key=lambda kv: kv[1]["update_ratio"])
            self.log("iter %d: largest update/weight ratio %.2e in %s" % (it, worst[1]["update_ratio"], worst[0]))
        self.sink.write("train", it, tokens_seen, **rec)
        self.restart()
        return rec

    def is_spike(self, loss: float) -> bool:
        """Whether ``loss`` is a spike against the running mean of the logged losses so far."""
        ema = self.loss_ema
        return bool(self.cfg.loss_spike_factor and ema is not None and loss > self.cfg.loss_spike_factor * ema)

    def _spike(self, it: int, loss: float) -> bool:
        """Report and count a spike; otherwise move the running mean (a spike does not move the
        mean it is judged against)."""
        if self.is_spike(loss):
            self.spikes += 1
            self.log("loss spike at iter %d: %.4f is %.1fx the running mean %.4f" % (it, loss, loss / self.loss_ema, self.loss_ema))
            return True
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        return False

    def close(self) -> int:
        """Ends the report; returns the clipped steps counted in all."""
        self.total_clipped += int(self.clipped.item())
        self.clipped.zero_()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        return self.total_clipped
