"""Optional model features (RoPE, QK-norm, ReLU², untied head) and the Muon optimizer: off by
default, consistent between cached and uncached generation, trainable, resumable, refused where
they cannot work."""

import math

import pytest
import torch

from nanogpt.errors import ConfigError
from nanogpt.train import TrainConfig
from nanogpt.generate import KVCache, generate
from nanogpt.loss import chunked_cross_entropy
from nanogpt.model import GPT, GPTConfig, apply_rotary, rotary_tables
from nanogpt.optim import Muon, build_optimizer, orthogonalize
from helpers import train

from test_train import tiny

FEATURES = [dict(rope=True), dict(qk_norm=True), dict(mlp_activation="relu2"), dict(untied_head=True),
            dict(rope=True, qk_norm=True, mlp_activation="relu2", untied_head=True)]
ALL = FEATURES[-1]


def small(**kw):
    base = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    base.update(kw)
    return GPTConfig(**base)


def test_defaults_are_gpt2():
    """Unset, every feature leaves the model exactly as before: same parameters, same init."""
    torch.manual_seed(0)
    m = GPT(small())
    names = [n for n, _ in m.named_parameters()]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert "lm_head.weight" not in names  # tied: listed once, as wte
    assert not hasattr(m, "rope_cos")
    torch.manual_seed(0)
    r = GPT(small(rope=True))
    assert "transformer.wpe.weight" not in [n for n, _ in r.named_parameters()]
    assert m.num_params() == r.num_params()  # wpe was never counted
    u = GPT(small(untied_head=True))
    assert u.lm_head.weight is not u.transformer.wte.weight
    assert u.num_params() == m.num_params()  # the head costs FLOPs, the lookup table does not
    assert u.num_params(non_embedding=False) == m.num_params(non_embedding=False) + 97 * 32  # a second (V, C) matrix


def test_each_feature_changes_the_function():
    """With the base model's weights copied in, RoPE, QK-norm and ReLU² compute something else;
    an untied head holding the embedding's values computes the same (and then trains apart)."""
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    base = GPT(small()).eval()
    for kw in FEATURES[:-1]:
        m = GPT(small(**kw)).eval()
        m.load_state_dict({k: v for k, v in base.state_dict().items() if k in m.state_dict()}, strict=False)
        with torch.no_grad():
            same = torch.allclose(m(idx)[0], base(idx)[0], atol=1e-4)
        assert same == ("untied_head" in kw), kw


def test_rope_scores_depend_on_relative_position_only():
    cfg = small(n_head=1, n_embd=16, block_size=64)
    cos, sin = rotary_tables(cfg)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(i, j):
        qi = apply_rotary(q, cos[i:i + 1], sin[i:i + 1])
        kj = apply_rotary(k, cos[j:j + 1], sin[j:j + 1])
        return (qi * kj).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    rotated = apply_rotary(q, cos[9:10], sin[9:10])
    assert rotated.norm().item() == pytest.approx(q.norm().item(), rel=1e-6)  # a rotation


@pytest.mark.parametrize("kw", FEATURES, ids=lambda kw: "+".join(kw))
def test_cached_generation_equals_uncached(kw):
    """Greedy tokens from the KV cache, from the fixed-shape one-token step and from re-running
    the prefix agree, also once the window slides past block_size."""
    torch.manual_seed(0)
    model = GPT(small(**kw)).eval()
    idx = torch.randint(0, 97, (2, 5))
    a = generate(model, idx, 45, temperature=0, use_cache=True)
    b = generate(model, idx, 45, temperature=0, use_cache=False)
    with torch.no_grad():
        c = generate(model, idx, 45, temperature=0, fixed_shape=True, cuda_graph=False)
    assert torch.equal(a, b) and torch.equal(c, b)


