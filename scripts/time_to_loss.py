"""Wall time to a target val loss, for training commands run one after the other on one machine.

Each run is "label|folder|command". The command runs in that folder with ``--out_dir`` pointing
into a fresh temporary folder. Every printed "step N: train loss X, val loss Y" line (this
project's and nanoGPT's format) is stamped with the seconds since the process started, so the
time includes start-up, compilation and evaluation, as a user waits for it.

    python scripts/time_to_loss.py --target=1.90 --rounds=2 --plot=docs/cpu_time_to_loss.png \\
        --run "reference|path/to/nanoGPT|python train.py config/train_shakespeare_char.py --device=cpu ..." \\
        --run "ours|.|python train.py config/train_shakespeare_char_cpu.py"

Prints a markdown table: wall time, the first evaluation at or below the target (seconds from
process start, and step), and the best val loss. ``--json`` keeps every curve.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

EVAL = re.compile(r"^step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)")


def run_once(label: str, folder: str, command: str, out_dir: str, log_path: str) -> dict:
    argv = shlex.split(command) + ["--out_dir=%s" % out_dir]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.monotonic()
    curve = []
    with open(log_path, "w") as log:
        p = subprocess.Popen(argv, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in p.stdout:
            t = time.monotonic() - start
            log.write(line)
            m = EVAL.match(line)
            if m:
                curve.append({"seconds": round(t, 2), "step": int(m.group(1)), "train": float(m.group(2)),
                              "val": float(m.group(3))})
        rc = p.wait()
    wall = time.monotonic() - start
    if rc != 0:
        sys.exit("%s exited with status %d; its output is in %s" % (label, rc, log_path))
    return {"label": label, "command": command, "wall_s": round(wall, 2), "curve": curve}


def summary(run: dict, target: float | None) -> dict:
    curve = run["curve"]
    best = min(curve, key=lambda e: e["val"]) if curve else None
    hit = next((e for e in curve if target is not None and e["val"] <= target), None)
    return {"wall_s": run["wall_s"], "best_val": best and best["val"], "best_step": best and best["step"],
            "hit_s": hit and hit["seconds"], "hit_step": hit and hit["step"], "final_val": curve[-1]["val"] if curve else None}


def plot(runs: list[dict], target: float | None, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    colors = {}
    for run in runs:
        first = run["label"] not in colors  # one legend entry per label, whatever the rounds
        c = colors.setdefault(run["label"], "C%d" % len(colors))
        xs = [e["seconds"] for e in run["curve"]]
        ys = [e["val"] for e in run["curve"]]
        ax.plot(xs, ys, marker="o", ms=3, color=c, label=run["label"] if first else None)
        ax.axvline(run["wall_s"], color=c, lw=0.8, ls=":")
    if target is not None:
        ax.axhline(target, color="gray", lw=0.8, ls="--", label="target %.2f" % target)
    ax.set_xlabel("seconds since the process started (dotted: exit)")
    ax.set_ylabel("val loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="LABEL|FOLDER|COMMAND")
    ap.add_argument("--target", type=float, default=None, help="val loss to reach")
    ap.add_argument("--rounds", type=int, default=1, help="run every command this many times, interleaved")
    ap.add_argument("--plot", default=None, help="write val loss against wall time to this image")
    ap.add_argument("--json", default=None, help="write every curve to this file")
    args = ap.parse_args()
    specs = []
    for spec in args.run:
        parts = spec.split("|", 2)
        if len(parts) != 3 or not os.path.isdir(parts[1]):
            sys.exit("--run must look like 'label|existing folder|command'; got %r" % spec)
        specs.append(parts)
    work = tempfile.mkdtemp(prefix="time_to_loss-")
    runs = []
    for r in range(1, args.rounds + 1):
        for label, folder, command in specs:
            name = "%s-%d" % (re.sub(r"\W+", "_", label), r)
            run = run_once(label, folder, command, os.path.join(work, name), os.path.join(work, name + ".log"))
            run["round"] = r
            runs.append(run)
            s = summary(run, args.target)
            print("round %d %-12s %6.1f s, best val %s, target reached at %s" % (
                r, label, s["wall_s"], s["best_val"], "%.1f s (step %d)" % (s["hit_s"], s["hit_step"]) if s["hit_s"] else "-"),
                flush=True)
    print("\n| run | round | wall time | val <= %s at | best val (step) | final val |" % args.target)
    print("| --- | --- | --- | --- | --- | --- |")
    for run in runs:
        s = summary(run, args.target)
        hit = "%.1f s (step %d)" % (s["hit_s"], s["hit_step"]) if s["hit_s"] is not None else "not reached"
        print("| %s | %d | %.1f s | %s | %s (%s) | %s |" % (run["label"], run["round"], s["wall_s"], hit, s["best_val"],
                                                          s["best_step"], s["final_val"]))
    print("\nlogs and checkpoints: %s" % work)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": args.target, "runs": runs}, f, indent=1)
    if args.plot:
        plot(runs, args.target, args.plot)
        print("wrote %s" % args.plot)


if __name__ == "__main__":
    main()
