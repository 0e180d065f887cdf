"""LoRA: the adapter's arithmetic, a frozen base, adapter-only checkpoints that name their base,
bit-exact resume, merging (and the Hugging Face export of the merged model), and bad input."""

import io
import os

import pytest
import torch
import torch.nn as nn

from helpers import bench, export, run_main, train
from nanogpt import checkpoint, lora
from nanogpt.errors import ConfigError
from nanogpt.model import GPT, GPTConfig
from nanogpt.optim import build_optimizer

TINY = ["--device=cpu", "--compile=False", "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=1",
        "--eval_iters=2", "--warmup_iters=2", "--learning_rate=1e-2", "--min_lr=1e-3", "--dataset=shakespeare_char",
        "--log_interval=1"]


@pytest.fixture(autouse=True)
def one_thread():
    """The unit tests' models are tiny: a second thread only waits for the first (and on a busy
    machine much longer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny randomly initialised GPT2LMHeadModel (the character vocabulary's 65 ids), as
    save_pretrained writes it: the base the adapters train on."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=65, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(folder))
    return folder


def tiny(data_root, base_dir, out_dir, *extra):
    return TINY + ["--data_root=%s" % data_root, "--init_from=%s" % base_dir, "--out_dir=%s" % out_dir, "--lora_rank=4"] + list(extra)


def small_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**dict(dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32), **kw)))


def randomise_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# ------------------------------------------------------------------------------------------
# the arithmetic


def test_forward_is_wx_plus_scaled_bax_by_hand():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = lora.LoRALinear(base, rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    W, b = base.weight.double(), base.bias.double()
    A, B = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    want = x @ W.T + b + (6.0 / 3) * (x @ A.T @ B.T)
    got = layer.double()(x)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert layer.weight is base.weight and not layer.weight.requires_grad and not layer.bias.requires_grad


def test_dropout_reaches_only_the_adapter_input():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = lora.LoRALinear(nn.Linear(8, 8), rank=2, alpha=2.0, dropout=0.5)
    layer.weight, layer.bias = base.weight, base.bias  # the same frozen path
    x = torch.randn(4, 8)
    assert torch.equal(layer.train()(x), base(x))  # B = 0: whatever the dropout drops, the output is the base's


def test_with_b_zero_the_model_equals_its_base_exactly():
    model = small_gpt().eval()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(idx)[0]
    n = lora.apply(model, 4, 16.0, 0.0, "all", {"kind": "gpt2", "name": "gpt2"})
    assert n == 8
    assert torch.equal(model(idx)[0], before)


def test_targets_select_layers_and_only_adapters_train():
    assert lora.targets("attn") == ("attn.c_attn", "attn.c_proj")
    assert lora.targets("c_proj") == ("attn.c_proj", "mlp.c_proj")
    assert lora.targets("c_attn, mlp.c_fc") == ("attn.c_attn", "mlp.c_fc")
    model = small_gpt()
    lora.apply(model, 2, 4.0, 0.0, "mlp", {"kind": "gpt2", "name": "gpt2"})
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trained) == sorted("transformer.h.%d.mlp.%s.lora_%s" % (i, layer, m)
                                     for i in range(2) for layer in ("c_fc", "c_proj") for m in "AB")
    for bad in ("", "lm_head", "attn,qkv"):
        with pytest.raises(ConfigError, match="lora_targets"):
            lora.targets(bad)


@pytest.mark.parametrize("name,extra", [("adamw", {}), ("striped_adamw", {}), ("striped_adamw", {"in_backward": True}),
                                        ("adafactor", {}), ("muon", {})])
def test_every_optimizer_trains_the_adapters_and_leaves_the_base_bit_unchanged(name, extra):
    model = small_gpt(dropout=0.1)
    lora.apply(model, 4, 8.0, 0.1, "all", {"kind": "gpt2", "name": "gpt2"})
    base = {k: v.clone() for k, v in model.state_dict().items() if not lora.is_adapter(k)}
    adapters = {k: v.clone() for k, v in model.state_dict().items() if lora.is_adapter(k)}
    opt = build_optimizer(model, name, 1e-2, 0.1, (0.9, 0.95), "cpu", **extra)
    model.activation_checkpointing = True
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        idx = torch.randint(0, 50, (2, 17), generator=gen)
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = model.state_dict()
    for k, v in base.items():
        assert torch.equal(after[k], v), k
    assert all(not torch.equal(after[k], v) for k, v in adapters.items() if k.endswith("lora_B"))


def test_compiled_with_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = small_gpt()
    lora.apply(model, 4, 8.0, 0.0, "all", {"kind": "gpt2", "name": "gpt2"})
    randomise_adapters(model)
    model.activation_checkpointing = True
    idx = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(0))
    grads = []
    for m in (torch.compile(model, backend="aot_eager"), model):  # dynamo and autograd's graph, without codegen time
        _, loss = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    (l1, g1), (l2, g2) = grads
    assert l1 == l2 and set(g1) == set(g2) and all(lora.is_adapter(n) for n in g1)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=0), n


def test_merged_and_unmerged_logits_agree_in_float32():
    model = small_gpt().eval()
    lora.apply(model, 4, 16.0, 0.0, "all", {"kind": "gpt2", "name": "gpt2"})
    randomise_adapters(model)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    unmerged = model(idx)[0]
    lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules()) and lora.spec(model) is None
    assert set(model.state_dict()) == set(small_gpt().state_dict())
    assert (model(idx)[0] - unmerged).abs().max().item() < 1e-5


def test_checkpoint_is_under_5_percent_of_a_full_one_for_gpt2_124m_at_rank_8():
    """Sizes from GPT-2 124M's state dicts (the shapes alone: the model is built on the meta
    device); the adapters are materialised with random values and serialised as a checkpoint
    stores them."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257))
    full = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied weight is listed (and stored) once
    assert 124e6 < full / 4 < 125e6
    lora.apply(model, 8, 16.0, 0.0, "all", {"kind": "gpt2", "name": "gpt2"})
    adapters = {k: torch.randn(v.shape) for k, v in lora.adapter_state(model.state_dict()).items()}
    for layers, most in (("attn.", 0.005), ("", 0.01)):  # attn: c_attn and attn.c_proj; all four layers
        buf = io.BytesIO()
        torch.save({"model": {k: v for k, v in adapters.items() if layers in k}, "lora": lora.spec(model)}, buf)
        assert buf.tell() <= 0.05 * full
        assert buf.tell() <= most * full, (layers, buf.tell() / full)


