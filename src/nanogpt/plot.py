"""Plots of training runs: ``python plot.py out [out2 ...] [--out=PATH.png] [--smooth=N]``.

Reads each run's ``metrics.jsonl`` (see :mod:`nanogpt.metrics`) and draws one figure: train and
val loss against iterations and against tokens, the learning rate, the gradient norm, and one
panel per evaluation-task metric (``hellaswag/acc_norm``, ...) when the runs have any. Each run
has its own colour; the legend names its folder. Needs matplotlib (drawn with its Agg backend,
so no display is used).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from .errors import UserError, run_command
from .metrics import FILENAME, read

# fields of an eval record that are not task metrics
EVAL_FIELDS = {"kind", "iter", "tokens", "train_loss", "val_loss", "lr", "time"}
FORMATS = ("png", "svg", "pdf")


class PlotError(UserError):
    """Nothing to plot, or no way to plot it; one line."""


def load_metrics(out_dir: str) -> list[dict]:
    """The records of ``out_dir/metrics.jsonl``; a torn last line (a run killed mid-write) is
    skipped. When an iteration of a kind appears twice the later record wins; records come back
    sorted by iteration, in file order within one. A missing or empty file is a PlotError."""
    path = os.path.join(out_dir, FILENAME)
    if not os.path.isfile(path):
        raise PlotError("%s has no %s: train with out_dir=%s first (metrics are written by the training loop)"
                        % (out_dir, FILENAME, out_dir))
    records = read(path)
    if not records:
        raise PlotError("%s is empty: the run in %s has not logged anything yet" % (path, out_dir))
    latest = {}
    for i, rec in enumerate(records):
        latest[(rec.get("kind"), rec.get("iter"))] = (i, rec)
    return [rec for _, rec in sorted(latest.values(), key=lambda ir: (_number(ir[1].get("iter")) or 0, ir[0]))]


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def series(records: list[dict], kind: str, x: str, y: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of the records of ``kind`` where both fields are numbers."""
    xs, ys = [], []
    for rec in records:
        if rec.get("kind") != kind:
            continue
        a, b = _number(rec.get(x)), _number(rec.get(y))
        if a is not None and b is not None:
            xs.append(a)
            ys.append(b)
    return xs, ys


def smooth(values: list[float], n: int) -> list[float]:
    """Trailing moving average over ``n`` points (fewer at the start); n <= 1 leaves them as they are."""
    if n <= 1:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def task_metrics(runs: dict[str, list[dict]]) -> list[str]:
    """Names of the numeric evaluation-task metrics any run has, in order of first appearance."""
    names = []
    for records in runs.values():
        for rec in records:
            if rec.get("kind") != "eval":
                continue
            for k, v in rec.items():
                if k not in EVAL_FIELDS and k not in names and _number(v) is not None:
                    names.append(k)
    return names


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    return Figure, FigureCanvasAgg


def run_names(out_dirs: list[str]) -> list[str]:
    """Folder names for the legend; the whole path where two runs share a name."""
    names = [os.path.basename(os.path.normpath(d)) or d for d in out_dirs]
    return [d if names.count(n) > 1 else n for n, d in zip(names, out_dirs)]


