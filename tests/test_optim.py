"""StripedAdamW against its equations and AdamW, and the memory levers."""

import math
import os
import subprocess
import sys

import pytest
import torch

from nanogpt.errors import ConfigError
from nanogpt.train import TrainConfig
from nanogpt.model import GPT, GPTConfig
from nanogpt.optim import OptimizerInBackward, StripedAdamW, build_optimizer, stochastic_round_bf16


def reference_steps(p0, grads, lr, b1, b2, eps, wd):
    """The update written loop by loop from the equations, in float64 Python numbers."""
    shape = list(p0.shape)
    p = p0.double().reshape(-1, *shape[-2:]) if len(shape) >= 2 else p0.double().clone()
    p = p.clone()
    m = torch.zeros_like(p)
    if len(shape) >= 2:
        B, R, C = p.shape
        r = [[0.0] * R for _ in range(B)]
        c = [[0.0] * C for _ in range(B)]
    else:
        v_full = [0.0] * shape[0]
    for t, g in enumerate(grads, start=1):
        g = g.double().reshape(p.shape)
        p = p * (1 - lr * wd)
        if len(shape) >= 2:
            for b in range(B):
                for i in range(R):
                    r[b][i] = b2 * r[b][i] + (1 - b2) * sum(g[b, i, j].item() ** 2 for j in range(C)) / C
                for j in range(C):
                    c[b][j] = b2 * c[b][j] + (1 - b2) * sum(g[b, i, j].item() ** 2 for i in range(R)) / R
                mean_r = sum(r[b]) / R
                for i in range(R):
                    for j in range(C):
                        m[b, i, j] = b1 * m[b, i, j] + (1 - b1) * g[b, i, j]
                        v = r[b][i] * c[b][j] / mean_r
                        p[b, i, j] -= lr * (m[b, i, j] / (1 - b1 ** t)) / (math.sqrt(v / (1 - b2 ** t)) + eps)
        else:
            for i in range(shape[0]):
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                v_full[i] = b2 * v_full[i] + (1 - b2) * g[i].item() ** 2
                p[i] -= lr * (m[i] / (1 - b1 ** t)) / (math.sqrt(v_full[i] / (1 - b2 ** t)) + eps)
    return p.reshape(shape)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (6,)])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_update_matches_the_equations(shape, wd, foreach):
    torch.manual_seed(0)
    p0 = torch.randn(shape)
    grads = [torch.randn(shape) * (k + 1) for k in range(4)]
    p = torch.nn.Parameter(p0.clone())
    opt = StripedAdamW([p], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, foreach=foreach)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    ref = reference_steps(p0, grads, 0.01, 0.9, 0.95, 1e-8, wd)
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
def test_equals_adamw_when_squared_gradient_is_rank_one(foreach):
    torch.manual_seed(0)
    u, v = torch.randn(16), torch.randn(8)
    p0 = torch.randn(16, 8)
    a = torch.nn.Parameter(p0.clone())
    b = torch.nn.Parameter(p0.clone())
    oa = StripedAdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=foreach)
    ob = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for t in range(20):
        g = (0.5 + t % 3) * (-1) ** t * torch.outer(u, v)  # g^2 = s_t^2 (u^2)(v^2)^T: rank one
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_state_bytes_about_half_of_adamw():
    model = torch.nn.Linear(256, 512, bias=True)
    x = torch.randn(4, 256)
    opts = {"adamw": torch.optim.AdamW(model.parameters()), "striped": StripedAdamW(model.parameters()),
            "striped_bf16": StripedAdamW(model.parameters(), state_dtype=torch.bfloat16)}
    for o in opts.values():
        model(x).sum().backward()
        o.step()
    n = 256 * 512
    from nanogpt.optim import optimizer_state_bytes
    assert optimizer_state_bytes(opts["adamw"]) == 8 * (n + 512)
    assert opts["striped"].state_bytes() == 4 * n + 4 * (256 + 512) + 8 * 512  # m, rows + cols; bias like AdamW
    assert opts["striped_bf16"].state_bytes() == 2 * n + 4 * (256 + 512) + 2 * 512 + 4 * 512


def test_refuses_state_of_other_shapes():
    a = torch.nn.Parameter(torch.randn(4, 6))
    oa = StripedAdamW([a])
    a.grad = torch.randn(4, 6)
    oa.step()
    b = torch.nn.Parameter(torch.randn(6, 4))
    ob = StripedAdamW([b])
    with pytest.raises(ValueError, match="shape"):
        ob.load_state_dict(oa.state_dict())