def test_cache_logits_equal_full_forward_with_rope():
    torch.manual_seed(0)
    model = GPT(small(**ALL)).eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
        parts = [model(idx[:, :8], cache=cache)[0], model(idx[:, 8:13], cache=cache)[0]]
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(13, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rope_tables_stay_float32_when_the_model_is_cast():
    model = GPT(small(rope=True)).to(torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    cos, sin = rotary_tables(model.config)
    assert model.rope_cos.dtype == torch.float32 and torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    idx = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        assert model(idx)[0].dtype == torch.bfloat16


def test_crop_block_size_with_rope():
    torch.manual_seed(0)
    model = GPT(small(rope=True)).eval()
    idx = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        before = model(idx)[0]
        model.crop_block_size(16)
        torch.testing.assert_close(model(idx)[0], before)
    assert model.rope_cos.shape == (16, 4)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# Muon


def test_orthogonalize_flattens_the_spectrum():
    g = torch.randn(3, 24, 64, generator=torch.Generator().manual_seed(0))
    g[0] *= torch.logspace(-3, 1, 64)  # badly conditioned columns
    for x in (g, g.mT):  # wide and tall
        o = orthogonalize(x)
        assert o.shape == x.shape
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.5 and s.max() < 1.3
        u, _, vh = torch.linalg.svd(x, full_matrices=False)  # same singular vectors: o ~ u vh
        cos = (o * (u @ vh)).sum(dim=(-2, -1)) / (o.norm(dim=(-2, -1)) * (u @ vh).norm(dim=(-2, -1)))
        assert (cos > 0.9).all()


def test_muon_step_by_hand():
    """One step on a (2n, n) matrix and one AdamW step on a vector, against the formulas."""
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8))
    gw, gb = torch.randn(16, 8), torch.randn(8)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = Muon([dict(params=[w], muon=True, lr=0.05, weight_decay=0.1, lr_ratio=5.0),
                dict(params=[b], weight_decay=0.0)], lr=0.01, momentum=0.9, betas=(0.8, 0.99), eps=1e-8)
    w.grad, b.grad = gw, gb
    opt.step()
    buf = 0.1 * gw  # momentum buffer after one step from zero
    u = gw + 0.9 * (buf - gw)
    want = w0 * (1 - 0.05 / 5.0 * 0.1) - 0.05 * math.sqrt(2.0) * orthogonalize(u[None])[0]
    torch.testing.assert_close(w.detach(), want)
    m, v = 0.2 * gb, 0.01 * gb * gb
    want_b = b0 - 0.01 * (m / 0.2) / ((v / 0.01).sqrt() + 1e-8)
    torch.testing.assert_close(b.detach(), want_b)


def test_muon_takes_block_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = GPT(small(**ALL))
    opt = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu", muon_lr=0.03)
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len(set(map(id, seen))) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            in_block = p.dim() == 2 and ".h." in names[id(p)]
            assert g["muon"] == in_block, names[id(p)]
            if names[id(p)].endswith("c_attn.weight"):
                assert g["split"] == 3
    assert {g["lr"] for g in opt.param_groups if g["muon"]} == {0.03}


def test_features_and_muon_train_and_resume_bit_exact(data_root, tmp_path):
    """Every feature on, Muon: the loss falls, and 12 steps equal 6 + resume + 6 exactly."""
    feats = ["--rope=True", "--qk_norm=True", "--mlp_activation=relu2", "--untied_head=True", "--optimizer=muon",
             "--muon_lr=0.02", "--learning_rate=1e-2", "--min_lr=1e-3", "--log_interval=1", "--eval_interval=6",
             "--lr_decay_iters=12", "--warmup_iters=2", "--dropout=0.1"]
    straight = train(tiny(data_root, tmp_path / "a", *feats, "--max_iters=12"))
    first = train(tiny(data_root, tmp_path / "b", *feats, "--max_iters=6"))
    second = train(tiny(data_root, tmp_path / "b", *feats, "--max_iters=12", "--init_from=resume"))
    assert first["history"] + second["history"] == straight["history"]
    losses = [l for _, l in straight["history"]]
    assert losses[-1] < losses[0] - 0.5
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["model_args"]["rope"] is True and a["model_args"]["mlp_activation"] == "relu2"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(ConfigError, match="rope=False disagrees with the checkpoint"):
        train(tiny(data_root, tmp_path / "b", *feats, "--max_iters=14", "--init_from=resume", "--rope=False"))


@pytest.mark.parametrize("over,match", [
    (dict(mlp_activation="swish"), "mlp_activation must be one of"),
    (dict(rope=True, n_embd=36, n_head=4), "rope=True needs an even head size"),
    (dict(optimizer="muon", parallelism="fsdp"), "optimizer='muon' needs whole matrices"),
    (dict(optimizer="muon", optimizer_in_backward=True, gradient_accumulation_steps=1, grad_clip=0.0),
     "optimizer='muon' cannot step inside backward"),
    (dict(optimizer="muon", muon_lr=0.0), "muon_lr must be > 0"),
    (dict(loss_chunk=-1), "loss_chunk must be >= 0"),
    (dict(init_from="gpt2", qk_norm=True), "qk_norm=True changes the architecture"),
])
def test_config_errors_name_the_key(over, match):
    cfg = TrainConfig(**over)
    with pytest.raises(ConfigError, match=match):
        (cfg).validate()