# ------------------------------------------------------------------------------------------
# training, checkpoints, resume


def test_the_checkpoint_holds_the_adapters_and_the_base_reference(data_root, base_dir, tmp_path):
    train(tiny(data_root, base_dir, tmp_path, "--max_iters=4", "--eval_interval=4", "--optimizer=striped_adamw",
               "--activation_checkpointing=True", "--lora_targets=all"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["model"] and all(lora.is_adapter(k) for k in ckpt["model"])
    assert len(ckpt["model"]) == 2 * 4 * 2  # A and B, four layers per block, two blocks
    base = ckpt["lora"]["base"]
    assert base["kind"] == "hf" and base["path"] == os.path.abspath(base_dir)
    assert base["sha256"] == lora.sha256_of(os.path.join(base_dir, "model.safetensors"))
    model, _ = checkpoint.load_model(str(tmp_path / "ckpt.pt"))
    assert lora.spec(model)["rank"] == 4
    assert any(v.abs().sum() > 0 for k, v in ckpt["model"].items() if k.endswith("lora_B"))  # it trained


def test_resume_is_bit_exact(data_root, base_dir, tmp_path):
    common = ["--max_iters=12", "--lr_decay_iters=12", "--eval_interval=6", "--dropout=0.1", "--lora_dropout=0.1",
              "--optimizer=striped_adamw", "--gradient_accumulation_steps=2"]
    straight = train(tiny(data_root, base_dir, tmp_path / "a", *common))
    first = train(tiny(data_root, base_dir, tmp_path / "b", *common, "--max_iters=6"))
    second = train(TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % (tmp_path / "b"), "--init_from=resume", *common])
    assert first["history"] + second["history"] == straight["history"]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 12 and set(a["model"]) == set(b["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_a_nan_loss_rewinds_to_the_saved_adapters(data_root, base_dir, tmp_path, monkeypatch, capsys):
    from nanogpt import model as model_mod
    forward, calls = model_mod.GPT.forward, {"n": 0}

    def poisoned(self, idx, targets=None, **kw):  # the 7th training forward (iter 6) gives a nan loss
        logits, loss = forward(self, idx, targets, **kw)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] == 7:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_mod.GPT, "forward", poisoned)
    s = train(tiny(data_root, base_dir, tmp_path, "--max_iters=8", "--eval_interval=4", "--on_loss_fault=rewind"))
    assert "back to iter 4" in capsys.readouterr().out and s["rewinds"] == 1 and s["final_iter"] == 8
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all(lora.is_adapter(k) for k in ckpt["model"]) and all(bool(torch.isfinite(v).all()) for v in ckpt["model"].values())


def test_sample_eval_and_merged_export_read_a_lora_checkpoint(data_root, base_dir, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    train(tiny(data_root, base_dir, out, "--max_iters=6", "--eval_interval=6", "--lora_targets=c_attn,c_fc"))
    r = run_main("sample.py", ["--out_dir=%s" % out, "--data_root=%s" % data_root, "--num_samples=1", "--max_new_tokens=8",
                               "--device=cpu", "--temperature=0"], capsys)
    assert r.returncode == 0 and r.stdout.count("---------------") == 1
    r = run_main("eval.py", ["--out_dir=%s" % out, "--data_root=%s" % data_root, "--device=cpu", "--max_tokens=500"], capsys)
    assert r.returncode == 0 and "perplexity" in r.stdout
    export(["--out_dir=%s" % out, "--hf_dir=%s" % (tmp_path / "hf"), "--data_root=%s" % data_root, "--merge_lora=True"])
    model, _ = checkpoint.load_model(str(out / "ckpt.pt"))  # with its adapters, unmerged
    model.eval()
    idx = torch.randint(0, 65, (1, 32), generator=torch.Generator().manual_seed(0))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() < 1e-5


def test_a_base_checkpoint_file_is_referenced_by_path_and_sha256(data_root, tmp_path, capsys):
    base = tmp_path / "base"
    train(TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % base, "--n_layer=1", "--n_head=2", "--n_embd=16",
                  "--max_iters=2", "--eval_interval=2"])
    out = tmp_path / "lora"
    train(TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % out, "--init_from=%s" % (base / "ckpt.pt"), "--lora_rank=2",
                  "--max_iters=2", "--eval_interval=2"])
    ref = torch.load(out / "ckpt.pt", weights_only=True)["lora"]["base"]
    assert ref == {"kind": "checkpoint", "path": str(base / "ckpt.pt"), "sha256": lora.sha256_of(str(base / "ckpt.pt"))}
    # the base trains on: its ckpt.pt changes, and the adapters no longer fit it
    train(TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % base, "--init_from=resume", "--max_iters=4", "--eval_interval=2"])
    r = run_main("sample.py", ["--out_dir=%s" % out, "--data_root=%s" % data_root, "--num_samples=1", "--max_new_tokens=4",
                               "--device=cpu"], capsys)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has changed" in r.stderr and "sha256" in r.stderr, r.stderr


