"""What a run leaves behind and reports: metrics.jsonl across a resume, numbered checkpoints,
optimizer state in its own file, a nan loss stopping the run, loss spikes, clipping counts,
per-layer statistics and the batch-size ramp."""

import json
import os
import shutil

import pytest
import torch

from nanogpt import checkpoint, metrics
from nanogpt.errors import ConfigError, UserError
from helpers import train
from nanogpt.metrics import layer_of

TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2", "--warmup_iters=2",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--dataset=shakespeare_char", "--lr_decay_iters=40"]


def tiny(data_root, out_dir, *extra):
    return TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % out_dir] + list(extra)


def test_metrics_jsonl_survives_resume_without_duplicates(data_root, tmp_path):
    common = ["--eval_interval=4", "--log_interval=2"]
    train(tiny(data_root, tmp_path / "a", *common, "--max_iters=12"))
    train(tiny(data_root, tmp_path / "b", *common, "--max_iters=8"))
    # a crash after the save at 8 leaves later lines behind; the resume must drop them
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "iter": 8, "tokens": 0, "loss": 9.9}) + "\n")
        f.write('{"kind": "train", "iter": 9, "lo')  # torn last line
    train(tiny(data_root, tmp_path / "b", *common, "--max_iters=12", "--init_from=resume"))
    a = metrics.read(str(tmp_path / "a" / "metrics.jsonl"))
    b = metrics.read(str(tmp_path / "b" / "metrics.jsonl"))
    key = [(r["kind"], r["iter"]) for r in a]
    assert key == [(r["kind"], r["iter"]) for r in b]
    assert len(set(key)) == len(key)
    assert [r["iter"] for r in a if r["kind"] == "eval"] == [0, 4, 8, 12]
    assert [r["iter"] for r in a if r["kind"] == "train"] == [0, 2, 4, 6, 8, 10]
    for ra, rb in zip(a, b):  # the resumed run repeats the straight one
        for k in ("loss", "val_loss", "tokens", "lr"):
            assert ra.get(k) == rb.get(k), (ra, rb)
    tr = [r for r in a if r["kind"] == "train"]
    assert tr[1]["tokens"] == 3 * 2 * 4 * 32  # tokens seen after iter 2
    assert {"loss", "lr", "grad_norm", "clip_frac", "ms_per_iter", "tokens_per_s", "time"} <= set(tr[0])


def test_keep_last_k_prunes_oldest(data_root, tmp_path):
    train(tiny(data_root, tmp_path, "--max_iters=8", "--eval_interval=2", "--keep_last_k=2"))
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.startswith("ckpt_")] == ["ckpt_6.pt", "ckpt_8.pt"]
    six = checkpoint.load(str(tmp_path / "ckpt_6.pt"))
    assert six["iter_num"] == 6
    # the optimizer files of the kept checkpoints, and no other
    assert sorted(n for n in names if ".optim." in n) == sorted({six["optim_file"], checkpoint.load(str(tmp_path / "ckpt.pt"))["optim_file"]})
    assert checkpoint.load_train_state(str(tmp_path / "ckpt_6.pt"), six)["iter_num"] == 6
    last = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert last["iter_num"] == 8
    for k, v in checkpoint.load(str(tmp_path / "ckpt_8.pt"))["model"].items():
        assert torch.equal(v, last["model"][k])


def test_resume_needs_the_matching_optimizer_file(data_root, tmp_path):
    train(tiny(data_root, tmp_path / "a", "--max_iters=2", "--eval_interval=2"))
    train(tiny(data_root, tmp_path / "b", "--max_iters=4", "--eval_interval=4"))
    # sampling/export read ckpt.pt alone
    model, _ = checkpoint.load_model(str(tmp_path / "a" / "ckpt.pt"))
    assert model.config.n_layer == 2
    mine = checkpoint.load(str(tmp_path / "a" / "ckpt.pt"))["optim_file"]
    other = checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))["optim_file"]
    shutil.copyfile(tmp_path / "b" / other, tmp_path / "a" / mine)
    with pytest.raises(checkpoint.CheckpointError, match="another save"):
        train(tiny(data_root, tmp_path / "a", "--max_iters=6", "--init_from=resume"))
    os.remove(tmp_path / "a" / mine)
    with pytest.raises(checkpoint.CheckpointError, match="%s is missing" % mine):
        train(tiny(data_root, tmp_path / "a", "--max_iters=6", "--init_from=resume"))


