"""The GPT-2 model, in one file.

Parameter names follow GPT-2's (transformer.wte, transformer.h.0.attn.c_attn, ...), so released
checkpoints map onto it directly. Shapes in comments: B batch, T time, C channels (n_embd),
nh heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


def autocast_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype autocast runs matrix products in on this device, or ``default`` outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257, padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers, as in GPT-2
    # optional features; the defaults are GPT-2
    rope: bool = False  # rotary position embeddings on q and k instead of the learned wpe
    qk_norm: bool = False  # RMS-normalise q and k per head before attention
    mlp_activation: str = "gelu"  # 'gelu' (GPT-2's tanh GELU) or 'relu2' (ReLU, squared)
    untied_head: bool = False  # an output layer of its own instead of the token embeddings


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to max_len."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        # zeros, not empty: masked-out positions still meet softmax weights of 0, and 0 * nan is nan
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # tokens already cached

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store (B, nh, T, hs) keys/values at the current position; return everything so far."""
        T = k.size(2)
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Store one (B, nh, 1, hs) key/value at the position held in ``pos`` (1,), a device
        tensor, and return the whole preallocated cache: shapes never change (CUDA graphs)."""
        self.k[layer].index_copy_(2, pos, k)
        self.v[layer].index_copy_(2, pos, v)
        return self.k[layer], self.v[layer]


def rotary_tables(config: GPTConfig, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (block_size, hs/2) of RoPE's angles: position t turns channel pair i by t * base^(-2i/hs)."""
    hs = config.n_embd // config.n_head
    inv_freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float32), inv_freq)  # (block_size, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (i, i + hs/2) of x (B, nh, T, hs) by its angle; cos, sin (T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class _ChunkedLMLoss(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight^T against targets, one chunk of rows at a time:
    the (N, V) logits never exist at once, only (chunk, V). The gradients are computed on the way
    (softmax minus one-hot, times weight or x), so backward only scales them."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int):
        # x (N, C), weight (V, C), targets (N,) with -1 = ignored
        dev = x.device.type
        amp = torch.is_autocast_enabled(dev)
        dt = autocast_dtype(dev, weight.dtype)  # the matmuls' dtype, as lm_head would use
        if dt == torch.float16:
            dt = torch.float32  # gradients are formed here, before any loss scaling: float16 would underflow
        count = (targets != -1).sum().clamp(min=1).float()
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        with torch.autocast(dev, enabled=False) if amp else contextlib.nullcontext():
            w = weight.to(dt)
            for s in range(0, x.size(0), chunk):
                xc, tc = x[s:s + chunk].to(dt), targets[s:s + chunk]
                keep = (tc != -1).float()[:, None]  # (n, 1)
                safe = tc.clamp(min=0)[:, None]  # (n, 1)
                logits = (xc @ w.t()).float()  # (n, V)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (n, 1)
                total += ((lse - logits.gather(1, safe)) * keep).sum()
                p = logits.sub_(lse).exp_()  # softmax, in the logits' memory
                p = p.scatter_add_(1, safe, -torch.ones_like(keep)).mul_(keep).to(dt)  # d loss_sum / d logits
                grad_x[s:s + chunk] = p @ w  # (n, C)
                grad_w += p.t() @ xc  # (V, C)
        ctx.save_for_backward(grad_x.div_(count), grad_w.div_(count))  # in place: no second (V, C) buffer
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_out, grad_w * grad_out, None, None


