"""The multi-process path runs: torchrun with two CPU processes (gloo)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanogpt import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("optimizer", ["adamw", "striped_adamw"])
def test_torchrun_two_processes_train_and_checkpoint(tmp_path, optimizer):
    data = tmp_path / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    shutil.copyfile(os.path.join(ROOT, "data", "shakespeare_char", "input.txt"), data / "input.txt")
    from nanogpt.prepare import prepare_shakespeare_char
    prepare_shakespeare_char(str(data))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32",
           "--batch_size=4", "--gradient_accumulation_steps=4", "--eval_iters=2", "--eval_interval=5", "--max_iters=5",
           "--log_interval=1", "--dataset=shakespeare_char", "--data_root=%s" % (tmp_path / "data"),
           "--out_dir=%s" % (tmp_path / "out"), "--optimizer=%s" % optimizer]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("iter 4: loss") == 1  # rank 0 alone prints
    assert "2 processes x 2 micro-steps" in r.stdout
    ckpt = checkpoint.load(str(tmp_path / "out" / "ckpt.pt"))
    assert ckpt["iter_num"] == 5 and ckpt["world_size"] == 2
