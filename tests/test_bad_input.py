"""No input and no fault loses data or shows a traceback: each class of bad input, through the
command line as a user meets it, gets one ``error:`` line naming the fix, and nothing is lost."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import ROOT, assert_one_line_error, run_cli, run_main, train
from nanogpt import checkpoint

TINY = ["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
        "--batch_size=2", "--gradient_accumulation_steps=1", "--eval_iters=1", "--warmup_iters=1",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--dataset=shakespeare_char", "--lr_decay_iters=100"]


def tiny(data_root, out_dir, *extra):
    return TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % out_dir] + list(extra)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A finished 4-iteration run: its out_dir."""
    out = tmp_path_factory.mktemp("run") / "out"
    train(tiny(data_root, out, "--max_iters=4", "--eval_interval=2"))
    return out


def snapshot(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder)) if not n.startswith(".")}


# ------------------------------------------------------------------------------------------
# a fresh run into an out_dir that holds a checkpoint; two runs at once


def test_a_fresh_run_does_not_replace_a_checkpoint(data_root, trained, tmp_path):
    out = tmp_path / "out"
    os.system("cp -r %s %s" % (trained, out))
    before = snapshot(out)
    r = run_cli(["train.py"] + tiny(data_root, out, "--max_iters=2"))
    assert_one_line_error(r, "already holds a checkpoint", "--init_from=resume", "--overwrite=True")
    assert snapshot(out) == before  # the run and its metrics.jsonl untouched
    r = run_cli(["train.py"] + tiny(data_root, out, "--max_iters=2", "--eval_interval=2", "--overwrite=True"))
    assert r.returncode == 0, r.stderr
    assert checkpoint.load(str(out / "ckpt.pt"))["iter_num"] == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(x)["iter"] for x in lines) == 2


def test_a_second_run_into_the_same_out_dir_refuses_and_a_dead_ones_lock_is_taken_over(data_root, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "train.py"] + tiny(data_root, out, "--max_iters=100000", "--eval_interval=50"),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("iter 0:"):
                break
        r = run_cli(["train.py"] + tiny(data_root, out, "--max_iters=100000", "--init_from=resume"))
        assert_one_line_error(r, "is in use by another run (pid %d on " % first.pid, "choose another --out_dir")
    finally:
        first.kill()  # SIGKILL: its lock file stays behind
        first.wait()
        first.stdout.close()
    assert (out / ".lock").exists()
    r = run_cli(["train.py"] + tiny(data_root, out, "--max_iters=2", "--init_from=resume" if (out / "ckpt.pt").exists()
                                    else "--overwrite=True"))
    assert r.returncode == 0 or "nothing to train" in r.stdout, r.stderr


# ------------------------------------------------------------------------------------------
# weights with nan/inf


def test_weights_with_nan_are_refused_by_every_reader(data_root, trained, tmp_path, capsys):
    out = tmp_path / "out"
    os.system("cp -r %s %s" % (trained, out))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"][3, 1] = float("nan")
    checkpoint.save(ckpt, str(out / "ckpt.pt"))
    name = "transformer.h.0.mlp.c_fc.weight"
    for cmd in (["sample.py", "--out_dir=%s" % out, "--device=cpu", "--num_samples=1", "--max_new_tokens=2",
                 "--data_root=%s" % data_root],
                ["eval.py", "--out_dir=%s" % out, "--device=cpu", "--data_root=%s" % data_root],
                ["export.py", "--out_dir=%s" % out, "--hf_dir=%s" % (tmp_path / "hf")],
                ["train.py"] + tiny(data_root, out, "--init_from=resume", "--max_iters=6")):
        r = run_cli(cmd) if cmd[0] == "eval.py" else run_main(cmd[0], cmd[1:], capsys)
        assert_one_line_error(r, "nan/inf in %s" % name, "restore an earlier checkpoint")
    assert not (tmp_path / "hf").exists()
    assert not (tmp_path / "eval.json").exists()


def test_a_hugging_face_folder_with_inf_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=50257))
    with torch.no_grad():
        hf.transformer.h[0].attn.c_attn.weight[0, 0] = float("inf")
    hf.save_pretrained(tmp_path / "hf")
    r = run_cli(["eval.py", "--init_from=%s" % (tmp_path / "hf"), "--device=cpu", "--text_file=%s" % __file__])
    assert_one_line_error(r, "nan/inf in ", "h.0.attn.c_attn.weight")


