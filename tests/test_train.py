"""The training loop as users run it: loss goes down, resume is bit-exact, checkpoints are safe,
and bad input gets one clear line."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanogpt import checkpoint
from nanogpt.errors import ConfigError
from nanogpt.runtime import resolve_dtype
from helpers import assert_one_line_error, run_cli, run_main, train
from nanogpt.optim import get_lr as lr_at
from nanogpt.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2", "--warmup_iters=5",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--dataset=shakespeare_char"]


def tiny(data_root, out_dir, *extra):
    return TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % out_dir] + list(extra)


def test_loss_goes_down(data_root, tmp_path):
    s = train(tiny(data_root, tmp_path, "--max_iters=300", "--lr_decay_iters=300", "--eval_interval=300", "--log_interval=50",
                   "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_iters=10"))
    losses = [l for _, l in s["history"]]
    assert losses[0] > 4.0  # about ln(65) at the start
    assert losses[-1] < losses[0] - 1.0
    assert s["last_val_loss"] < 2.85 # character bigrams and more: well under the unigram entropy (~3.3)


def test_resume_is_bit_exact(data_root, tmp_path):
    """40 iterations straight through equal 20, a resume, and 20 more: every logged loss and
    every final weight, with dropout on (so the RNG state matters). The straight run reads its
    batches in the loop, the other two read ahead in the background by different amounts."""
    common = ["--max_iters=40", "--lr_decay_iters=40", "--eval_interval=20", "--log_interval=1", "--dropout=0.1"]
    straight = train(tiny(data_root, tmp_path / "a", *common, "--prefetch=0"))
    first = train(tiny(data_root, tmp_path / "b", *common, "--max_iters=20", "--prefetch=2"))
    second = train(tiny(data_root, tmp_path / "b", *common, "--init_from=resume", "--prefetch=5"))
    assert [i for i, _ in straight["history"]] == list(range(40))
    assert first["history"] + second["history"] == straight["history"]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_checkpoint_contents(data_root, tmp_path, monkeypatch):
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="eager"))  # the wrapper, without codegen time
    train(tiny(data_root, tmp_path, "--max_iters=4", "--eval_interval=2", "--compile=True"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain types only
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["iter_num"] == 4 and ckpt["config"]["n_layer"] == 2 and ckpt["model_args"]["vocab_size"] == 65
    assert "optimizer" not in ckpt and "rng" not in ckpt  # weights only: what sampling and export read
    assert ckpt["optim_file"] == "ckpt.optim.%s.pt" % ckpt["save_id"]  # the optimizer file this save committed
    assert sorted(os.listdir(tmp_path)) == ["ckpt.optim.%s.pt" % ckpt["save_id"], "ckpt.pt", "metrics.jsonl"]
    opt = torch.load(tmp_path / ckpt["optim_file"], weights_only=True)
    assert {"python", "numpy", "torch", "loader"} <= set(opt["rng"])
    assert "state" in opt["optimizer"] and opt["save_id"] == ckpt["save_id"] and opt["iter_num"] == 4
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"model": {"w": torch.ones(3)}, "model_args": {}, "iter_num": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"model": {}, "model_args": {}, "iter_num": 2}, path)
    assert checkpoint.load(path)["iter_num"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_sigterm_saves_and_resumes(data_root, tmp_path):
    args = ["train.py"] + tiny(data_root, tmp_path, "--max_iters=100000", "--lr_decay_iters=100000", "--eval_interval=100000", "--log_interval=1")
    p = subprocess.Popen([sys.executable] + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in p.stdout:
        if line.startswith("iter 5:"):
            break
    p.send_signal(signal.SIGTERM)
    out = p.stdout.read()
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    assert "saved checkpoint" in out
    ckpt = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] >= 6
    s = train(tiny(data_root, tmp_path, "--init_from=resume", "--max_iters=%d" % (ckpt["iter_num"] + 2),
                   "--lr_decay_iters=100000", "--eval_interval=100000"))
    assert s["iters"] == 2


def test_eval_only(data_root, tmp_path):
    train(tiny(data_root, tmp_path, "--max_iters=2", "--eval_interval=2"))
    s = train(tiny(data_root, tmp_path, "--init_from=resume", "--eval_only=True"))
    assert s["iters"] == 0 and s["last_val_loss"] is not None


def test_finetune_from_local_hugging_face_folder(data_root, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=80)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    s = train(tiny(data_root, tmp_path / "out", "--init_from=%s" % (tmp_path / "hf"), "--max_iters=3",
                   "--eval_interval=3", "--dropout=0.0"))
    assert s["iters"] == 3
    ckpt = checkpoint.load(str(tmp_path / "out" / "ckpt.pt"))
    assert ckpt["model_args"]["block_size"] == 32 and ckpt["model_args"]["bias"] is True  # cropped, GPT-2 shape


def test_lr_schedule():
    def get_lr(it, cfg):
        return lr_at(it, cfg.schedule, cfg.learning_rate)
    c = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert get_lr(0, c) < get_lr(5, c) < get_lr(9, c) <= 1.0
    assert get_lr(10, c) == pytest.approx(1.0)
    assert get_lr(60, c) == pytest.approx(0.55)
    assert get_lr(110, c) == get_lr(5000, c) == 0.1
    assert get_lr(77, TrainConfig(decay_lr=False, learning_rate=0.3)) == 0.3


def test_bf16_refused_where_unsupported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError, match="bfloat16.*--dtype=float16"):
        resolve_dtype("bfloat16", "cuda")
    assert resolve_dtype("auto", "cuda") == "float16"
    assert resolve_dtype("auto", "cpu") == "float32"


# ------------------------------------------------------------------------------------------
# bad input through the CLI: exit status 2, one line on stderr naming the fix, nothing written


def make_dataset(root, name, train_ids, val_ids=None, meta=None, dtype=np.uint16):
    d = root / name
    d.mkdir(parents=True)
    np.array(train_ids, dtype=dtype).tofile(d / "train.bin")
    np.array(val_ids if val_ids is not None else train_ids, dtype=dtype).tofile(d / "val.bin")
    if meta:
        (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    make_dataset(root, "empty", [])
    make_dataset(root, "short", list(range(10)))
    make_dataset(root, "bigids", [3, 999] * 200)
    make_dataset(root, "bigmeta", [1, 2] * 200, meta={"vocab_size": 1000, "max_token_id": 999})
    return root


def test_cli_bad_input(data_root, bad_data, tmp_path, capsys):
    base = ["train.py"] + TINY[:-1] + ["--max_iters=2", "--out_dir=%s" % (tmp_path / "o")]
    cases = [
        (["--data_root=%s" % bad_data, "--dataset=nothere"], ["'nothere' not found", "prepare"]),
        (["--data_root=%s" % bad_data, "--dataset=empty"], ["empty", "prepare"]),
        (["--data_root=%s" % bad_data, "--dataset=short"], ["fewer than block_size + 1 = 33", "--block_size"]),
        (["--data_root=%s" % bad_data, "--dataset=bigids", "--vocab_size=50"], ["token id 999", "vocab_size is 50"]),
        (["--data_root=%s" % bad_data, "--dataset=bigmeta", "--vocab_size=64"], ["token id 999", "vocab_size"]),
        (["--data_root=%s" % data_root, "--dataset=shakespeare_char", "--n_layres=3"], ["unknown config key 'n_layres'", "n_layer"]),
        (["config/no_such_config.py"], ["config file 'config/no_such_config.py' not found"]),
        (["--data_root=%s" % data_root, "--dataset=shakespeare_char", "--init_from=resume"], ["no checkpoint at", "--init_from=scratch"]),
        (["--data_root=%s" % data_root, "--dataset=shakespeare_char", "--device=cuda"], ["CUDA is not available", "--device=cpu"]),
        (["--data_root=%s" % data_root, "--dataset=shakespeare_char", "--warmup_iters=100", "--lr_decay_iters=10"], ["warmup_iters (100)"]),
    ]
    for k, (extra, needles) in enumerate(cases):  # the first as a user runs it, the rest through the same main()
        assert_one_line_error(run_cli(base + extra) if k == 0 else run_main(base[0], base[1:] + extra, capsys), *needles)
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_cli_unwritable_out_dir(data_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run_cli(["train.py"] + tiny(data_root, blocker / "out", "--max_iters=1"))
    assert_one_line_error(r, "not writable", "--out_dir")


def test_cli_checkpoint_problems(data_root, tmp_path):
    out = tmp_path / "o"
    r = run_cli(["train.py"] + tiny(data_root, out, "--max_iters=2", "--eval_interval=2"))
    assert r.returncode == 0, r.stderr
    good = (out / "ckpt.pt").read_bytes()
    # the model shape on the command line disagrees with the checkpoint
    r = run_cli(["train.py"] + tiny(data_root, out, "--init_from=resume", "--n_layer=3", "--max_iters=4"))
    assert_one_line_error(r, "n_layer=3 disagrees", "n_layer=2")
    # truncated, then garbage
    for bad in (good[: len(good) // 2], b"garbage" * 100):
        (out / "ckpt.pt").write_bytes(bad)
        r = run_cli(["train.py"] + tiny(data_root, out, "--init_from=resume", "--max_iters=4"))
        assert_one_line_error(r, "truncated or corrupt")
        assert (out / "ckpt.pt").read_bytes() == bad  # left for the user to inspect, not overwritten


def test_cli_train_then_sample(data_root, tmp_path):
    """The main job as a user runs it: train.py, then sample.py on the checkpoint."""
    r = run_cli(["train.py"] + tiny(data_root, tmp_path, "--max_iters=20", "--eval_interval=10", "--log_interval=5"))
    assert r.returncode == 0, r.stderr
    assert "iter 15: loss" in r.stdout and "tok/s" in r.stdout and "done: 20 iterations" in r.stdout
    assert "mfu" not in r.stdout  # no MFU on CPU unless peak_flops is given
    r = run_cli(["sample.py", "--out_dir=%s" % tmp_path, "--device=cpu", "--num_samples=2", "--max_new_tokens=30",
                 "--start=ROMEO:", "--data_root=%s" % data_root])
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ROMEO:") == 2 and r.stdout.count("---------------") == 2
    (tmp_path / "prompt.txt").write_text("JULIET:")
    r = run_cli(["sample.py", "--out_dir=%s" % tmp_path, "--device=cpu", "--num_samples=1", "--max_new_tokens=5",
                 "--start=FILE:%s" % (tmp_path / "prompt.txt"), "--data_root=%s" % data_root, "--temperature=0"])
    assert r.returncode == 0 and r.stdout.startswith("JULIET:"), r.stderr
    r = run_cli(["sample.py", "--out_dir=%s" % tmp_path, "--device=cpu", "--start=FILE:/no/such/prompt.txt"])
    assert_one_line_error(r, "/no/such/prompt.txt", "does not exist")
    r = run_cli(["sample.py", "--out_dir=%s" % tmp_path, "--device=cpu", "--start=a{b", "--data_root=%s" % data_root])
    assert_one_line_error(r, "outside the dataset's 65-character vocabulary", "'{'")


def test_cpu_threads_follow_the_idle_cores(monkeypatch):
    """threads=0 counts the cores other processes keep busy over the setup window; a quota caps
    the count; OMP_NUM_THREADS and an explicit --threads are kept."""
    from nanogpt import runtime
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "_allowed_cpus", lambda: [0, 1])
    monkeypatch.setattr(runtime, "_cpu_quota", lambda: None)
    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    readings = iter([(0, 0, 0), (100 + 10, 200, 10)])  # 100 ticks of 200 busy outside this process: one core
    monkeypatch.setattr(runtime, "_cpu_ticks", lambda cpus: next(readings))
    lines = []
    t = runtime.CpuThreads(0, "cpu")
    t.start()
    assert t.settle(lines.append) == 1 and set_to == [1]
    assert lines == ["cpu threads: 1 (1.0 of 2 cores busy with other processes); --threads=N chooses"]
    readings = iter([(0, 0, 0), (10, 200, 10)])  # idle: both cores, nothing said
    monkeypatch.setattr(runtime, "_cpu_ticks", lambda cpus: next(readings))
    lines.clear()
    t = runtime.CpuThreads(0, "cpu")
    t.start()
    assert t.settle(lines.append) == 2 and lines == []
    monkeypatch.setattr(runtime, "_cpu_quota", lambda: 1.5)
    readings = iter([(0, 0, 0), (0, 200, 0)])
    t = runtime.CpuThreads(0, "cpu")
    t.start()
    assert t.settle(lines.append) == 1 and "a CPU quota of 1.50 cores" in lines[0]
    set_to.clear()
    t = runtime.CpuThreads(3, "cpu")
    t.start()
    assert t.settle() == 3 and set_to == [3]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    t = runtime.CpuThreads(0, "cpu")
    t.start()
    assert t.settle() is None  # the user's choice stands
    assert runtime.CpuThreads(0, "cuda").settle() is None  # not the CPU's work
