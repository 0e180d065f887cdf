"""Generation: the key/value cache, the token loop, the fixed-shape one-token step (replayed as a
CUDA graph on GPUs) and the sampling filters (temperature, top-k, top-p).

    from nanogpt.generate import generate
    out = generate(model, idx, max_new_tokens=100, temperature=0.8, top_k=200)   # idx (B, T) -> (B, T + 100)
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F

from .model import GPT, GPTConfig
from .runtime import autocast_dtype


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


@torch.no_grad()
def generate(model: GPT, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True, vocab_limit: int | None = None,
             generator: torch.Generator | None = None, cuda_graph: bool = True, fixed_shape: bool | None = None,
             stop=None):
    """Extend idx (B, T) by max_new_tokens tokens.

    With the cache, the prompt is run once (prefill) and each new token costs one position.
    Once the sequence no longer fits in block_size the window slides: the last block_size
    tokens are re-run from position 0, which is what the uncached path does, so both give the
    same tokens. temperature=0 is greedy; vocab_limit masks padded vocabulary entries.
    On CUDA the one-token step has fixed shapes and is replayed as a CUDA graph (one launch
    instead of hundreds); ``cuda_graph=False`` runs it eagerly, ``fixed_shape`` chooses that step
    elsewhere too (default: on CUDA). ``stop(idx)``, when given, is asked after each new token and
    ends the generation early by returning True.
    """
    fixed = use_cache and (idx.is_cuda if fixed_shape is None else fixed_shape)
    graph = fixed and cuda_graph and idx.is_cuda
    bs = model.config.block_size
    cache, step = None, None
    with _generation_attention(idx.device.type):
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = model(idx[:, -bs:], last_only=True)
            elif cache is None or cache.pos >= bs:
                ctx = idx[:, -bs:]
                if cache is None:
                    p = next(model.parameters())
                    cache = KVCache(model.config, idx.size(0), bs, idx.device, autocast_dtype(idx.device.type, p.dtype))
                cache.pos = 0
                logits, _ = model(ctx, cache=cache, last_only=True)
                if fixed and step is None:
                    step = DecodeStep(model, cache, idx.size(0), graph)
            elif step is not None:
                logits = step(idx[:, -1:], cache.pos)[:, None, :]
                cache.pos += 1
            else:
                logits, _ = model(idx[:, -1:], cache=cache, last_only=True)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, vocab_limit, generator)
            idx = torch.cat((idx, idx_next), dim=1)
            if stop is not None and stop(idx):
                break
    return idx


class DecodeStep:
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