# ------------------------------------------------------------------------------------------
# config values


@pytest.mark.parametrize("arg,needle", [("--grad_clip=nan", "grad_clip must be a finite number"),
                                        ("--learning_rate=inf", "learning_rate must be a finite number"),
                                        ("--dropout=-inf", "dropout must be a finite number")])
def test_every_float_must_be_finite(data_root, tmp_path, arg, needle, capsys):
    run = run_cli(["train.py"] + tiny(data_root, tmp_path / "o", arg)) if arg.startswith("--grad_clip") else \
        run_main("train.py", tiny(data_root, tmp_path / "o", arg), capsys)
    assert_one_line_error(run, needle)
    assert not (tmp_path / "o").exists()


def test_a_config_file_with_a_nan_and_one_that_exits(data_root, tmp_path, capsys):
    (tmp_path / "c.py").write_text("weight_decay = float('nan')\n")
    assert_one_line_error(run_cli(["train.py", str(tmp_path / "c.py")] + tiny(data_root, tmp_path / "o")),
                          "weight_decay must be a finite number")
    (tmp_path / "e.py").write_text("import sys\nbatch_size = 4\nsys.exit(0)\n")
    for cmd in ("train.py", "sample.py", "bench.py"):
        assert_one_line_error(run_main(cmd, [str(tmp_path / "e.py")], capsys), "called sys.exit(0)", "remove that call")


def test_sample_eval_and_export_values(tmp_path, capsys):
    for cmd, arg, needle in (("sample.py", "--temperature=nan", "temperature must be a finite number"),
                             ("sample.py", "--top_p=1.5", "top_p must be in (0, 1]"),
                             ("eval.py", "--stride=-1", "stride must be >= 0"),
                             ("bench.py", "--eps=inf", "eps must be a finite number")):
        assert_one_line_error(run_main(cmd, [arg], capsys), needle)


# ------------------------------------------------------------------------------------------
# data on disk, checked when it is opened


def make_dataset(root, name, ids, meta, dtype=np.uint16, val=None):
    d = root / name
    d.mkdir(parents=True)
    np.array(ids, dtype=dtype).tofile(d / "train.bin")
    np.array(ids if val is None else val, dtype=dtype).tofile(d / "val.bin")
    if meta is not None:
        (d / "meta.json").write_text(json.dumps(meta) if not isinstance(meta, str) else meta)
    return d


def test_meta_json_and_token_files_are_checked_at_open(tmp_path, capsys):
    ids = [1, 2, 3] * 100
    good = {"vocab_size": 10, "dtype": "uint16"}
    cases = [
        ("vocab_str", dict(good, vocab_size="10"), "'vocab_size' must be a positive integer"),
        ("vocab_zero", dict(good, vocab_size=0), "'vocab_size' must be a positive integer"),
        ("dtype", dict(good, dtype="int8"), "'dtype' must be 'uint16' or 'uint32'"),
        ("wide", dict(good, vocab_size=70000), "'dtype' must be uint32 for a vocabulary of 70000 ids"),
        ("count", dict(good, train_tokens=-5), "'train_tokens' must be a non-negative integer"),
        ("eot", dict(good, eot_token=99), "'eot_token' must be a token id below vocab_size"),
        ("tables", dict(good, stoi={"a": 0}), "has stoi without itos"),
        ("mismatch", dict(good, stoi={"a": 0, "b": 1}, itos={"0": "a", "1": "c"}), "stoi['b'] = 1 does not match itos"),
        ("list", [1, 2], "holds a list, not a dict"),
        ("notjson", "{oops", "is not valid JSON"),
        ("short", dict(good, train_tokens=299), "holds 300 tokens but meta.json says 299"),
    ]
    for k, (name, meta, needle) in enumerate(cases):
        make_dataset(tmp_path, name, ids, meta)
        args = tiny(tmp_path, tmp_path / ("o_" + name), "--dataset=%s" % name, "--max_iters=1")
        r = run_cli(["train.py"] + args) if k == 0 else run_main("train.py", args, capsys)
        assert_one_line_error(r, needle, "prepare the dataset again")
        assert not (tmp_path / ("o_" + name)).exists()  # a failed start leaves no folder behind
    d = make_dataset(tmp_path, "odd", ids, good)
    with open(d / "train.bin", "ab") as f:
        f.write(b"\x01")  # half a token: cut short, or another dtype
    r = run_main("train.py", tiny(tmp_path, tmp_path / "o", "--dataset=odd", "--max_iters=1"), capsys)
    assert_one_line_error(r, "601 bytes, not a whole number of uint16 tokens")