def make_figure(runs: dict[str, list[dict]], smooth_n: int = 1):
    """A matplotlib Figure (Agg canvas) of the runs: {legend name: records}."""
    Figure, FigureCanvasAgg = _matplotlib()
    tasks = task_metrics(runs)
    panels = ["loss_iter", "loss_tokens", "loss_time", "lr", "grad_norm"] + tasks
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(6.4 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = {name: fig.add_subplot(nrows, ncols, i + 1) for i, name in enumerate(panels)}
    for i, (name, records) in enumerate(runs.items()):
        color = "C%d" % (i % 10)
        times = [t for t in (_number(r.get("time")) for r in records) if t is not None]
        t0 = min(times) if times else 0.0
        for x, ax in (("iter", axes["loss_iter"]), ("tokens", axes["loss_tokens"]), ("time", axes["loss_time"])):
            tx, ty = series(records, "train", x, "loss")
            if not tx:  # no log lines: the train loss of the evaluations
                tx, ty = series(records, "eval", x, "train_loss")
            vx, vy = series(records, "eval", x, "val_loss")
            if x == "time":  # seconds since the run's first record
                tx, vx = [t - t0 for t in tx], [t - t0 for t in vx]
            ax.plot(tx, smooth(ty, smooth_n), color=color, lw=1.0, alpha=0.8, label="%s train" % name)
            ax.plot(vx, vy, color=color, lw=1.5, ls="--", marker="o", ms=3, label="%s val" % name)
        lx, ly = series(records, "train", "iter", "lr")
        if not lx:
            lx, ly = series(records, "eval", "iter", "lr")
        axes["lr"].plot(lx, ly, color=color, label=name)
        gx, gy = series(records, "train", "iter", "grad_norm")
        axes["grad_norm"].plot(gx, smooth(gy, smooth_n), color=color, lw=1.0, label=name)
        for task in tasks:
            tx, ty = series(records, "eval", "iter", task)
            axes[task].plot(tx, ty, color=color, marker="o", ms=3, label=name)
    suffix = " (train smoothed over %d points)" % smooth_n if smooth_n > 1 else ""
    titles = {"loss_iter": "loss" + suffix, "loss_tokens": "loss against tokens seen",
              "loss_time": "loss against wall time", "lr": "learning rate", "grad_norm": "gradient norm (before clipping)"}
    xlabels = {"loss_tokens": "tokens", "loss_time": "seconds since the first record"}
    for name, ax in axes.items():
        ax.set_title(titles.get(name, name))
        ax.set_xlabel(xlabels.get(name, "iteration"))
        ax.grid(True, alpha=0.3)
        if name in ("loss_iter", "grad_norm") and _spread(ax) > 10:
            ax.set_yscale("log")  # spikes or a long fall: keep the end of the curve readable
    axes["loss_iter"].legend(fontsize="small")  # every run, train (solid) and val (dashed)
    return fig


def _spread(ax) -> float:
    """max / min of the panel's values (0 when empty or not all positive)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata()]
    return max(ys) / min(ys) if ys and min(ys) > 0 else 0.0


def plot_runs(out_dirs: list[str], out: str | None = None, smooth_n: int = 1) -> str:
    """Draw the runs in ``out_dirs`` into one image (default ``<first out_dir>/metrics.png``),
    written atomically. Returns its path."""
    if not out_dirs:
        raise PlotError("give at least one run folder (an out_dir holding metrics.jsonl)")
    if smooth_n < 1:
        raise PlotError("--smooth must be >= 1 (1 = no smoothing); got %d" % smooth_n)
    runs = {name: load_metrics(d) for name, d in zip(run_names(out_dirs), out_dirs)}
    out = out or os.path.join(out_dirs[0], "metrics.png")
    ext = os.path.splitext(out)[1][1:].lower()
    fmt = ext if ext in FORMATS else "png"
    fig = make_figure(runs, smooth_n)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise PlotError("cannot write %s: folder %s does not exist" % (out, folder))
    tmp = "%s.tmp%d" % (out, os.getpid())
    try:
        fig.savefig(tmp, format=fmt, dpi=100)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python plot.py", description="Plot the metrics.jsonl of one or more training runs.")
    p.add_argument("out_dirs", nargs="+", metavar="out_dir", help="run folder(s) holding metrics.jsonl")
    p.add_argument("--out", help="image to write (.png; .svg and .pdf work too); default <first out_dir>/metrics.png")
    p.add_argument("--smooth", type=int, default=1, help="moving-average window over the logged train loss and grad norm (default 1: none)")
    return p


def plot(argv: list[str]) -> str:
    args = _parser().parse_args(argv)
    path = plot_runs(args.out_dirs, args.out, args.smooth)
    print("wrote %s" % path)
    return path


def main(argv: list[str] | None = None) -> None:
    run_command(plot, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