def test_grad_scaler_and_clipping():
    """A power-of-two loss scale is undone exactly, so the scaled and unscaled runs agree bit for bit."""
    torch.manual_seed(0)
    m1 = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    m2 = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16))
    m2.load_state_dict(m1.state_dict())
    o1, o2 = StripedAdamW(m1.parameters(), lr=1e-2), StripedAdamW(m2.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randint(0, 32, (2, 17))
    for _ in range(3):
        _, l1 = m1(x[:, :-1], x[:, 1:])
        l1.backward()
        torch.nn.utils.clip_grad_norm_(m1.parameters(), 0.5)
        o1.step()
        o1.zero_grad()
        _, l2 = m2(x[:, :-1], x[:, 1:])
        scaler.scale(l2).backward()
        scaler.unscale_(o2)
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.5)
        scaler.step(o2)
        scaler.update()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["adamw", "striped_adamw"])
def test_step_in_backward_equals_step_after_backward(name):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16)
    m1, m2 = GPT(cfg), GPT(cfg)
    m2.load_state_dict(m1.state_dict())
    o1 = build_optimizer(m1, name, 1e-2, 0.1, (0.9, 0.95), "cpu")
    o2 = build_optimizer(m2, name, 1e-2, 0.1, (0.9, 0.95), "cpu", in_backward=True)
    assert isinstance(o2, OptimizerInBackward)
    x = torch.randint(0, 32, (4, 17))
    for _ in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            _, loss = m(x[:, :-1], x[:, 1:])
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
        assert all(p.grad is None for p in m2.parameters())  # freed as they were used
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    o3 = build_optimizer(m2, name, 1e-2, 0.1, (0.9, 0.95), "cpu", in_backward=True)
    o3.load_state_dict(o2.state_dict())
    with pytest.raises(ValueError, match="optimizer_in_backward"):
        o3.load_state_dict(o1.state_dict())
    o2.remove()
    o3.remove()


def test_stochastic_rounding_is_unbiased_and_bounded():
    x = torch.full((200_000,), 1.0 + 2 ** -10)  # between two bf16 neighbours, a quarter of the way up
    lo, hi = torch.tensor(1.0), torch.tensor(1.0 + 2 ** -7)
    y = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(y.unique().tolist()) == {lo.item(), hi.item()}  # always one of the two neighbours
    assert abs(y.mean().item() - x[0].item()) < 4 * (2 ** -7) * 0.5 / math.sqrt(x.numel())  # unbiased
    z = torch.randn(10_000) * 1e3
    err = (stochastic_round_bf16(z, torch.Generator().manual_seed(1)).float() - z).abs()
    assert bool((err <= z.abs() * 2 ** -7).all())  # at most one bf16 step (relative 2^-7)


def test_bf16_momentum_stays_close_to_float32():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(64, 32))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = StripedAdamW([p1], lr=1e-3), StripedAdamW([p2], lr=1e-3, state_dtype=torch.bfloat16)
    for _ in range(50):
        g = torch.randn(64, 32)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert o2.state[p2]["exp_avg"].dtype == torch.bfloat16
    drift = (p1 - p2).abs().max().item()
    assert drift < 50 * 1e-3 * 2 ** -7 * 4  # far below one learning-rate step per iteration


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=32, n_layer=3, n_head=2, n_embd=16, dropout=0.1)
    m1, m2 = GPT(cfg), GPT(cfg)
    m2.load_state_dict(m1.state_dict())
    m2.activation_checkpointing = True
    x = torch.randint(0, 32, (4, 17))
    for m in (m1, m2):
        torch.manual_seed(1)  # same dropout masks; checkpointing replays them in backward
        _, loss = m(x[:, :-1], x[:, 1:])
        loss.backward()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw,match", [
    (dict(optimizer_in_backward=True, gradient_accumulation_steps=2, grad_clip=0.0), "gradient_accumulation_steps=1"),
    (dict(optimizer_in_backward=True, gradient_accumulation_steps=1), "grad_clip=0"),
    (dict(optimizer_state_dtype="bfloat16"), "striped_adamw"),
])
def test_config_refuses_unsupported_combinations(kw, match):
    with pytest.raises(ConfigError, match=match):
        (TrainConfig(**kw)).validate()


# ------------------------------------------------------------------------------------------
# in the training loop

from helpers import train  # noqa: E402

TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--eval_iters=4", "--warmup_iters=5", "--dataset=shakespeare_char"]


@pytest.mark.parametrize("extra", [
    ["--optimizer=striped_adamw", "--gradient_accumulation_steps=2"],
    ["--optimizer=striped_adamw", "--optimizer_state_dtype=bfloat16", "--optimizer_in_backward=True",
     "--gradient_accumulation_steps=1", "--grad_clip=0.0", "--activation_checkpointing=True"],
])
def test_resume_is_bit_exact(data_root, tmp_path, extra, capsys):
    common = TINY + extra + ["--data_root=%s" % data_root, "--max_iters=16", "--lr_decay_iters=16", "--eval_interval=8",
                             "--dropout=0.1"]
    straight = train(common + ["--out_dir=%s" % (tmp_path / "a")])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("iter ")]
    in_backward = "--optimizer_in_backward=True" in extra
    assert lines and all(("grad norm" in ln) != in_backward for ln in lines)  # no norm exists when it is consumed in backward
    assert not any("nan" in ln for ln in lines)
    first = train(common + ["--out_dir=%s" % (tmp_path / "b"), "--max_iters=8"])
    second = train(common + ["--out_dir=%s" % (tmp_path / "b"), "--init_from=resume"])
    assert first["history"] + second["history"] == straight["history"]
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_with_another_optimizer_is_refused(data_root, tmp_path):
    args = TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % tmp_path, "--max_iters=2", "--eval_interval=2"]
    train(args)
    with pytest.raises(Exception, match="optimizer='adamw'"):
        train(args + ["--init_from=resume", "--optimizer=striped_adamw", "--max_iters=4"])