def test_checkpoint_entries_are_checked(data_root, trained, tmp_path, capsys):
    for name, change, needle in (
            ("unknown", lambda c: c["model_args"].update(sliding_window=4), "unknown model setting 'sliding_window'"),
            ("type", lambda c: c["model_args"].update(n_layer="1"), "n_layer expects int"),
            ("range", lambda c: c["model_args"].update(n_head=0), "n_head must be > 0"),
            ("entry", lambda c: c["model"].update(extra=[1, 2]), "'model' must map weight names to tensors"),
            ("iter", lambda c: c.update(iter_num=-3), "'iter_num' must be a non-negative integer")):
        out = tmp_path / name
        os.system("cp -r %s %s" % (trained, out))
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)
        change(ckpt)
        checkpoint.save(ckpt, str(out / "ckpt.pt"))
        before = snapshot(out)
        for cmd in (["sample.py", "--out_dir=%s" % out, "--device=cpu", "--num_samples=1", "--max_new_tokens=1"],
                    ["train.py"] + tiny(data_root, out, "--init_from=resume", "--max_iters=6")):
            r = run_cli(cmd) if name == "unknown" else run_main(cmd[0], cmd[1:], capsys)
            assert_one_line_error(r, needle)
        assert snapshot(out) == before


# ------------------------------------------------------------------------------------------
# paths, checked before any work starts


def test_paths_of_the_wrong_kind(data_root, trained, tmp_path, capsys):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["eval.py", "--out_dir=%s" % trained, "--text_file=%s" % folder], "text_file=%r is a folder" % str(folder)),
        (["eval.py", "--out_dir=%s" % trained, "--text_file=%s" % binary], "is not UTF-8 text (it looks binary)"),
        (["eval.py", "--out_dir=%s" % trained, "--hellaswag=%s" % binary], "hellaswag=%r is not UTF-8 text" % str(binary)),
        (["eval.py", "--out_dir=%s" % trained, "--json_out=%s" % folder], "json_out=%r is a folder" % str(folder)),
        (["eval.py", "--out_dir=%s" % trained, "--mirror=%s" % a_file], "mirror=%r is a file; give a folder" % str(a_file)),
        (["sample.py", "--out_dir=%s" % trained, "--start=FILE:%s" % folder], "is a folder; give a file"),
        (["sample.py", "--out_dir=%s" % trained, "--start=FILE:%s" % binary], "is not UTF-8 text"),
        (["sample.py", "--init_from=%s" % a_file], "init_from=%r is a file" % str(a_file)),
        (["sample.py", "--init_from=%s" % folder], "has no config.json"),
        (["export.py", "--out_dir=%s" % trained, "--hf_dir=%s" % a_file], "hf_dir=%r is a file, not a folder" % str(a_file)),
        (["train.py"] + tiny(data_root, a_file), "out_dir=%r is a file, not a folder" % str(a_file)),
        (["train.py"] + tiny(data_root, a_file / "sub"), "is not writable"),
        (["train.py", str(folder)], "config file %r is a folder" % str(folder)),
        (["train.py", str(binary)], "is not Python text"),
        (["-m", "nanogpt.cli", "prepare", "corpus", "--source=%s" % binary, "--out_dir=%s" % (tmp_path / "p")], "not UTF-8"),
        (["-m", "nanogpt.cli", "prepare", "corpus", "--source=%s" % folder, "--out_dir=%s" % (tmp_path / "p")], "no .txt, .jsonl"),
        (["-m", "nanogpt.cli", "prepare", "corpus", "--source=%s" % folder, "--out_dir=%s" % a_file], "out_dir=%r is a file" % str(a_file)),
    ]
    for k, (cmd, needle) in enumerate(cases):
        if cmd[0] == "-m":
            cmd = cmd[2:]
        assert_one_line_error(run_cli(cmd) if k == 0 else run_main(cmd[0], cmd[1:], capsys), needle)
    assert not (tmp_path / "p").exists()  # a failed preparation leaves no folder behind
    assert a_file.read_text() == "x" and os.listdir(folder) == []


