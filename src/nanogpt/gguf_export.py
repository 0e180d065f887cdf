"""GGUF export for llama.cpp and ollama: ``python export.py --out_dir=out --gguf=model.gguf``.

The file is written with the ``gguf`` package's writer (``pip install gguf``; the converter is
this module). Each model maps onto an architecture llama.cpp already runs, with the same maths:

- GPT-2-shaped (learned positions, GELU): ``gpt2``;
- ``rope=True`` with GELU: ``starcoder2`` (LayerNorm with bias, plain GELU MLP, NEOX RoPE);
- ``rope=True`` with ``mlp_activation='relu2'``: ``nemotron`` (LayerNorm with bias, plain ReLU² MLP,
  NEOX RoPE).

``untied_head`` becomes a separate ``output.weight``. ``qk_norm`` (and ReLU² without RoPE) have no
llama.cpp architecture with the same maths and are refused. A model without biases gets zero
biases where the architecture requires them.

RoPE: our rotary pairs channel i with i + hs/2 (llama.cpp's NEOX layout) but turns by -angle where
llama.cpp turns by +angle. Negating the second half of every head's query and key rows turns one
into the other (the attention scores are the same), so those rows are written negated.

Tokenizer: GPT-2 BPE as ``tokenizer.ggml.model = gpt2`` with its tokens and merges,
``<|endoftext|>`` as BOS and EOS; a character table as ``rwkv``, llama.cpp's greedy tokenizer over
raw token bytes (with one token per character it reads text character by character, and has no
end-of-text id, so generation runs to its length limit); ``tokenizer=False`` writes ``none`` (the
caller feeds token ids).
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from .errors import ExportError
from .model import GPT, features_on
from .tokenizer import BPE_FILES, EOT_TEXT, GPT2_VOCAB, Vocabulary

GGUF_TYPES = ("f32", "f16", "q8_0")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, as in model.py
ROPE_BASE = 10000.0  # model.rotary_tables' default
# token types of llama.cpp's vocabulary (gguf.TokenType)
NORMAL, CONTROL, UNUSED = 1, 3, 5


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ExportError("writing a GGUF file needs the gguf package: pip install gguf (or pip install -e '.[gguf]')") from None
    return gguf


def architecture(model_args: dict, source: str) -> str:
    """The llama.cpp architecture that computes what this model computes, or an ExportError
    naming the feature that none has."""
    on = features_on(model_args)
    if on.get("qk_norm"):
        raise ExportError("%s has qk_norm=True: no llama.cpp architecture RMS-normalises queries and keys inside a "
                          "LayerNorm block with a plain MLP, so it cannot be exported to GGUF" % source)
    relu2 = on.get("mlp_activation") == "relu2"
    if not on.get("rope"):
        if relu2:
            raise ExportError("%s has mlp_activation='relu2' with learned positions (rope=False): llama.cpp's ReLU² "
                              "architecture (nemotron) needs RoPE, so it cannot be exported to GGUF" % source)
        return "gpt2"
    return "nemotron" if relu2 else "starcoder2"


# --------------------------------------------------------------------------------------------
# weights


def _flip_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Negate the second half of each head's rows of a query or key weight (C, ...) or bias (C,)."""
    hs = w.size(0) // n_head
    sign = torch.ones(n_head, 2, hs // 2, dtype=w.dtype)
    sign[:, 1] = -1
    return w * sign.reshape(-1, *([1] * (w.dim() - 1)))


def gguf_tensors(model: GPT, arch: str) -> dict[str, torch.Tensor]:
    """Our weights under llama.cpp's tensor names, float32, in the row-major layout GGUF stores
    (a Linear's (out, in), which llama.cpp reads as {in, out})."""
    cfg = model.config
    C = cfg.n_embd
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}

    def get(name, size):  # a weight, or zeros for a bias the model does not have
        return sd[name] if name in sd else torch.zeros(size)

    out = {"token_embd.weight": sd["transformer.wte.weight"]}
    if arch == "gpt2":
        out["position_embd.weight"] = sd["transformer.wpe.weight"]
    out["output_norm.weight"] = sd["transformer.ln_f.weight"]
    out["output_norm.bias"] = get("transformer.ln_f.bias", C)
    if cfg.untied_head or arch == "nemotron":  # nemotron has no tied output
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, b = "transformer.h.%d." % i, "blk.%d." % i
        out[b + "attn_norm.weight"] = sd[p + "ln_1.weight"]
        out[b + "attn_norm.bias"] = get(p + "ln_1.bias", C)
        w, bias = sd[p + "attn.c_attn.weight"], get(p + "attn.c_attn.bias", 3 * C)  # (3C, C), (3C,)
        if arch == "gpt2":
            out[b + "attn_qkv.weight"], out[b + "attn_qkv.bias"] = w, bias
        else:  # separate q, k, v: every llama.cpp version reads them for these architectures
            for j, part in enumerate(("q", "k", "v")):
                wj, bj = w[j * C:(j + 1) * C], bias[j * C:(j + 1) * C]
                if part != "v":
                    wj, bj = _flip_rotary(wj, cfg.n_head), _flip_rotary(bj, cfg.n_head)
                out[b + "attn_%s.weight" % part] = wj
                if cfg.bias:
                    out[b + "attn_%s.bias" % part] = bj
        out[b + "attn_output.weight"] = sd[p + "attn.c_proj.weight"]
        if cfg.bias or arch != "nemotron":
            out[b + "attn_output.bias"] = get(p + "attn.c_proj.bias", C)
        out[b + "ffn_norm.weight"] = sd[p + "ln_2.weight"]
        out[b + "ffn_norm.bias"] = get(p + "ln_2.bias", C)
        out[b + "ffn_up.weight"] = sd[p + "mlp.c_fc.weight"]
        out[b + "ffn_down.weight"] = sd[p + "mlp.c_proj.weight"]
        if cfg.bias or arch != "nemotron":
            out[b + "ffn_up.bias"] = get(p + "mlp.c_fc.bias", 4 * C)
            out[b + "ffn_down.bias"] = get(p + "mlp.c_proj.bias", C)
    return {k: v.contiguous() for k, v in out.items()}