def test_format_1_checkpoint_with_inline_optimizer_still_resumes(data_root, tmp_path):
    train(tiny(data_root, tmp_path, "--max_iters=2", "--eval_interval=2"))
    w = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    o = torch.load(tmp_path / w["optim_file"], weights_only=True)
    old = dict(w, format=1, optimizer=o["optimizer"], rng=o["rng"])
    for k in ("save_id", "optim_file", "rewinds", "lr_scale"):
        old.pop(k)
    checkpoint.save(old, str(tmp_path / "ckpt.pt"))
    os.remove(tmp_path / w["optim_file"])
    s = train(tiny(data_root, tmp_path, "--max_iters=4", "--init_from=resume"))
    assert s["final_iter"] == 4


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    train(tiny(data_root, tmp_path, "--max_iters=4", "--eval_interval=2"))
    good = checkpoint.load(str(tmp_path / "ckpt.pt"))
    from nanogpt import model as model_mod
    forward = model_mod.GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] > 4:  # micro-steps of iters 4 and 5 are fine, iter 6 onwards is nan
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_mod.GPT, "forward", poisoned)
    with pytest.raises(UserError, match=r"nan/inf at iter 6; stopped without saving \(.*ckpt.pt is left as it was\)"):
        train(tiny(data_root, tmp_path, "--max_iters=12", "--eval_interval=4", "--log_interval=3", "--init_from=resume"))
    after = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert after["iter_num"] == 4 and after["save_id"] == good["save_id"]


