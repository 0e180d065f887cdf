"""GGUF export: gguf's reader finds every tensor and key; a forward pass written here from the
GGUF tensors alone (llama.cpp's maths: its NEOX RoPE, its tensor names) gives our logits; and,
when llama-cpp-python is installed (scripts/install_llama_cpp.sh), llama.cpp itself does."""

import os
from dataclasses import asdict

import pytest
import torch
from torch.nn import functional as F

gguf = pytest.importorskip("gguf")

from helpers import assert_one_line_error, run_main  # noqa: E402
from nanogpt import checkpoint  # noqa: E402
from nanogpt.export import main  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402
from nanogpt.train import TrainConfig  # noqa: E402

# the feature sets llama.cpp has an architecture for, and which one
MODELS = {
    "gpt2": dict(bias=True),
    "starcoder2": dict(rope=True, bias=False),
    "nemotron": dict(rope=True, mlp_activation="relu2", untied_head=True, bias=True),
}
# our logits against the GGUF forward, by weight type (norms and biases stay f32), as a fraction
# of the largest logit (about 20 here)
TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "q8_0": 3e-2}


def tiny_model(vocab_size=50304, seed=0, **features):
    """A random model whose logits spread over several units (so greedy choices have margins),
    with LayerNorms and biases off their 1/0 start so every weight matters."""
    torch.manual_seed(seed)
    gconf = GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=64, **features)
    model = GPT(gconf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.transformer.wte.weight.mul_(20)
        if gconf.untied_head:
            model.lm_head.weight.mul_(20)
    return model.eval(), gconf


def save_training_checkpoint(out_dir, model, gconf, **config):
    """A checkpoint as training writes it (the fields export reads)."""
    os.makedirs(out_dir, exist_ok=True)
    ckpt = {"format": checkpoint.FORMAT, "model": model.state_dict(), "model_args": asdict(gconf),
            "config": TrainConfig(**config).to_dict(), "iter_num": 10, "tokens_seen": 1000, "best_val_loss": 3.0, "world_size": 1}
    checkpoint.save(ckpt, os.path.join(out_dir, "ckpt.pt"))


def export_gguf(tmp_path, model, gconf, gguf_type="f32", extra=(), **train_config):
    out = tmp_path / "out"
    if not (out / "ckpt.pt").exists():
        save_training_checkpoint(out, model, gconf, **train_config)
    path = tmp_path / ("model-%s.gguf" % gguf_type)
    main(["--out_dir=%s" % out, "--gguf=%s" % path, "--gguf_type=%s" % gguf_type, *extra])
    return str(path)


def read(path):
    """(metadata dict, {name: float32 tensor in GGUF's row-major layout}, {name: type name})."""
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors, types = {}, {}
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.from_numpy(data.copy()).float().reshape(*reversed([int(n) for n in t.shape]))
        types[t.name] = t.tensor_type.name
    return meta, tensors, types


def neox_rope(x, base):
    """llama.cpp's NEOX rotary on x (nh, T, hs): channel i pairs with i + hs/2, turned by +angle."""
    hs, T = x.size(-1), x.size(-2)
    inv = base ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def gguf_forward(meta, W, ids):
    """Logits (T, V) for token ids (T,), computed from the GGUF file's tensors and keys alone."""
    arch = meta["general.architecture"]
    key = lambda k: meta["%s.%s" % (arch, k)]  # noqa: E731
    C, nh, eps = key("embedding_length"), key("attention.head_count"), key("attention.layer_norm_epsilon")
    T = ids.numel()
    x = W["token_embd.weight"][ids]
    if "position_embd.weight" in W:
        x = x + W["position_embd.weight"][:T]

    def linear(h, name):
        y = h @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    for i in range(key("block_count")):
        b = "blk.%d." % i
        h = F.layer_norm(x, (C,), W[b + "attn_norm.weight"], W[b + "attn_norm.bias"], eps)
        if b + "attn_qkv.weight" in W:
            q, k, v = linear(h, b + "attn_qkv").split(C, dim=-1)
        else:
            q, k, v = (linear(h, b + "attn_" + part) for part in "qkv")
        q, k, v = (t.view(T, nh, C // nh).transpose(0, 1) for t in (q, k, v))  # (nh, T, hs)
        if arch != "gpt2":
            assert key("rope.dimension_count") == C // nh
            q, k = neox_rope(q, key("rope.freq_base")), neox_rope(k, key("rope.freq_base"))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(T, C)
        x = x + linear(y, b + "attn_output")
        h = linear(F.layer_norm(x, (C,), W[b + "ffn_norm.weight"], W[b + "ffn_norm.bias"], eps), b + "ffn_up")
        h = F.relu(h).square() if arch == "nemotron" else F.gelu(h, approximate="tanh")
        x = x + linear(h, b + "ffn_down")
    x = F.layer_norm(x, (C,), W["output_norm.weight"], W["output_norm.bias"], eps)
    return x @ W.get("output.weight", W["token_embd.weight"]).T


def test_gpt2_file_structure(tmp_path, data_mirror):
    model, gconf = tiny_model(**MODELS["gpt2"])
    path = export_gguf(tmp_path, model, gconf, "q8_0", extra=["--mirror=%s" % data_mirror])
    meta, W, types = read(path)
    C, L = gconf.n_embd, gconf.n_layer
    expected = {"token_embd.weight": (gconf.vocab_size, C), "position_embd.weight": (gconf.block_size, C),
                "output_norm.weight": (C,), "output_norm.bias": (C,)}
    for i in range(L):
        b = "blk.%d." % i
        expected.update({b + "attn_norm.weight": (C,), b + "attn_norm.bias": (C,), b + "attn_qkv.weight": (3 * C, C),
                         b + "attn_qkv.bias": (3 * C,), b + "attn_output.weight": (C, C), b + "attn_output.bias": (C,),
                         b + "ffn_norm.weight": (C,), b + "ffn_norm.bias": (C,), b + "ffn_up.weight": (4 * C, C),
                         b + "ffn_up.bias": (4 * C,), b + "ffn_down.weight": (C, 4 * C), b + "ffn_down.bias": (C,)})
    assert {k: tuple(v.shape) for k, v in W.items()} == expected
    assert {types[k] for k in W if W[k].dim() == 2} == {"Q8_0"} and {types[k] for k in W if W[k].dim() == 1} == {"F32"}

    assert meta["general.architecture"] == "gpt2"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (meta["gpt2.context_length"], meta["gpt2.embedding_length"], meta["gpt2.block_count"],
            meta["gpt2.feed_forward_length"], meta["gpt2.attention.head_count"]) == (64, 64, 2, 256, 2)
    assert meta["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    tokens, token_types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(token_types) == gconf.vocab_size == len(set(tokens))
    assert tokens[50256] == "<|endoftext|>" and token_types[50256] == gguf.TokenType.CONTROL
    assert tokens[464] == "The" and tokens[220] == "\u0120" and token_types[464] == gguf.TokenType.NORMAL
    assert set(token_types[50257:]) == {gguf.TokenType.UNUSED}  # the padding ids
    merges = meta["tokenizer.ggml.merges"]
    assert len(merges) == 50000 and merges[0] == "\u0120 t"
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == 50256
    assert meta["tokenizer.ggml.add_bos_token"] is False


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_forward_from_gguf_tensors_matches_ours(tmp_path, arch, gguf_type):
    model, gconf = tiny_model(vocab_size=96, **MODELS[arch])  # no tokenizer: reading GPT-2's 100k strings takes seconds
    path = export_gguf(tmp_path, model, gconf, gguf_type, extra=["--tokenizer=False"])
    meta, W, _ = read(path)
    assert meta["general.architecture"] == arch and meta["tokenizer.ggml.model"] == "none"
    ids = torch.randint(0, 96, (gconf.block_size,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids[None])[0][0]
        theirs = gguf_forward(meta, W, ids)
    err = (ours - theirs).abs().max().item() / ours.abs().max().item()
    print("%s %s: max |logit difference| / max |logit| = %.2g" % (arch, gguf_type, err))
    assert err <= TOLERANCE[gguf_type]
    assert bool((ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.9)


def test_char_vocabulary(tmp_path, data_root):
    from nanogpt.data import load_meta
    stoi = load_meta(str(data_root / "shakespeare_char"))["stoi"]
    model, gconf = tiny_model(vocab_size=len(stoi), rope=True, mlp_activation="relu2")  # the CPU recipe's features
    path = export_gguf(tmp_path, model, gconf, "f32", dataset="shakespeare_char", data_root=str(data_root))
    meta, W, _ = read(path)
    assert meta["general.architecture"] == "nemotron"
    assert meta["tokenizer.ggml.model"] == "rwkv" and "tokenizer.ggml.eos_token_id" not in meta
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(stoi) and set(meta["tokenizer.ggml.token_type"]) == {gguf.TokenType.NORMAL}
    assert tokens[stoi["a"]] == "a" and tokens[stoi[" "]] == " " and tokens[stoi["\n"]] == "\\n"  # RWKV's escapes


def test_refusals_are_one_line(tmp_path, data_root, capsys):
    cases = [(dict(qk_norm=True, rope=True), "qk_norm=True"), (dict(mlp_activation="relu2"), "mlp_activation='relu2'")]
    for i, (features, needle) in enumerate(cases):
        model, gconf = tiny_model(vocab_size=65, **features)
        out = tmp_path / str(i)
        save_training_checkpoint(out, model, gconf, dataset="shakespeare_char", data_root=str(data_root))
        r = run_main("export.py", ["--out_dir=%s" % out, "--gguf=%s/m.gguf" % out], capsys)
        assert_one_line_error(r, needle, "GGUF")
        assert os.listdir(out) == ["ckpt.pt"]  # nothing half-written

    model, gconf = tiny_model(vocab_size=65)
    out = tmp_path / "2"
    save_training_checkpoint(out, model, gconf, dataset="shakespeare_char", data_root=str(data_root))
    args = ["--out_dir=%s" % out, "--gguf=%s/m.gguf" % out, "--tokenizer=False"]
    r = run_main("export.py", args, capsys)
    assert r.returncode == 0, r.stderr
    meta, _, _ = read(str(out / "m.gguf"))
    assert meta["tokenizer.ggml.model"] == "none" and meta["gpt2.vocab_size"] == 65
    assert_one_line_error(run_main("export.py", args, capsys), "exists", "--overwrite=True")
    assert_one_line_error(run_main("export.py", ["--out_dir=%s" % out], capsys), "hf_dir or gguf")


# --------------------------------------------------------------------------------------------
# llama.cpp itself (pip install llama-cpp-python, or scripts/install_llama_cpp.sh)

PROMPTS = ["ROMEO: Wherefore art thou", "The quick brown fox", "It's 2 o'clock", "\n\nFirst Citizen:\n"]
# llama.cpp against our logits: its GELU is a float16 table and its KV cache float16, hence 1e-2 even for f32
LLAMA_TOLERANCE = {"f32": 2e-2, "f16": 5e-2}


def greedy(next_logits, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(next_logits(ids).argmax()))
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_llama_cpp_runs_the_file(tmp_path, data_mirror, arch, gguf_type):
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    from nanogpt.tokenizer import get_gpt2_encoding
    model, gconf = tiny_model(**MODELS[arch])
    path = export_gguf(tmp_path, model, gconf, gguf_type, extra=["--mirror=%s" % data_mirror])
    llm = llama_cpp.Llama(model_path=path, n_ctx=gconf.block_size, n_batch=gconf.block_size, n_threads=2, logits_all=True,
                          verbose=False, seed=0)
    enc = get_gpt2_encoding(str(data_mirror))

    def theirs(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])  # (T, V)

    def ours(ids):
        with torch.no_grad():
            return model(torch.tensor([ids]))[0][0].numpy()

    worst = 0.0
    for prompt in PROMPTS:
        ids = enc.encode(prompt)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        worst = max(worst, float(np.abs(theirs(ids) - ours(ids)).max()))
        n = 16
        want = greedy(lambda x: ours(x)[-1], ids, n)
        got = greedy(lambda x: theirs(x)[-1], ids, n)
        assert got == want, prompt
        assert llm.detokenize(got[len(ids):]).decode("utf-8", "replace") == enc.decode(want[len(ids):])
    assert worst <= LLAMA_TOLERANCE[gguf_type], worst
