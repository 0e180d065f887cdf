"""The measuring scripts as a user runs them, on tiny settings."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_time_to_loss_stamps_each_evaluation(data_root, tmp_path):
    tiny = ("%s train.py --device=cpu --compile=False --n_layer=1 --n_head=2 --n_embd=16 --block_size=16 "
            "--batch_size=4 --gradient_accumulation_steps=1 --eval_iters=2 --eval_interval=5 --max_iters=10 "
            "--lr_decay_iters=10 --warmup_iters=1 --learning_rate=1e-2 --dataset=shakespeare_char --data_root=%s" % (sys.executable, data_root))
    out = tmp_path / "curves.json"
    r = subprocess.run([sys.executable, "scripts/time_to_loss.py", "--target=9", "--rounds=2", "--json=%s" % out,
                        "--run", "a|%s|%s" % (ROOT, tiny), "--run", "b|%s|%s --learning_rate=1e-3" % (ROOT, tiny)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [(x["label"], x["round"]) for x in runs] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    for run in runs:
        steps = [e["step"] for e in run["curve"]]
        secs = [e["seconds"] for e in run["curve"]]
        assert steps == [0, 5, 10]
        assert secs == sorted(secs) and 0 < secs[-1] <= run["wall_s"]
    assert [e["val"] for e in runs[0]["curve"]] == [e["val"] for e in runs[2]["curve"]]  # the same run, again
    assert "| a | 1 |" in r.stdout and "(step 0)" in r.stdout  # 9 nats: reached at the first evaluation
    bad = subprocess.run([sys.executable, "scripts/time_to_loss.py", "--run", "a|/no/such/folder|python x.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "label|existing folder|command" in bad.stderr


def test_whole_split_loss_agrees_with_eval(data_root, tmp_path):
    """The script's windows are eval.py's with stride = window: the same loss."""
    from helpers import evaluate as run_eval
    from helpers import train
    out = tmp_path / "out"
    train(["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
           "--gradient_accumulation_steps=1", "--eval_iters=1", "--eval_interval=3", "--max_iters=3", "--lr_decay_iters=3",
           "--warmup_iters=1", "--rope=True", "--dataset=shakespeare_char", "--data_root=%s" % data_root, "--out_dir=%s" % out])
    val = data_root / "shakespeare_char" / "val.bin"
    r = subprocess.run([sys.executable, "scripts/whole_split_loss.py", str(out), str(val)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loss, scored = r.stdout.split()[0], int(r.stdout.split("(")[1].split()[0])
    want = run_eval(["--out_dir=%s" % out, "--data_root=%s" % data_root, "--device=cpu"])["perplexity"]
    assert float(loss) == pytest.approx(want["loss"], abs=1e-4) and scored == want["tokens"]


@pytest.mark.parametrize("script", ["time_to_loss.py", "whole_split_loss.py", "loss_memory.py", "serve_bench.py"])
def test_scripts_explain_themselves(script):
    r = subprocess.run([sys.executable, os.path.join("scripts", script), "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "usage" in r.stdout


def test_loss_memory_runs_every_variant():
    r = subprocess.run([sys.executable, "scripts/loss_memory.py", "--batch_size=2", "--block_size=32", "--vocab_size=300",
                        "--n_layer=1", "--n_head=2", "--n_embd=32", "--chunks=16", "--steps=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| full") or line.startswith("| chunk")]
    assert [c[0].strip() for c in rows] == ["full", "chunk=16"]
    assert rows[0][1] == rows[1][1]  # the same loss to 4 decimals


def test_bench_levers_runs_each_row_and_reports_failures(tmp_path):
    common = ("--device=cpu --compile=False --n_layer=1 --n_head=2 --n_embd=32 --block_size=32 --batch_size=2 "
              "--vocab_size=64 --warmup_steps=1 --dtype=float32")
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "scripts/bench_levers.py", "--rows=baseline,fp8,loss_chunk", "--steps=1",
                        "--json=%s" % out, "--common=%s" % common], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    assert [x["label"] for x in rows] == ["baseline", "fp8", "loss_chunk"]
    assert all(x["tok_s"] > 0 and x["tokens_per_iter"] == 64 for x in rows)
    assert rows[0]["loss"] == pytest.approx(rows[2]["loss"], abs=1e-4)  # the same step, the loss in chunks
    assert "| fp8 | `--fp8=True` |" in r.stdout
    bad = subprocess.run([sys.executable, "scripts/bench_levers.py", "--rows=baseline", "--steps=1",
                          "--common=%s --n_head=3" % common], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 0 and "failed: error: n_embd (32) must be divisible by n_head (3)" in bad.stdout