def test_bench_times_the_lora_step(capsys):
    args = ["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
            "--vocab_size=64", "--real_data=False", "--warmup_steps=1", "--steps=1", "--optimizer=striped_adamw"]
    full = bench(args)
    adapted = bench(args + ["--lora_rank=2"])
    assert "lora rank 2 on attn: 192 of" in capsys.readouterr().out  # c_attn 2x16 + 48x2, attn.c_proj 2x16 + 16x2
    assert 0 < adapted["optimizer_state_gib"] < full["optimizer_state_gib"] / 5


# ------------------------------------------------------------------------------------------
# bad input: one line each


def one_line(r, *needles):
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("error: ") and "\n" not in err, r.stdout + r.stderr
    for n in needles:
        assert n in err, err


def test_bad_input_gets_one_line(data_root, base_dir, tmp_path, capsys):
    args = ["--data_root=%s" % data_root, "--max_iters=2", "--eval_interval=2"]
    one_line(run_main("train.py", TINY + args + ["--out_dir=%s" % (tmp_path / "s"), "--lora_rank=4"], capsys),
             "lora_rank=4", "init_from='scratch'")
    one_line(run_main("train.py", tiny(data_root, base_dir, tmp_path / "t", "--lora_targets=qkv") + args, capsys),
             "lora_targets", "'qkv'")
    one_line(run_main("train.py", tiny(data_root, base_dir, tmp_path / "t", "--lora_rank=-1") + args, capsys), "lora_rank")
    one_line(run_main("train.py", tiny(data_root, base_dir, tmp_path / "t", "--lora_alpha=0") + args, capsys), "lora_alpha")
    one_line(run_main("train.py", tiny(data_root, base_dir, tmp_path / "t", "--fp8=True") + args, capsys), "fp8")
    out = tmp_path / "run"
    train(tiny(data_root, base_dir, out, *args))
    one_line(run_main("train.py", TINY + args + ["--out_dir=%s" % out, "--init_from=resume", "--lora_rank=8", "--max_iters=4"],
                      capsys), "lora_rank=8", "lora_rank=4")
    one_line(run_main("export.py", ["--out_dir=%s" % out, "--hf_dir=%s" % (tmp_path / "hf")], capsys), "--merge_lora=True")
    one_line(run_main("train.py", TINY + args + ["--out_dir=%s" % (tmp_path / "u"), "--init_from=%s" % (out / "ckpt.pt")], capsys),
             "holds LoRA adapters")
    full = tmp_path / "full"
    train(TINY + args + ["--out_dir=%s" % full, "--n_layer=1", "--n_head=2", "--n_embd=16"])
    one_line(run_main("export.py", ["--out_dir=%s" % full, "--hf_dir=%s" % (tmp_path / "hf2"), "--merge_lora=True"], capsys),
             "no LoRA adapters")
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "hf2")
    # the base folder is gone
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["lora"]["base"]["path"] = str(tmp_path / "nowhere")
    checkpoint.save(ckpt, str(out / "ckpt.pt"))
    one_line(run_main("sample.py", ["--out_dir=%s" % out, "--data_root=%s" % data_root, "--device=cpu"], capsys),
             "base of the LoRA checkpoint", "is missing")