# ------------------------------------------------------------------------------------------
# signals at any moment


def start(args, **kw):
    return subprocess.Popen([sys.executable] + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), **kw)


def wait_for(p, text: str) -> list[str]:
    seen = []
    for line in p.stdout:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError("never printed %r: %s %s" % (text, "".join(seen), p.stderr.read()))


def test_a_signal_before_training_starts_ends_at_once(data_root, tmp_path):
    """SIGINT while the model is being built: one line, status 130, nothing written."""
    code = ("import os, signal, sys, time; sys.path.insert(0, 'src'); import nanogpt.trainer as t; real = t.build_model\n"
            "def slow(*a, **k):\n    print('building', flush=True); time.sleep(30); return real(*a, **k)\n"
            "import nanogpt.train as tr; tr.build_model = slow; tr.main(sys.argv[1:])")
    p = start(["-c", code] + tiny(data_root, tmp_path / "o", "--max_iters=5"))
    wait_for(p, "building")
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGINT and time.time() - t0 < 5
    assert err.strip() == "error: stopped by SIGINT before training started; nothing was written", err
    assert not (tmp_path / "o").exists()


def test_a_signal_during_a_long_evaluation_saves_within_seconds(data_root, tmp_path):
    """A million evaluation batches: SIGTERM during them stops the evaluation, saves and leaves."""
    p = start(["train.py"] + tiny(data_root, tmp_path, "--max_iters=100", "--eval_interval=50", "--eval_iters=1000000"))
    wait_for(p, "evaluating train and val loss")
    time.sleep(0.5)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and time.time() - t0 < 10, err
    assert "caught a stop signal at iter 0" in out and err == ""
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 0


def test_a_signal_in_the_middle_of_a_long_step_stops_at_once_and_resumes_exactly(data_root, tmp_path):
    """300 micro-steps a step: SIGTERM during step 1 drops that step, saves the state before it,
    and a resume ends with the weights of an uninterrupted run."""
    common = ["--gradient_accumulation_steps=300", "--max_iters=3", "--eval_interval=100", "--log_interval=1", "--dropout=0.1"]
    straight = train(tiny(data_root, tmp_path / "a", *common))
    p = start(["train.py"] + tiny(data_root, tmp_path / "b", *common, "--max_iters=3"))
    wait_for(p, "iter 0:")
    time.sleep(0.3)
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and time.time() - t0 < 3, err
    assert "caught a stop signal at iter 1" in out
    assert checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))["iter_num"] == 1
    resumed = train(tiny(data_root, tmp_path / "b", *common, "--init_from=resume"))
    assert resumed["history"] == straight["history"][1:]
    a, b = checkpoint.load(str(tmp_path / "a" / "ckpt.pt")), checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_second_ctrl_c_leaves_at_once_and_keeps_the_last_checkpoint(data_root, tmp_path):
    p = start(["train.py"] + tiny(data_root, tmp_path, "--max_iters=100", "--eval_interval=4", "--log_interval=1",
                                  "--always_save_checkpoint=False"))
    wait_for(p, "iter 5:")
    kept = (tmp_path / "ckpt.pt").read_bytes()
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode in (128 + signal.SIGINT, 2) and "Traceback" not in err, err
    assert err.count("\n") <= 1
    assert (tmp_path / "ckpt.pt").read_bytes() == kept or checkpoint.load(str(tmp_path / "ckpt.pt"))["iter_num"] >= 4
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


# ------------------------------------------------------------------------------------------
# the rest


def test_a_resume_at_max_iters_says_so_and_changes_nothing(data_root, trained):
    before = snapshot(trained)
    r = run_cli(["train.py"] + tiny(data_root, trained, "--init_from=resume", "--max_iters=4"))
    assert r.returncode == 0, r.stderr
    assert "nothing to train: the checkpoint in %s is at iter 4 and max_iters is 4; raise --max_iters" % trained in r.stdout
    assert snapshot(trained) == before


def test_a_failed_prepare_leaves_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "new" / "data"
    r = run_cli(["-m", "nanogpt.cli", "prepare", "corpus", "--source=%s" % (tmp_path / "empty"), "--out_dir=%s" % out])
    assert_one_line_error(r, "no .txt, .jsonl, .json, .jsonl.gz, .jsonl.zst or .parquet files")
    assert not out.exists()