def test_bench_checks_muon_lr():
    from nanogpt.bench import BenchConfig
    with pytest.raises(ConfigError, match="muon_lr must be > 0"):
        BenchConfig(optimizer="muon", muon_lr=0.0).validate()


# --------------------------------------------------------------------------------------------
# the loss in chunks


@pytest.mark.parametrize("kw", [{}, dict(untied_head=True)], ids=["tied", "untied"])
def test_chunked_loss_equals_full_logits(kw):
    """Same loss and gradients for every parameter (the tied embedding gets both of its parts),
    with ignored targets and a chunk that does not divide the positions."""
    torch.manual_seed(0)
    m = GPT(small(**kw))
    x, y = torch.randint(0, 97, (3, 30)), torch.randint(0, 97, (3, 30))
    y[0, :7] = -1
    _, want = m(x, y)
    want.backward()
    want_g = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.loss_chunk = 17
    logits, got = m(x, y)
    assert logits is None  # nothing of size (B, T, V) is kept
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want_g[n], atol=1e-6, rtol=1e-5, msg=n)
    with torch.no_grad():
        assert m(x, y)[1].item() == pytest.approx(want.item(), rel=1e-6)


def test_chunked_loss_under_bfloat16_autocast():
    """On the CPU's bfloat16 autocast the chunks round as the full path does: close, not equal."""
    torch.manual_seed(0)
    x, w = torch.randn(50, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (50,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.nn.functional.cross_entropy((x @ w.t()).float(), t)
        got = chunked_cross_entropy(x, w, t, 7)
    gw, gx = torch.autograd.grad(want, (w, x))
    cw, cx = torch.autograd.grad(got, (w, x))
    assert got.dtype == torch.float32 and cw.dtype == w.dtype and cx.dtype == x.dtype
    assert got.item() == pytest.approx(want.item(), rel=1e-2)
    torch.testing.assert_close(cw, gw, atol=2e-2, rtol=5e-2)
    torch.testing.assert_close(cx, gx, atol=2e-2, rtol=5e-2)


def test_training_with_loss_chunk_follows_the_plain_run(data_root, tmp_path):
    common = ["--max_iters=15", "--lr_decay_iters=15", "--eval_interval=15", "--log_interval=1"]
    plain = train(tiny(data_root, tmp_path / "a", *common))
    chunked = train(tiny(data_root, tmp_path / "b", *common, "--loss_chunk=50"))
    a, b = [l for _, l in plain["history"]], [l for _, l in chunked["history"]]
    assert b == pytest.approx(a, abs=1e-4)
    assert plain["last_val_loss"] == pytest.approx(chunked["last_val_loss"], abs=1e-4)


def test_chunked_loss_with_half_precision_weights_and_no_autocast():
    """A model cast to bfloat16 (as sample.py and eval.py may hold it) takes the chunked path too."""
    torch.manual_seed(0)
    m = GPT(small()).to(torch.bfloat16)
    x, y = torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 20))
    _, want = m(x, y)
    m.loss_chunk = 9
    _, got = m(x, y)
    got.backward()
    assert got.item() == pytest.approx(want.float().item(), rel=2e-2)
    assert m.lm_head.weight.grad.dtype == torch.bfloat16


def test_resume_takes_hyper_parameters_from_the_command_line(data_root, tmp_path):
    """The checkpoint restores the optimizer's state; a changed weight_decay, muon_lr or
    muon_momentum on resume applies (load_state_dict alone would bring back the saved ones)."""
    from nanogpt import train as train_mod
    seen = {}
    real = train_mod.build

    def spy(*a, **k):
        opt = real(*a, **k)
        seen["opt"] = opt
        return opt
    common = ["--optimizer=muon", "--log_interval=1", "--eval_interval=4", "--lr_decay_iters=8", "--warmup_iters=1"]
    train(tiny(data_root, tmp_path, *common, "--max_iters=4"))
    import unittest.mock
    with unittest.mock.patch.object(train_mod, "build", spy):
        train(tiny(data_root, tmp_path, *common, "--max_iters=5", "--init_from=resume", "--weight_decay=0.03",
                   "--muon_lr=0.05", "--muon_momentum=0.8"))
    groups = seen["opt"].param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, 0.03}
    muon = [g for g in groups if g["muon"]]
    assert {g["momentum"] for g in muon} == {0.8}
    assert {round(g["lr_ratio"], 9) for g in muon} == {round(0.05 / 3e-3, 9)}
    assert all(seen["opt"].state[p] for g in muon for p in g["params"])  # the momentum buffers came back
