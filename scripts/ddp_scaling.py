"""CPU training throughput: one process against two (torchrun, gloo) for the same global batch.

    python scripts/ddp_scaling.py                  # 3 repeats, 40 iterations each
    python scripts/ddp_scaling.py --repeats=2 --max_iters=30

Every repeat runs, one after the other, the same training job three ways on the CPU:

  1 process, 1 thread     OMP_NUM_THREADS=1 python train.py ... --gradient_accumulation_steps=2
  2 processes, 1 thread   OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 train.py ... (same flag)
  1 process, 2 threads    OMP_NUM_THREADS=2 python train.py ...

so each step sees 2 micro-batches of batch_size x block_size tokens in all three (two micro-steps
in one process, or one on each of two). Throughput is the median tokens/s of the log windows in
out_dir/metrics.jsonl after the first (which holds start-up); evaluations are not in it. The
Markdown table at the end gives every repeat, the medians, and the scaling efficiency of two
processes: their tokens/s over twice one process's. Extra --key=value arguments go to train.py.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64", "--batch_size=12", "--dropout=0.0"]
COMMON = ["--device=cpu", "--compile=False", "--dtype=float32", "--dataset=shakespeare_char", "--gradient_accumulation_steps=2",
          "--eval_interval=100000", "--eval_iters=1", "--log_interval=5", "--learning_rate=1e-3"]
VARIANTS = [  # name, processes, threads per process
    ("1 process, 1 thread", 1, 1),
    ("2 processes (torchrun, gloo), 1 thread each", 2, 1),
    ("1 process, 2 threads", 1, 2),
]


def prepare(data_root: str) -> None:
    try:
        from nanogpt.prepare import prepare_shakespeare_char
    except ImportError:  # a plain clone without `pip install -e .`
        sys.path.insert(0, os.path.join(ROOT, "src"))
        from nanogpt.prepare import prepare_shakespeare_char
    folder = os.path.join(data_root, "shakespeare_char")
    os.makedirs(folder)
    shutil.copyfile(os.path.join(ROOT, "data", "shakespeare_char", "input.txt"), os.path.join(folder, "input.txt"))
    prepare_shakespeare_char(folder)


def command(procs: int, args: list[str]) -> list[str]:
    if procs == 1:
        return [sys.executable, "train.py"] + args
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=%d" % procs, "train.py"] + args


def busy_cores(seconds: float = 1.0) -> float:
    """CPU cores kept busy by other work over ``seconds`` (from /proc/stat; nan elsewhere)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def steady_tokens_per_s(out_dir: str) -> float:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    train = [r["tokens_per_s"] for r in recs if r.get("kind") == "train"]
    return statistics.median(train[1:] if len(train) > 1 else train)


def main(extra: list[str]) -> None:
    repeats, max_iters = 3, 40
    for a in list(extra):
        if a.startswith("--repeats="):
            repeats = int(a.split("=", 1)[1])
            extra.remove(a)
        elif a.startswith("--max_iters="):
            max_iters = int(a.split("=", 1)[1])
            extra.remove(a)
    tmp = tempfile.mkdtemp(prefix="ddp_scaling_")
    try:
        prepare(os.path.join(tmp, "data"))
        results = {name: [] for name, _, _ in VARIANTS}
        busy = []  # cores busy with other work just before each run: it skews the figures
        for rep in range(repeats):
            for name, procs, threads in VARIANTS:
                out = os.path.join(tmp, "out_%d_%d_%d" % (rep, procs, threads))
                args = MODEL + COMMON + ["--max_iters=%d" % max_iters, "--lr_decay_iters=%d" % max_iters,
                                         "--warmup_iters=%d" % min(10, max_iters),
                                         "--data_root=%s" % os.path.join(tmp, "data"), "--out_dir=%s" % out] + extra
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                busy_now = busy_cores()
                busy.append(busy_now)
                t0 = time.time()
                r = subprocess.run(command(procs, args), cwd=ROOT, env=env, capture_output=True, text=True)
                wall = time.time() - t0
                if r.returncode != 0:
                    fd, log = tempfile.mkstemp(prefix="ddp_scaling_failure_", suffix=".log")
                    with os.fdopen(fd, "w") as f:
                        f.write(r.stdout + r.stderr)
                    sys.exit("%s failed (exit %d); its whole output is in %s" % (name, r.returncode, log))
                tok_s = steady_tokens_per_s(out)
                results[name].append((tok_s, wall))
                print("repeat %d, %s: %s tok/s (%.1f s wall; %.2f cores busy before)" % (rep + 1, name, f"{tok_s:,.0f}", wall, busy_now),
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import torch
    print("\ntorch %s, %d CPU cores, %s; cores busy with other work just before each run: %.2f to %.2f\n"
          % (torch.__version__, os.cpu_count() or 0, time.strftime("%Y-%m-%d"), min(busy), max(busy)))
    print("| run | " + " | ".join("repeat %d tok/s" % (i + 1) for i in range(repeats)) + " | median tok/s | median wall s |")
    print("| --- |" + " --- |" * (repeats + 2))
    medians = {}
    for name, rows in results.items():
        medians[name] = statistics.median(t for t, _ in rows)
        print("| %s | %s | %s | %.1f |" % (name, " | ".join(f"{t:,.0f}" for t, _ in rows), f"{medians[name]:,.0f}",
                                          statistics.median(w for _, w in rows)))
    one, two = medians[VARIANTS[0][0]], medians[VARIANTS[1][0]]
    print("\nscaling efficiency of 2 processes: %.0f%% (%.2fx one process, ideal 2x)" % (100 * two / (2 * one), two / one))


if __name__ == "__main__":
    main(sys.argv[1:])