def test_loss_spike_is_reported(data_root, tmp_path, monkeypatch, capsys):
    from nanogpt import model as model_mod
    forward = model_mod.GPT.forward
    calls = {"n": 0}

    def spiky(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in (13, 14):  # both micro-steps of iter 6
                loss = loss * 5
        return logits, loss

    monkeypatch.setattr(model_mod.GPT, "forward", spiky)
    s = train(tiny(data_root, tmp_path, "--max_iters=10", "--eval_interval=100", "--log_interval=1"))
    out = capsys.readouterr().out
    assert s["loss_spikes"] == 1 and "loss spike at iter 6" in out
    assert [r["iter"] for r in metrics.read(str(tmp_path / "metrics.jsonl")) if r.get("spike")] == [6]


def test_clipping_is_counted(data_root, tmp_path, capsys):
    s = train(tiny(data_root, tmp_path, "--max_iters=6", "--eval_interval=100", "--log_interval=3", "--grad_clip=1e-6"))
    assert s["clipped_steps"] == 6 and "gradients clipped in 6 of 6 steps" in capsys.readouterr().out
    fr = [r["clip_frac"] for r in metrics.read(str(tmp_path / "metrics.jsonl")) if r["kind"] == "train"]
    assert fr == [1.0, 1.0]
    s = train(tiny(data_root, tmp_path / "b", "--max_iters=6", "--eval_interval=100", "--grad_clip=1e9"))
    assert s["clipped_steps"] == 0


def test_layer_stats(data_root, tmp_path):
    train(tiny(data_root, tmp_path, "--max_iters=3", "--eval_interval=100", "--log_interval=2", "--log_layer_stats=True",
               "--weight_decay=0.0"))
    recs = [r for r in metrics.read(str(tmp_path / "metrics.jsonl")) if r["kind"] == "train"]
    layers = recs[0]["layers"]
    assert set(layers) == {"transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1", "transformer.ln_f"}
    # AdamW's first step moves every entry by about lr (3e-3 * 1/3 in warmup), so the ratio is that over the RMS weight
    for v in layers.values():
        assert v["grad_norm"] > 0 and v["weight_norm"] > 0 and 0 < v["update_ratio"] < 0.1
    assert layer_of("transformer.h.11.mlp.c_fc.weight") == "transformer.h.11" and layer_of("lm_head.weight") == "lm_head.weight"


def test_batch_size_ramp_grows_tokens_and_resumes_exactly(data_root, tmp_path, capsys):
    # the full step is 4 micro-steps of 4x32 = 512 tokens; ramp from one micro-step over 1,200 tokens
    ramp = ["--gradient_accumulation_steps=4", "--batch_size_ramp_tokens=1200", "--batch_size_ramp_start=128",
            "--log_interval=1", "--eval_interval=3", "--max_iters=6"]
    straight = train(tiny(data_root, tmp_path / "a", *ramp))
    steps = [r["tokens_per_step"] for r in metrics.read(str(tmp_path / "a" / "metrics.jsonl")) if r["kind"] == "train"]
    # tokens seen 0, 128, 384, 640, 1024: ceil((128 + min(1, seen/1200) * (512 - 128)) / 128) micro-steps of 128
    assert steps == [128, 256, 256, 384, 512, 512]
    assert "128 tokens/step" in capsys.readouterr().out
    assert straight["tokens_seen"] == sum(steps)
    train(tiny(data_root, tmp_path / "b", *ramp, "--max_iters=3"))
    resumed = train(tiny(data_root, tmp_path / "b", *ramp, "--init_from=resume"))
    assert resumed["tokens_seen"] == straight["tokens_seen"]
    assert [l for _, l in straight["history"]][3:] == [l for _, l in resumed["history"]]


def test_health_keys_are_checked():
    from nanogpt.train import TrainConfig
    for k, v in (("keep_last_k", -1), ("loss_spike_factor", 0.5), ("batch_size_ramp_tokens", -5)):
        with pytest.raises(ConfigError, match=k):
            (TrainConfig(**{k: v})).validate()
    with pytest.raises(ConfigError, match="batch_size_ramp_tokens"):
        (TrainConfig(batch_size_ramp_tokens=100, optimizer_in_backward=True, gradient_accumulation_steps=1,
                                   grad_clip=0.0)).validate()


def test_tensorboard_without_the_package_is_one_clear_error(data_root, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="tensorboard_log=True but tensorboard is not installed: pip install tensorboard"):
        train(tiny(data_root, tmp_path, "--max_iters=1", "--tensorboard_log=True"))


# ------------------------------------------------------------------------------------------
# unattended runs: rewinding a fault, saving by the clock, progress


def poison_iterations(monkeypatch, bad: set, factor=float("nan"), calls_per_iter: int = 2):
    """Make the training loss of the forward passes of iterations ``bad`` (counted in calls
    since the patch, ``calls_per_iter`` micro-steps each) ``loss * factor``."""
    from nanogpt import model as model_mod
    forward = model_mod.GPT.forward
    seen = {"n": 0}

    def poisoned(self, idx, targets=None, **kw):
        logits, loss = forward(self, idx, targets, **kw)
        if self.training and targets is not None:
            it = seen["n"] // calls_per_iter
            seen["n"] += 1
            if it in bad:
                loss = loss * factor
        return logits, loss

    monkeypatch.setattr(model_mod.GPT, "forward", poisoned)
    return seen


def test_a_nan_loss_is_rewound_skipped_and_logged(data_root, tmp_path, monkeypatch, capsys):
    """The 7th iteration of the run (iter 6) gets a nan loss: the run goes back to the checkpoint
    of iter 4, reads on past the batches that led there, and ends with a finite loss."""
    poison_iterations(monkeypatch, {6})
    s = train(tiny(data_root, tmp_path, "--max_iters=12", "--eval_interval=4", "--log_interval=1", "--on_loss_fault=rewind",
                   "--rewind_lr_scale=0.5"))
    out = capsys.readouterr().out
    assert "rewind 1 of 3: the loss became nan/inf at iter 6; back to iter 4" in out and "learning rate x0.5" in out
    assert s["rewinds"] == 1 and s["final_iter"] == 12 and all(x == x for _, x in s["history"])  # no nan logged
    assert s["iters"] == 12 + 3  # iterations 4, 5 and 6 ran twice
    recs = metrics.read(str(tmp_path / "metrics.jsonl"))
    rewinds = [r for r in recs if r["kind"] == "rewind"]
    assert len(rewinds) == 1 and rewinds[0]["fault_iter"] == 6 and rewinds[0]["iter"] == 4 and rewinds[0]["lr_scale"] == 0.5
    train_iters = [r["iter"] for r in recs if r["kind"] == "train"]
    assert train_iters == list(range(12))  # the rewound iterations are logged once, as run again
    ckpt = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 12 and ckpt["rewinds"] == 1 and ckpt["lr_scale"] == 0.5
    lrs = {r["iter"]: r["lr"] for r in recs if r["kind"] == "train"}
    straight = train(tiny(data_root, tmp_path / "plain", "--max_iters=12", "--eval_interval=4", "--log_interval=1"))
    plain = {r["iter"]: r["lr"] for r in metrics.read(str(tmp_path / "plain" / "metrics.jsonl")) if r["kind"] == "train"}
    assert lrs[3] == plain[3] and lrs[5] == pytest.approx(plain[5] * 0.5)
    assert straight["history"][4][1] != [x for i, x in s["history"] if i == 4][-1]  # other batches after the rewind


def test_rewinds_stop_after_max_rewinds(data_root, tmp_path, monkeypatch):
    poison_iterations(monkeypatch, set(range(4, 100)))  # every iteration after the checkpoint goes bad
    with pytest.raises(UserError, match=r"the loss became nan/inf at iter \d+ after 2 rewind\(s\) \(max_rewinds=2\): stopped"):
        train(tiny(data_root, tmp_path, "--max_iters=20", "--eval_interval=4", "--log_interval=1", "--on_loss_fault=rewind",
                   "--max_rewinds=2"))
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 4


def test_a_loss_spike_is_rewound_when_asked(data_root, tmp_path, monkeypatch, capsys):
    poison_iterations(monkeypatch, {7}, factor=50.0)
    s = train(tiny(data_root, tmp_path, "--max_iters=10", "--eval_interval=4", "--log_interval=1", "--on_loss_fault=rewind"))
    out = capsys.readouterr().out
    assert "rewind 1 of 3: a loss spike at iter 7" in out and s["rewinds"] == 1 and s["loss_spikes"] == 0


def test_no_checkpoint_to_rewind_to_is_one_line(data_root, tmp_path, monkeypatch):
    poison_iterations(monkeypatch, {1})
    with pytest.raises(UserError, match="no checkpoint has been saved to rewind to"):
        train(tiny(data_root, tmp_path, "--max_iters=10", "--eval_interval=8", "--log_interval=1", "--on_loss_fault=rewind"))


def test_saves_by_wall_time(data_root, tmp_path, monkeypatch, capsys):
    from nanogpt import train as train_mod
    clock = {"t": 1000.0}
    monkeypatch.setattr(train_mod.time, "time", lambda: clock["t"])
    from nanogpt import trainer

    real_step = trainer.train_step

    def step(*a, **k):
        clock["t"] += 7.0  # each step takes 7 "seconds"
        return real_step(*a, **k)

    monkeypatch.setattr(train_mod, "train_step", step)
    train(tiny(data_root, tmp_path, "--max_iters=7", "--eval_interval=100", "--log_interval=1", "--checkpoint_interval_s=20"))
    out = capsys.readouterr().out
    assert out.count("(20 s since the last save)") == 2  # at iters 3 and 6, after 21 s of steps each
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 7  # and the final one


def test_log_lines_show_an_eta_and_a_progress_bar_can_be_asked_for(data_root, tmp_path, capsys):
    train(tiny(data_root, tmp_path, "--max_iters=4", "--eval_interval=100", "--log_interval=1", "--progress_bar=True"))
    out = capsys.readouterr()
    lines = [ln for ln in out.out.splitlines() if ln.startswith("iter ")]
    assert all(", eta " in ln for ln in lines[:-1]) and ", eta " not in lines[-1]
    assert "4/4" in out.out + out.err  # tqdm's bar reached the end
