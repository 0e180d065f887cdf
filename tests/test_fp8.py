"""Float8 products in the blocks' Linear layers (fp8=True): numbers, layouts and a training run.
On the CPU the products are formed from float32 copies of the float8 values; the first test pins
that this equals torch's float8 kernel."""

import pytest
import torch
import torch.nn as nn

from nanogpt import fp8
from nanogpt.errors import ConfigError
from nanogpt.model import GPT, GPTConfig
from helpers import train
from test_train import tiny


@pytest.mark.parametrize("kinds", [(fp8.E4M3, fp8.E4M3), (fp8.E5M2, fp8.E4M3)])
def test_cpu_product_equals_the_float8_kernel(kinds):
    torch.manual_seed(0)
    a8, sa = fp8.to_float8(torch.randn(32, 48) * 3, kinds[0])
    b8, sb = fp8.to_float8(torch.randn(16, 48) / 5, kinds[1])
    want = torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    got = fp8.scaled_product(a8, b8.t(), sa, sb, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_to_float8_uses_the_whole_range():
    t = torch.tensor([[-3.0, 0.5], [1e-3, 2.0]])
    t8, inv = fp8.to_float8(t, fp8.E4M3)
    assert t8.dtype == fp8.E4M3 and t8.float().abs().max() == torch.finfo(fp8.E4M3).max
    torch.testing.assert_close(t8.float() * inv, t, rtol=0.07, atol=1e-3)  # e4m3: 3 mantissa bits


def pair(bias=True):
    torch.manual_seed(0)
    plain = nn.Linear(64, 96, bias=bias)
    quant = nn.Linear(64, 96, bias=bias)
    quant.load_state_dict(plain.state_dict())
    quant.__class__ = fp8.Float8Linear
    return plain, quant


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_float8_linear_is_close_to_the_plain_layer(autocast, monkeypatch):
    """Forward and both gradients within float8 rounding (but not equal: the values are rounded),
    every operand laid out as the CUDA kernel requires, the output in the autocast dtype."""
    seen = []
    real = fp8.scaled_product

    def checked(a8, b8, sa, sb, out_dtype):
        assert a8.stride(1) == 1 and b8.stride(0) == 1, "row-major times column-major"
        assert all(d % 16 == 0 for d in (*a8.shape, *b8.shape))
        assert sa.numel() == sb.numel() == 1 and sa.dtype == sb.dtype == torch.float32
        seen.append((a8.dtype, b8.dtype))
        return real(a8, b8, sa, sb, out_dtype)

    monkeypatch.setattr(fp8, "scaled_product", checked)
    plain, quant = pair()
    x = torch.randn(4, 32, 64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        outs = [plain(xs[0]), quant(xs[1])]
    assert outs[1].dtype == outs[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    g = torch.randn(4, 32, 96)
    for out in outs:
        out.float().backward(g)
    assert 0 < rel(outs[1], outs[0]) < 0.06
    assert 0 < rel(xs[1].grad, xs[0].grad) < 0.1  # e5m2 gradients: 2 mantissa bits
    assert 0 < rel(quant.weight.grad, plain.weight.grad) < 0.1
    assert torch.equal(quant.bias.grad, plain.bias.grad)  # the bias is added outside the product
    assert xs[1].grad.dtype == torch.float32 and quant.weight.grad.dtype == torch.float32
    assert seen == [(fp8.E4M3, fp8.E4M3), (fp8.E5M2, fp8.E4M3), (fp8.E5M2, fp8.E4M3)]


def test_shapes_the_kernel_cannot_take_run_as_usual():
    plain, quant = pair(bias=False)
    x = torch.randn(3, 5, 64)  # 15 rows: not a multiple of 16
    assert torch.equal(quant(x), plain(x))


def test_enable_keeps_names_values_and_the_head():
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fp8.enable(model) == 4 * 3
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert type(model.lm_head) is nn.Linear
    assert type(model.transformer.h[0].mlp.c_fc) is fp8.Float8Linear


def test_training_with_fp8_tracks_the_plain_run(data_root, tmp_path):
    common = ["--max_iters=250", "--lr_decay_iters=250", "--eval_interval=250", "--log_interval=20",
              "--learning_rate=1e-2", "--min_lr=1e-3", "--eval_iters=10", "--n_embd=64", "--dtype=bfloat16"]
    plain = train(tiny(data_root, tmp_path / "plain", *common))
    quant = train(tiny(data_root, tmp_path / "fp8", *common, "--fp8=True"))
    assert quant["history"][-1][1] < quant["history"][0][1] - 1.0
    assert abs(quant["last_val_loss"] - plain["last_val_loss"]) < 0.1  # seeds differ by up to 0.05 either way
    assert quant["last_val_loss"] != plain["last_val_loss"]
    a = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "fp8" / "ckpt.pt", weights_only=True)["model"]
    assert list(a) == list(b)  # the checkpoint is a plain one: sampling and export need nothing new


def test_where_fp8_cannot_run(monkeypatch, data_root, tmp_path):
    with pytest.raises(ConfigError, match="fp8=True is not yet checked with parallelism='fsdp'"):
        train(tiny(data_root, tmp_path, "--fp8=True", "--parallelism=fsdp"))
    assert "not on mps" in fp8.unsupported("mps", "mps")
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ConfigError, match="fp8=True: float8 .* not on mps; or pass --fp8=False"):
        fp8.apply(model, "mps", "mps")
    assert type(model.transformer.h[0].mlp.c_fc) is nn.Linear  # refused before anything changed
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "compute capability 8.0" in fp8.unsupported("cuda", "cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.unsupported("cuda", "cuda") is None


def test_compile_mode_is_checked_and_passed_on(monkeypatch, data_root, tmp_path):
    from nanogpt import runtime
    with pytest.raises(ConfigError, match="compile_mode must be one of"):
        train(tiny(data_root, tmp_path, "--compile_mode=fastest"))
    got = {}

    def fake_compile(model, mode=None):
        got["mode"] = mode
        return model

    monkeypatch.setattr(runtime, "compile_blocker", lambda device_type: None)
    monkeypatch.setattr(torch, "compile", fake_compile)
    for mode, want in (("default", None), ("max-autotune", "max-autotune")):
        got.clear()
        runtime.compile_model(nn.Linear(2, 2), True, "cpu", mode=mode)
        assert got["mode"] == want
