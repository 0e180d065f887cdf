"""CUDA paths: skipped without a GPU, run on a GPU machine with `python -m pytest tests/test_gpu.py`."""

import pytest
import torch

from nanogpt.generate import generate
from nanogpt.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_kv_cache_greedy_equals_uncached_on_cuda():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64)).cuda().eval()
    idx = torch.randint(0, 256, (4, 10), device="cuda")
    a = generate(model, idx, 80, temperature=0, use_cache=True)
    b = generate(model, idx, 80, temperature=0, use_cache=False)
    assert torch.equal(a, b)


FEATURES = dict(rope=True, qk_norm=True, mlp_activation="relu2", untied_head=True)


@pytest.mark.parametrize("features", [{}, FEATURES], ids=["gpt2", "features"])
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_graph_decode_equals_eager_cache_and_uncached(batch, features):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64, **features)).cuda().eval()
    idx = torch.randint(0, 256, (batch, 10), device="cuda")
    graph = generate(model, idx, 100, temperature=0)  # past block_size: the window slides, the graph is reused
    eager = generate(model, idx, 100, temperature=0, cuda_graph=False)
    plain = generate(model, idx, 100, temperature=0, use_cache=False)
    assert torch.equal(graph, eager) and torch.equal(graph, plain)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        g16 = generate(model, idx, 40, temperature=0)
        e16 = generate(model, idx, 40, temperature=0, fixed_shape=True, cuda_graph=False)
    assert torch.equal(g16, e16)  # the same fixed-shape step, replayed or run eagerly


def compiled_bf16_losses(model, opt, x, steps):
    """Train a compiled model on the batch x (B, T+1) under bf16 autocast; the loss of each step."""
    cmodel = torch.compile(model)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = cmodel(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("features", [{}, FEATURES], ids=["gpt2", "features+muon"])
def test_bf16_train_steps_reduce_loss_compiled(features):
    from nanogpt.optim import build_optimizer
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=4, n_embd=64, **features)).cuda()
    if features:
        opt = build_optimizer(model, "muon", 3e-3, 0.0, (0.9, 0.95), "cuda", muon_lr=0.02)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    losses = compiled_bf16_losses(model, opt, torch.randint(0, 128, (8, 65), device="cuda"), 30)
    assert losses[-1] < losses[0] - 1.0


def test_compiled_chunked_loss_follows_the_full_logits():
    """loss_chunk under torch.compile and bf16 autocast: the first steps match the full path
    to bf16 rounding, and the loss falls as far."""
    curves = []
    for chunk in (0, 96):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=4, n_embd=64)).cuda()
        model.loss_chunk = chunk
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        x = torch.randint(0, 128, (8, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        curves.append(compiled_bf16_losses(model, opt, x, 20))
    assert curves[1][:5] == pytest.approx(curves[0][:5], abs=2e-2)
    assert curves[1][-1] < curves[1][0] - 1.0 and abs(curves[1][-1] - curves[0][-1]) < 0.2


def test_fp16_with_grad_scaler():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randint(0, 64, (4, 33), device="cuda")
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.float16):
            _, loss = model(x[:, :-1], x[:, 1:])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)


def test_striped_adamw_on_cuda_matches_cpu():
    from nanogpt.optim import StripedAdamW
    torch.manual_seed(0)
    p_cpu = torch.nn.Parameter(torch.randn(3, 64, 32))
    p_gpu = torch.nn.Parameter(p_cpu.detach().cuda())
    o_cpu, o_gpu = StripedAdamW([p_cpu], lr=1e-2, weight_decay=0.1), StripedAdamW([p_gpu], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(3, 64, 32)
        p_cpu.grad, p_gpu.grad = g.clone(), g.cuda()
        o_cpu.step()
        o_gpu.step()
    torch.testing.assert_close(p_gpu.detach().cpu(), p_cpu.detach(), rtol=1e-5, atol=1e-6)
    o_bf = StripedAdamW([p_gpu], lr=1e-2, state_dtype=torch.bfloat16)
    p_gpu.grad = torch.randn_like(p_gpu)
    o_bf.step()
    assert o_bf.state[p_gpu]["exp_avg"].dtype == torch.bfloat16 and torch.isfinite(p_gpu).all()


def test_fused_striped_adamw_equals_the_multi_tensor_path():
    """The Triton kernels against torch's multi-tensor path, on GPT-2-like matrices and a few odd
    shapes, over several steps with weight decay."""
    pytest.importorskip("triton")
    from nanogpt.optim import StripedAdamW
    torch.manual_seed(0)
    shapes = [(768, 2304), (3072, 768), (50304, 768), (33, 17), (1, 130), (768,)]
    a = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    oa = StripedAdamW(a, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    ob = StripedAdamW(b, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=True, fused=True)
    for step in range(10):
        for x, y in zip(a, b):
            x.grad = torch.randn_like(x) * (1 + step)
            y.grad = x.grad.clone()
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
        for k in oa.state[x]:
            if k != "step":
                torch.testing.assert_close(ob.state[y][k], oa.state[x][k], rtol=1e-6, atol=1e-7)


def test_cuda_graph_sampling_with_bfloat16_weights():
    """sample.py casts weights to bf16 on CUDA; masked-out cache slots must not poison attention
    (0 * nan = nan), which multinomial would reject."""
    torch.manual_seed(0)
    junk = torch.full((4, 1 << 20), float("nan"), device="cuda")  # leave nan in the allocator's cache
    del junk
    model = GPT(GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=64)).cuda().eval().to(torch.bfloat16)
    out = generate(model, torch.zeros(2, 1, dtype=torch.long, device="cuda"), 100, temperature=1.0)
    torch.cuda.synchronize()
    assert out.shape == (2, 101) and int(out.max()) < 512


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with float8 matrix units (compute capability 8.9+)")
def test_compiled_fp8_follows_bf16():
    """fp8=True under torch.compile and bf16 autocast: torch._scaled_mm takes the operands as laid
    out, the first losses match the bf16 path to float8 rounding and the loss falls as far."""
    from nanogpt import fp8
    curves = []
    for use_fp8 in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=4, n_embd=64)).cuda()
        if use_fp8:
            assert fp8.enable(model) == 8
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
        x = torch.randint(0, 128, (8, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        curves.append(compiled_bf16_losses(model, opt, x, 20))
    assert curves[1][:3] == pytest.approx(curves[0][:3], abs=5e-2)
    assert curves[1][-1] < curves[1][0] - 1.0 and abs(curves[1][-1] - curves[0][-1]) < 0.3
