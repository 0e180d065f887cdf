"""Where a run's numbers go: ``out_dir/metrics.jsonl`` (one JSON object a line), and optionally
TensorBoard and Weights & Biases.

Each line has ``kind`` ("train" at log steps, "eval" at evaluations), ``iter`` and ``tokens``
(training tokens seen so far) and the figures of that moment. A resumed run first drops the
lines written after its checkpoint, so the file never holds an iteration twice.
"""

from __future__ import annotations

import json
import math
import os
import time

from .config import ConfigError

FILENAME = "metrics.jsonl"


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
    with open(path, encoding="utf-8") as f:
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
    kept = [r for r in read(path)
            if r.get("iter", 0) < resume_iter or (r.get("kind") == "eval" and r.get("iter") == resume_iter)]
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