def tensor_type(name: str, t: torch.Tensor, gguf_type: str) -> str:
    """The type one tensor is stored in: 1-D tensors (norms, biases) stay f32; q8_0 needs rows
    whose length is a multiple of 32 and falls back to f16 otherwise."""
    if t.dim() < 2 or gguf_type == "f32":
        return "f32"
    if gguf_type == "q8_0" and t.size(-1) % 32:
        return "f16"
    return gguf_type


# --------------------------------------------------------------------------------------------
# tokenizer


def _escape(text: str) -> str:
    """A token's text as llama.cpp's RWKV vocabulary stores it: backslash escapes for \\, newline,
    tab and carriage return, \\xNN for other control characters, anything else as itself."""
    out = []
    for c in text:
        if c in "\\\n\t\r":
            out.append({"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}[c])
        elif ord(c) < 32 or ord(c) == 127:
            out.append("\\x%02x" % ord(c))
        else:
            out.append(c)
    return "".join(out)


def tokenizer_metadata(vocab: Vocabulary | None, vocab_size: int, mirror: str | None = None) -> dict:
    """The tokenizer.ggml.* entries: model, pre, tokens, token types, merges, special ids.
    ``vocab`` None writes the 'none' tokenizer (token ids in, token ids out)."""
    if vocab is None:
        return {"model": "none"}
    if vocab.kind == "gpt2":
        from .download import fetch
        from .errors import PrepareError
        files = {}
        with tempfile.TemporaryDirectory(prefix="nanogpt-bpe-") as tmp:
            for name, url, sha, mirror_path in BPE_FILES:
                try:
                    path = fetch(url, os.path.join(tmp, name), sha, mirror_path, mirror)
                except PrepareError as e:
                    raise ExportError("%s; or pass --tokenizer=False to write the weights alone" % e) from None
                with open(path, encoding="utf-8") as f:
                    files[name] = f.read()
        encoder = json.loads(files["vocab.json"])
        tokens = [""] * GPT2_VOCAB
        for text, i in encoder.items():
            tokens[i] = text
        types = [CONTROL if t == EOT_TEXT else NORMAL for t in tokens]
        merges = [line for line in files["merges.txt"].split("\n")[1:] if line]
        tok = {"model": "gpt2", "pre": "gpt-2", "merges": merges, "eot": GPT2_VOCAB - 1}
    elif vocab.kind == "char":
        # llama.cpp's RWKV tokenizer: the longest token whose bytes start the text, so with one
        # token per character it reads text character by character; it has no end-of-text id
        itos = {int(k): v for k, v in vocab.meta["itos"].items()}
        if "\n" not in itos.values():
            raise ExportError("the character vocabulary has no newline, which llama.cpp's character-level (RWKV) tokenizer "
                              "requires; pass --tokenizer=False to write the weights alone")
        tokens = [_escape(itos[i]) if i in itos else "<|unused%d|>" % i for i in range(max(itos) + 1)]
        types = [NORMAL if i in itos else UNUSED for i in range(len(tokens))]
        tok = {"model": "rwkv"}
    elif vocab.meta is None:
        raise ExportError("the meta.json of the training dataset (%s) was not found, so its vocabulary is unknown; pass "
                          "--data_root=FOLDER holding it, or --tokenizer=False to write the weights alone"
                          % (vocab.dataset or "not recorded"))
    else:
        raise ExportError("the model's vocabulary (%s) is neither GPT-2 BPE nor a character table, which is all this "
                          "export spells for llama.cpp; pass --tokenizer=False to write the weights alone" % vocab.name)
    if len(tokens) < vocab_size:  # ids past the tokenizer: padding the model never sees in training
        tokens += ["<|pad%d|>" % i for i in range(len(tokens), vocab_size)]
        types += [UNUSED] * (vocab_size - len(types))
    return dict(tok, tokens=tokens, types=types)


# --------------------------------------------------------------------------------------------
# the file


def check_gguf_target(path: str, overwrite: bool, protected: str | None = None) -> None:
    if os.path.isdir(path):
        raise ExportError("gguf %s is a folder; pass a file name such as --gguf=model.gguf" % path)
    if protected and os.path.realpath(path) == os.path.realpath(protected):
        raise ExportError("gguf %s is the checkpoint being exported; choose another --gguf" % path)
    if os.path.lexists(path) and not overwrite:
        raise ExportError("gguf %s exists; choose another --gguf, or pass --overwrite=True to replace it" % path)


def write_gguf(model: GPT, path: str, vocab: Vocabulary | None, gguf_type: str = "f16", *, name: str = "nanogpt",
               mirror: str | None = None, source: str = "the model") -> dict:
    """Write ``model`` as a GGUF file at ``path`` (atomically: a temporary file renamed into
    place). Returns a summary: architecture, tensor count, types used, bytes."""
    if gguf_type not in GGUF_TYPES:
        raise ExportError("gguf_type must be one of %s; got %r" % (", ".join(GGUF_TYPES), gguf_type))
    gguf = _import_gguf()
    cfg = model.config
    arch = architecture(vars(cfg), source)
    tok = tokenizer_metadata(vocab, cfg.vocab_size, mirror)  # before anything is written
    tensors = gguf_tensors(model, arch)

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    qtypes = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    used = {}
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
        w.add_file_type(file_types[gguf_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_head)
        w.add_layer_norm_eps(LAYER_NORM_EPS)
        w.add_vocab_size(cfg.vocab_size)
        if arch != "gpt2":
            w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
            w.add_rope_freq_base(ROPE_BASE)
        w.add_tokenizer_model(tok["model"])
        if tok["model"] != "none":
            w.add_token_list(tok["tokens"])
            w.add_token_types(tok["types"])
            w.add_add_bos_token(False)
        if tok["model"] == "gpt2":
            w.add_tokenizer_pre(tok["pre"])
            w.add_token_merges(tok["merges"])
            w.add_bos_token_id(tok["eot"])
            w.add_eos_token_id(tok["eot"])
        for tname, t in tensors.items():
            kind = tensor_type(tname, t, gguf_type)
            used[kind] = used.get(kind, 0) + 1
            data = t.numpy()
            if kind == "f16":
                w.add_tensor(tname, data.astype("float16"))
            elif kind == "q8_0":
                w.add_tensor(tname, gguf.quants.quantize(data, qtypes["q8_0"]), raw_dtype=qtypes["q8_0"])
            else:
                w.add_tensor(tname, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"arch": arch, "tensors": len(tensors), "types": used, "bytes": os.path.getsize(path),
            "tokenizer": tok["model"] if vocab is None else vocab.kind}