def test_shakespeare_char_val_loss_within_two_percent_of_adamw(data_root, tmp_path):
    run = TINY + ["--data_root=%s" % data_root, "--max_iters=400", "--lr_decay_iters=400", "--eval_interval=400",
                  "--learning_rate=3e-3", "--min_lr=1e-4", "--eval_iters=40", "--log_interval=100", "--beta2=0.99",
                  "--gradient_accumulation_steps=1", "--batch_size=8"]
    adamw = train(run + ["--out_dir=%s" % (tmp_path / "a")])["last_val_loss"]
    striped = train(run + ["--out_dir=%s" % (tmp_path / "s"), "--optimizer=striped_adamw"])["last_val_loss"]
    assert adamw < 2.8  # both actually learned
    assert abs(striped - adamw) / adamw < 0.02, (striped, adamw)


def test_finetune_config_with_striped_adamw(tmp_path):
    """config/finetune_shakespeare.py as shipped, on a small local GPT-2 folder instead of gpt2-xl."""
    transformers = pytest.importorskip("transformers")
    import os
    import numpy as np
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = tmp_path / "data" / "shakespeare"
    data.mkdir(parents=True)
    ids = np.random.default_rng(0).integers(0, 50257, 5000).astype(np.uint16)
    ids.tofile(data / "train.bin")
    ids[:1000].tofile(data / "val.bin")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "hf")
    s = train([os.path.join(root, "config", "finetune_shakespeare.py"), "--optimizer=striped_adamw", "--device=cpu",
               "--compile=False", "--init_from=%s" % (tmp_path / "hf"), "--data_root=%s" % (tmp_path / "data"),
               "--out_dir=%s" % (tmp_path / "out"), "--gradient_accumulation_steps=4", "--max_iters=4",
               "--eval_iters=2", "--eval_interval=2"])
    assert s["iters"] == 4 and s["best_val_loss"] < 11.5


def test_multi_tensor_path_equals_one_at_a_time_and_resumes_exactly():
    """The foreach path (the default on CUDA) takes the same steps as the per-parameter loop on a
    whole model with matrices and vectors in two groups, and a state_dict round trip mid-run
    repeats an uninterrupted run bit for bit."""
    torch.manual_seed(0)
    # no biases: the key bias has a zero gradient up to rounding noise, which the two paths cannot share
    cfg = GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16, bias=False)
    models = [GPT(cfg) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    from nanogpt.optim import param_groups
    opts = [StripedAdamW(param_groups(m, 0.1), lr=3e-3, betas=(0.9, 0.95), foreach=f)
            for m, f in zip(models, (False, True, True))]
    x = torch.randint(0, 32, (4, 16))
    for t in range(6):
        for m, o in zip(models, opts):
            _, loss = m(x, x)
            loss.backward()
            o.step()
            o.zero_grad()
        if t == 2:  # the third model continues from a state_dict copy
            sd = opts[2].state_dict()
            fresh = GPT(cfg)
            fresh.load_state_dict(models[2].state_dict())
            models[2] = fresh
            opts[2] = StripedAdamW(param_groups(fresh, 0.1), lr=3e-3, betas=(0.9, 0.95), foreach=True)
            opts[2].load_state_dict(sd)
    for (n, a), b, c in zip(models[0].named_parameters(), models[1].parameters(), models[2].parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
        assert torch.equal(b, c), n


def test_fused_step_equals_the_multi_tensor_path_under_the_triton_interpreter(tmp_path):
    """The Triton kernels of StripedAdamW(fused=True), run on the CPU by Triton's interpreter,
    against the multi-tensor path (on a GPU: tests/test_gpu.py)."""
    pytest.importorskip("triton")
    code = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, %r)
import torch
from nanogpt.optim import StripedAdamW
torch.manual_seed(0)
shapes = [(70, 200), (33, 17), (128, 130), (5,)]
a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
b = [torch.nn.Parameter(p.detach().clone()) for p in a]
oa = StripedAdamW(a, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
ob = StripedAdamW(b, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=True, fused=True)
for step in range(5):
    for x, y in zip(a, b):
        x.grad = torch.randn_like(x) * (1 + step)
        y.grad = x.grad.clone()
    oa.step(); ob.step()
for x, y in zip(a, b):
    torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
print("ok")
""" % os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