def chunked_cross_entropy(x, weight, targets, chunk: int):
    """F.cross_entropy(x @ weight^T, targets, ignore_index=-1) without the (N, V) logits."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLMLoss.apply(x, weight, targets, chunk)
    total = torch.zeros((), device=x.device, dtype=torch.float32)
    for s in range(0, x.size(0), chunk):
        logits = (x[s:s + chunk] @ weight.t()).float()
        total += F.cross_entropy(logits, targets[s:s + chunk], ignore_index=-1, reduction="sum")
    return total / (targets != -1).sum().clamp(min=1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, rot=None, cache: KVCache | None = None, layer: int = 0, step=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rot is not None:  # RoPE: (cos, sin) of these positions, (T, hs/2) each
            q, k = apply_rotary(q, *rot), apply_rotary(k, *rot)
        mask, causal = None, True
        if step is not None:  # one token at a device-held position: attend to the whole cache, masked
            pos, mask = step
            k, v = cache.write(layer, k, v, pos)  # (B, nh, max_len, hs)
            # plain matmuls: fused attention kernels tile over queries, and here there is only one
            att = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, 1, max_len)
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(v.dtype)
            y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, 1, C)
            return self.resid_dropout(self.c_proj(y))
        if cache is not None:
            start = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nh, start+T, hs)
            if start > 0:
                causal = False
                if T > 1:  # a chunk after cached tokens: query i sees keys up to start+i
                    mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.relu2 = config.mlp_activation == "relu2"
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's own GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, 4C)
        h = F.relu(h).square() if self.relu2 else self.gelu(h)
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rot=None, cache: KVCache | None = None, layer: int = 0, step=None):
        x = x + self.attn(self.ln_1(x), rot, cache, layer, step)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.mlp_activation not in ("gelu", "relu2"):
            raise ValueError("mlp_activation must be 'gelu' or 'relu2'; got %r" % config.mlp_activation)
        if config.rope and (config.n_embd // config.n_head) % 2:
            raise ValueError("rope needs an even head size; n_embd/n_head is %d" % (config.n_embd // config.n_head))
        self.config = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd)))
        if config.rope:  # positions enter as rotations of q and k: no learned table
            cos, sin = rotary_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.drop = nn.Dropout(config.dropout)
        self.transformer.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.transformer.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if not config.untied_head:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.activation_checkpointing = False  # a training choice, not part of the architecture
        self.loss_chunk = 0  # > 0: the loss in chunks of this many positions, no full logits (training choice too)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down by sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _apply(self, fn, *args, **kwargs):
        """.to() / .cuda() / .half() also reach the RoPE tables; rebuild them in float32 on the new
        device, so a model cast to bfloat16 still turns q and k by exact angles."""
        super()._apply(fn, *args, **kwargs)
        if self.config.rope:
            cos, sin = rotary_tables(self.config)
            self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. non_embedding leaves out the lookup tables (position embeddings, and
        the token embeddings unless they are the tied output layer): the weights that cost FLOPs."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if self.config.untied_head:
                n -= self.transformer.wte.weight.numel()
        return n

    def _positions(self, x, pos):
        """Add position information for positions ``pos`` (T,) to x (B, T, C): the learned table,
        or, with RoPE, return the (cos, sin) rows that attention turns q and k by."""
        if self.config.rope:
            return x, (self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos))
        return x + self.transformer.wpe(pos), None

    def forward(self, idx, targets=None, cache: KVCache | None = None, last_only: bool = False):
        """idx (B, T) token ids -> logits (B, T, V), or (B, 1, V) with last_only; loss with targets."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError("sequence of %d tokens exceeds block_size %d" % (start + T, self.config.block_size))
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x, rot = self._positions(self.transformer.wte(idx), pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rot, use_reentrant=False)  # recomputed in backward
            else:
                x = block(x, rot, cache, i)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None and self.loss_chunk:  # no (B, T, V) logits: none are returned
            return None, chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), self.loss_chunk)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        if last_only:
            x = x[:, [-1], :]  # (B, 1, C): generation needs only the last position
        return self.lm_head(x), None

    def decode_step(self, idx, pos, cache: KVCache):
        """idx (B, 1), the token at position ``pos`` (a (1,) device tensor) -> logits (B, V).
        Every shape is fixed, whatever the position, so the step can be captured as a CUDA graph."""
        L = cache.k.size(3)
        mask = (torch.arange(L, device=idx.device) <= pos).view(1, 1, 1, L)  # keys written so far
        x, rot = self._positions(self.transformer.wte(idx), pos)  # (B, 1, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rot, cache, i, (pos, mask))
        return self.lm_head(self.transformer.ln_f(x))[:, -1, :]  # (B, V)

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (e.g. load GPT-2's 1024 and train at 256)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if self.config.rope:
            self.rope_cos, self.rope_sin = self.rope_cos[:block_size], self.rope_sin[:block_size]
        else:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight plus attention scores."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T

    # ---------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True, vocab_limit: int | None = None,
                 generator: torch.Generator | None = None, cuda_graph: bool = True):
        """Extend idx (B, T) by max_new_tokens tokens.

        With the cache, the prompt is run once (prefill) and each new token costs one position.
        Once the sequence no longer fits in block_size the window slides: the last block_size
        tokens are re-run from position 0, which is what the uncached path does, so both give the
        same tokens. temperature=0 is greedy; vocab_limit masks padded vocabulary entries.
        On CUDA the one-token step is replayed as a CUDA graph (one launch instead of hundreds);
        ``cuda_graph=False`` runs it eagerly.
        """
        with _generation_attention(idx.device.type):
            static = use_cache and cuda_graph and idx.is_cuda
            return self._generate(idx, max_new_tokens, temperature, top_k, top_p, use_cache, vocab_limit, generator,
                                  static, static)

    def _generate(self, idx, max_new_tokens, temperature, top_k, top_p, use_cache, vocab_limit, generator,
                  static=False, graph=False):
        bs = self.config.block_size
        cache, step = None, None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -bs:], last_only=True)
            elif cache is None or cache.pos >= bs:
                ctx = idx[:, -bs:]
                if cache is None:
                    p = next(self.parameters())
                    cache = KVCache(self.config, idx.size(0), bs, idx.device, autocast_dtype(idx.device.type, p.dtype))
                cache.pos = 0
                logits, _ = self(ctx, cache=cache, last_only=True)
                if static and step is None:
                    step = _DecodeStep(self, cache, idx.size(0), graph)
            elif step is not None:
                logits = step(idx[:, -1:], cache.pos)[:, None, :]
                cache.pos += 1
            else:
                logits, _ = self(idx[:, -1:], cache=cache, last_only=True)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, vocab_limit, generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # ---------------------------------------------------------------------------------------
    # released GPT-2 weights

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: float | None = None) -> "GPT":
        """Load GPT-2 weights from the Hugging Face hub ('gpt2' ... 'gpt2-xl') or a local
        folder written by ``save_pretrained`` (config.json + model.safetensors or
        pytorch_model.bin). transformers is not needed."""
        folder = hf_folder(name_or_path)
        with open(os.path.join(folder, "config.json")) as f:
            hf = json.load(f)
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ValueError("%s holds a %r model, not GPT-2" % (folder, hf.get("model_type")))
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError("%s uses activation %r; only GPT-2's tanh GELU is supported" % (folder, act))
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ValueError("%s sets %s, which this model does not implement" % (folder, flag))
        if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
            raise ValueError("%s uses layer_norm_epsilon=%s; GPT-2 uses 1e-5" % (folder, hf.get("layer_norm_epsilon")))
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                           dropout=hf.get("resid_pdrop", 0.1) if dropout is None else dropout,
                           untied_head=not hf.get("tie_word_embeddings", True))
        model = cls(config)
        sd = model.state_dict()
        src = _read_hf_weights(folder)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        loaded = set()
        for key, w in src.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # causal-mask buffers, not weights
            name = key if key.startswith(("transformer.", "lm_head.")) else "transformer." + key
            if name not in sd:
                raise ValueError("unexpected weight %r in %s" % (key, folder))
            if name.endswith(transposed):
                w = w.t()  # GPT-2 stores these as Conv1D: (in, out)
            if w.shape != sd[name].shape:
                raise ValueError("weight %r has shape %s, expected %s" % (key, tuple(w.shape), tuple(sd[name].shape)))
            with torch.no_grad():
                sd[name].copy_(w)
            loaded.add(name)
        missing = set(sd) - loaded - (set() if config.untied_head else {"lm_head.weight"})  # a tied lm_head is wte
        if missing:
            raise ValueError("%s lacks weights: %s" % (folder, ", ".join(sorted(missing)[:5])))
        return model


