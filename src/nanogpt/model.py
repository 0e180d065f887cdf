"""The GPT-2 model, in one file: its settings and its layers.

Parameter names follow GPT-2's (transformer.wte, transformer.h.0.attn.c_attn, ...), so released
checkpoints map onto it directly. Shapes in comments: B batch, T time, C channels (n_embd),
nh heads, hs head size, V vocabulary.

The optional features (rope, qk_norm, mlp_activation, untied_head) default to GPT-2's values.
A new feature is a field of GPTConfig with ``feature=True`` (its default must be GPT-2's) and its
code below; checkpoints, resume, export and ``init_from='gpt2'`` read the field list from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .config import ConfigError, Section, setting
from .doc_batches import document_attention, document_mask
from .loss import chunked_cross_entropy


@dataclass
class GPTConfig(Section):
    """The model's shape and features: what a checkpoint stores as ``model_args``."""

    block_size: int = setting(1024, "Context length in tokens.", gt=0)
    vocab_size: int = setting(50304, "Vocabulary size; 0 takes it from the dataset's meta.json (50304, GPT-2's 50257 padded, without one).",
                              ge=0, note="0 = from the dataset")
    n_layer: int = setting(12, "Transformer blocks.", gt=0)
    n_head: int = setting(12, "Attention heads per block.", gt=0)
    n_embd: int = setting(768, "Embedding width.", gt=0)
    dropout: float = setting(0.0, "Dropout probability (0.0 for pretraining, try 0.1+ for finetuning).", ge=0, lt=1,
                             training=True)  # a training choice: a resume or finetune may change it
    bias: bool = setting(True, "Bias in Linear and LayerNorm layers (GPT-2 has them; False is slightly better and faster).")
    # optional features; each default is GPT-2's
    rope: bool = setting(False, "Rotary position embeddings (RoPE) on queries and keys instead of GPT-2's learned position table.",
                         feature=True)
    qk_norm: bool = setting(False, "RMS-normalise queries and keys per head before attention (steadier at high learning rates).",
                            feature=True)
    mlp_activation: str = setting("gelu", "MLP non-linearity: 'gelu' (GPT-2's tanh GELU) or 'relu2' (ReLU squared).",
                                  choices=("gelu", "relu2"), feature=True)
    untied_head: bool = setting(False, "Give the output layer its own weights instead of sharing the token embeddings.",
                                feature=True)

    def check(self) -> None:
        if self.n_embd % self.n_head:
            raise ConfigError("n_embd (%d) must be divisible by n_head (%d)" % (self.n_embd, self.n_head))
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ConfigError("rope=True needs an even head size; n_embd/n_head is %d" % (self.n_embd // self.n_head))

    @classmethod
    def from_args(cls, args: dict, **override) -> "GPTConfig":
        """A config from a checkpoint's ``model_args``: every key known, every value checked.
        A key missing from an older checkpoint takes its default (a feature it predates: off)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError("unknown model setting %r (this version knows %s)" % (unknown[0], ", ".join(sorted(known))))
        config = cls(**dict(args, **override))
        config.validate()
        if config.vocab_size == 0:
            raise ConfigError("vocab_size must be > 0; got 0")
        return config


def architecture_keys() -> tuple[str, ...]:
    """The settings that fix the weights' shapes and meaning (all but training choices like dropout)."""
    return tuple(f.name for f in fields(GPTConfig) if not f.metadata.get("training"))


def features() -> dict:
    """Each optional feature and its GPT-2 value (the default)."""
    return {f.name: f.default for f in fields(GPTConfig) if f.metadata.get("feature")}


def features_on(config: GPTConfig | dict) -> dict:
    """The features of ``config`` (or of model_args) that differ from GPT-2."""
    args = asdict(config) if isinstance(config, GPTConfig) else config
    return {k: args[k] for k, v in features().items() if k in args and args[k] != v}


def saved_args(config: GPTConfig) -> dict:
    """``model_args`` as a checkpoint stores them: the shape, and each feature only when it is on.
    A GPT-2-shaped model's are then exactly nanoGPT's seven keys, so nanoGPT's own ``sample.py``
    reads the checkpoint; :meth:`GPTConfig.from_args` gives a missing feature its default."""
    off = features()
    return {k: v for k, v in asdict(config).items() if k not in off or v != off[k]}


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

    def forward(self, x, rot=None, cache=None, layer: int = 0, step=None, docs=None):
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
        if docs is not None:  # doc_attention: each token sees its own document only (doc_batches.py)
            y = document_attention(q, k, v, docs)  # (B, nh, T, hs)
        else:
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

    def forward(self, x, rot=None, cache=None, layer: int = 0, step=None, docs=None):
        x = x + self.attn(self.ln_1(x), rot, cache, layer, step, docs)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        if config.vocab_size == 0:
            raise ConfigError("vocab_size must be > 0 to build a model (0 is only a request to take it from the dataset)")
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
        self.doc_attention = None  # (eot id, 'flex' or 'dense'): attention inside documents (training choice, doc_batches.py)
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
        """Add position information for positions ``pos`` (T,) or (B, T) to x (B, T, C): the learned
        table, or, with RoPE, return the (cos, sin) rows that attention turns q and k by."""
        if self.config.rope and pos.dim() == 2:  # (B, 1, T, hs/2): one set of angles per row
            return x, (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))
        if self.config.rope:
            return x, (self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos))
        return x + self.transformer.wpe(pos), None

    def forward(self, idx, targets=None, cache=None, last_only: bool = False):
        """idx (B, T) token ids -> logits (B, T, V), or (B, 1, V) with last_only; loss with targets.
        ``cache`` (see generate.KVCache) holds the keys and values of earlier positions."""
        B, T = idx.size()
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError("sequence of %d tokens exceeds block_size %d" % (start + T, self.config.block_size))
        docs = None
        if self.doc_attention is not None and cache is None:  # positions from each document's start (B, T)
            pos, docs = document_mask(idx, *self.doc_attention)
        else:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x, rot = self._positions(self.transformer.wte(idx), pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rot, None, i, None, docs, use_reentrant=False)  # recomputed in backward
            else:
                x = block(x, rot, cache, i, docs=docs)
        if cache is not None:
            cache.pos += T
        x = self.transformer.ln_f(x)
        if targets is not None and self.loss_chunk:  # no (B, T, V) logits: none are returned
            return None, chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1), self.loss_chunk)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            # no target at all (a chat batch of prompts only): 0, as the chunked loss gives, not the mean of nothing (nan)
            loss = torch.where((targets != -1).any(), loss, torch.zeros((), device=loss.device, dtype=loss.dtype))
            return logits, loss
        if last_only:
            x = x[:, [-1], :]  # (B, 1, C): generation needs only the last position
        return self.lm_head(x), None

    def decode_step(self, idx, pos, cache):
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

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: float | None = None) -> "GPT":
        """GPT-2 weights: 'gpt2' ... 'gpt2-xl' from the hub, or a local Hugging Face folder (hf.py)."""
        from .hf import load_pretrained
        return load_pretrained(name_or_path, dropout)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight plus attention scores."""
        cfg = self.config
        T = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * T
