"""bench.py as users run it, on a tiny model."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cli_with_profile_and_peak(tmp_path):
    r = subprocess.run([sys.executable, "bench.py", "--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2",
                        "--n_embd=32", "--block_size=32", "--batch_size=2", "--vocab_size=64", "--real_data=False",
                        "--warmup_steps=1", "--steps=3", "--profile=True", "--profile_dir=%s" % (tmp_path / "trace"),
                        "--peak_flops=1e12"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert "ms/iter" in last and "tokens/s" in last and "MFU" in last  # MFU only because peak_flops was given
    assert any(f.endswith(".json") for f in os.listdir(tmp_path / "trace"))
    r = subprocess.run([sys.executable, "bench.py", "--device=cpu", "--n_head=5"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: n_embd (768) must be divisible by n_head (5)")