class _DecodeStep:
    """The one-token step with fixed input buffers, captured once as a CUDA graph (``graph``) or
    run eagerly; call it with the last token (B, 1) and its position."""

    def __init__(self, model: GPT, cache: KVCache, batch: int, graph: bool):
        dev = cache.k.device
        self.model, self.cache = model, cache
        self.idx = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), cache.pos, dtype=torch.long, device=dev)
        self.graph = None
        if graph:
            # autocast's weight cache would live outside the graph's memory: cast inside it instead.
            # Warm-up and capture write a key/value at cache.pos, which the real step overwrites.
            amp = torch.autocast(dev.type, dtype=torch.get_autocast_dtype(dev.type),
                                 enabled=torch.is_autocast_enabled(dev.type), cache_enabled=False)
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side), amp:
                for _ in range(2):
                    model.decode_step(self.idx, self.pos, cache)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), amp:
                self.logits = model.decode_step(self.idx, self.pos, cache)

    def __call__(self, last, pos: int):
        self.idx.copy_(last)
        self.pos.fill_(pos)
        if self.graph is None:
            return self.model.decode_step(self.idx, self.pos, self.cache)
        self.graph.replay()
        return self.logits


def _generation_attention(device_type: str):
    """Generation changes the attention shape at every token. cuDNN's attention builds a plan per
    new shape (tens of ms each), so leave it out here and let flash / memory-efficient run."""
    if device_type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def sample_next(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                vocab_limit: int | None = None, generator: torch.Generator | None = None):
    """Pick the next token from logits (B, V) -> (B, 1)."""
    # masked_fill, not boolean indexing: indexing waits for the GPU to count the mask, at every token
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.size(-1):
        logits = logits.clone()
        logits[:, vocab_limit:] = -float("inf")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, -float("inf"))
        logits = torch.full_like(logits, -float("inf")).scatter(1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


HUB_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
             "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


def hf_folder(name_or_path: str) -> str:
    """A local folder with config.json and weights: as given, or downloaded from the hub."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError("%s has no config.json; expected a folder written by save_pretrained" % name_or_path)
        return name_or_path
    if name_or_path not in HUB_NAMES:
        raise FileNotFoundError("%r is neither a GPT-2 name (%s) nor a folder" % (name_or_path, ", ".join(HUB_NAMES)))
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("loading %s needs huggingface_hub: pip install 'nanogpt[hf]'" % name_or_path) from None
    return snapshot_download(HUB_NAMES[name_or_path], allow_patterns=["config.json", "*.safetensors"])


def _read_hf_weights(folder: str) -> dict:
    st = os.path.join(folder, "model.safetensors")
    if os.path.isfile(st):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError("reading %s needs safetensors: pip install safetensors" % st) from None
        return load_file(st)
    pt = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError("%s has neither model.safetensors nor pytorch_model.bin" % folder)


def model_args(config: GPTConfig) -> dict:
    return asdict(config)
