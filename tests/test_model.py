"""The model against Hugging Face's GPT-2, and cached generation against uncached."""

import pytest
import torch

from nanogpt.generate import KVCache, generate, sample_next
from nanogpt.model import GPT, GPTConfig


def small_config(**kw):
    base = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    base.update(kw)
    return GPTConfig(**base)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=48, vocab_size=211,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():  # random biases and LayerNorm affine too, so every weight matters
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("hf_gpt2")
    hf.save_pretrained(folder)
    return folder, hf.eval()


def test_logits_match_hugging_face(hf_folder):
    folder, hf = hf_folder
    ours = GPT.from_pretrained(str(folder)).eval()
    idx = torch.randint(0, 211, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(idx).logits
        got, _ = ours(idx)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5


def test_greedy_continuation_matches_hugging_face(hf_folder):
    folder, hf = hf_folder
    ours = GPT.from_pretrained(str(folder)).eval()
    idx = torch.randint(0, 211, (1, 5), generator=torch.Generator().manual_seed(2))
    ref = hf.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=0)
    got = generate(ours, idx, 20, temperature=0)
    assert got.tolist() == ref.tolist()


def test_pretrained_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a GPT-2 name"):
        GPT.from_pretrained("not-a-model")


@pytest.mark.parametrize("prompt_len,new", [(1, 40), (7, 10), (20, 50)])
def test_kv_cache_greedy_equals_uncached(prompt_len, new):
    """Greedy decoding with the cache gives the same tokens, also past block_size (window slides)."""
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (2, prompt_len))
    a = generate(model, idx, new, temperature=0, use_cache=True)
    b = generate(model, idx, new, temperature=0, use_cache=False)
    assert a.shape == (2, prompt_len + new)
    assert torch.equal(a, b)


@pytest.mark.parametrize("prompt_len,new", [(1, 40), (20, 50)])
def test_fixed_shape_decode_step_equals_uncached(prompt_len, new):
    """The one-token step with a full-length masked cache (what CUDA replays as a graph) gives
    the uncached tokens, also past block_size."""
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (2, prompt_len))
    with torch.no_grad():
        a = generate(model, idx, new, temperature=0, fixed_shape=True, cuda_graph=False)
    b = generate(model, idx, new, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_kv_cache_logits_equal_full_forward():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
        a, _ = model(idx[:, :8], cache=cache)        # prefill
        b, _ = model(idx[:, 8:13], cache=cache)      # a chunk after cached tokens
        steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(13, 20)]  # one at a time
    got = torch.cat([a, b] + steps, dim=1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_sampled_generation_same_with_and_without_cache():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    idx = torch.randint(0, 97, (1, 4))
    kw = dict(temperature=0.9, top_k=20, top_p=0.9)
    a = generate(model, idx, 30, use_cache=True, generator=torch.Generator().manual_seed(5), **kw)
    b = generate(model, idx, 30, use_cache=False, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]])
    assert sample_next(logits, temperature=0).item() == 4
    g = torch.Generator().manual_seed(0)
    # top_k=2 keeps ids 3 and 4 only
    picks = {sample_next(logits, 5.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {3, 4}
    # top_p just above the top token's probability keeps the top two
    p = torch.softmax(logits, -1)[0]
    picks = {sample_next(logits, 1.0, top_p=float(p[4]) + 1e-4, generator=g).item() for _ in range(300)}
    assert picks <= {3, 4} and 4 in picks
    # padded vocabulary entries are never chosen
    assert sample_next(torch.tensor([[0.0, 0.0, 99.0]]), 0, vocab_limit=2).item() in (0, 1)


def test_init_and_tying():
    model = GPT(small_config(n_layer=4, n_embd=64, bias=False))
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 4) ** 0.5) < 0.003
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params() == n - 32 * 64
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 4 * 64 * 32


def test_crop_block_size_and_loss():
    torch.manual_seed(0)
    model = GPT(small_config())
    model.crop_block_size(16)
    idx, targets = torch.randint(0, 97, (2, 2, 16))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(97.0)).item(), abs=0.3)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.randint(0, 97, (1, 17)))
