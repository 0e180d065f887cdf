"""CUDA paths: skipped without a GPU, run on a GPU machine with `python -m pytest tests/test_gpu.py`."""

import pytest
import torch

from nanogpt.model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_kv_cache_greedy_equals_uncached_on_cuda():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64)).cuda().eval()
    idx = torch.randint(0, 256, (4, 10), device="cuda")
    a = model.generate(idx, 80, temperature=0, use_cache=True)
    b = model.generate(idx, 80, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_bf16_train_steps_reduce_loss_compiled():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=4, n_embd=64)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    cmodel = torch.compile(model)
    x = torch.randint(0, 128, (8, 65), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = cmodel(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


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
