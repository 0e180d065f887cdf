"""Generation for several sequences at once through one key/value cache (continuous batching),
and text that streams out token by token.

    engine = Engine(model, vocab, max_batch=8)
    seq = engine.add(prompt_ids, Params(max_tokens=64, temperature=0), on_text=print)
    while engine.busy():
        engine.step()

Every sequence owns one row of a preallocated cache. A new sequence's prompt runs alone into its
row (prefill, the model's own cached forward); then each :meth:`Engine.step` runs the last token of
every active row through the model in one forward, each row at its own position and attending to
its own keys only, so a row's tokens do not depend on what else is in the batch. Sequences join
and leave between steps: a finished row is refilled by the last active one, so the active rows
are always the first ones and the step works on views, never copies of the cache.
``max_batch=1`` serves one sequence at a time.
"""

from __future__ import annotations

import codecs
import random
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field

import torch

from .generate import KVCache, sample_next
from .model import GPT
from .runtime import autocast_dtype


@dataclass
class Params:
    """How one sequence is generated."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one
    seed: int | None = None
    stop_at_eot: bool = True  # end at <|endoftext|> (BPE vocabularies), which is not part of the text
    strip_space: bool = False  # drop one leading space (a chat reply follows "Assistant:")


class TextStream:
    """Token ids in, text out as soon as it is certain: a BPE token may end inside a UTF-8
    character (held until the character is complete), and text that may be the start of a stop
    string is held until it is known not to be one. ``stopped`` is set when a stop string appears."""

    def __init__(self, tokenizer, stop=(), strip_space: bool = False):
        enc = getattr(tokenizer, "enc", None)
        self._bytes = enc.decode_single_token_bytes if enc is not None else None
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = tuple(s for s in stop if s)
        self.strip_space = strip_space
        self.text = ""  # everything decoded (a stop string and what follows it cut off)
        self.sent = 0  # characters of text already handed out
        self.stopped = False

    def _decode(self, token: int) -> str:
        if self._bytes is None:
            return self._tokenizer.decode([token])
        return self._utf8.decode(self._bytes(token))

    def push(self, token: int) -> str:
        """Add one token; return the text that is now certain (may be empty)."""
        if self.stopped:
            return ""
        self.text += self._decode(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back rest, once no more tokens come."""
        if not self.stopped and self._bytes is not None:
            self.text += self._utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.strip_space and self.sent == 0 and self.text.startswith(" "):
            self.text = self.text[1:]
            self.strip_space = False
        elif self.text:
            self.strip_space = False
        end = len(self.text)
        if self.stop and not self.stopped:
            hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                end = len(self.text)
            elif not final:
                end -= max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        out = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return out


@dataclass
class Sequence:
    """One sequence being generated; ``on_text(seq, text)`` receives its text as it comes and
    ``on_done(seq)`` is called once, with ``finish_reason`` set ('stop', 'length' or 'error')."""

    prompt: list[int]
    params: Params
    on_text: object = None
    on_done: object = None
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    max_batch_seen: int = 0  # the most sequences that shared a forward with this one

    @property
    def text(self) -> str:
        return self.stream.text if self.stream else ""


class _RowCache(KVCache):
    """One row of the pool, shaped as a batch-of-one KVCache: the prompt's forward writes into it."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v, self.pos = k, v, 0


class CachePool:
    """Keys and values of ``rows`` sequences, each at its own position. As the cache of a decode
    step it stores each row's new key at that row's position and hands attention the first
    ``active`` rows up to the longest one (``span``); the step's mask hides the rest."""

    def __init__(self, model: GPT, rows: int, device, dtype):
        c = model.config
        shape = (c.n_layer, rows, c.n_head, c.block_size, c.n_embd // c.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.row_ids = torch.arange(rows, device=device)
        self.active, self.span = 0, 0

    def row(self, r: int) -> _RowCache:
        return _RowCache(self.k[:, r:r + 1], self.v[:, r:r + 1])

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """k, v (A, nh, 1, hs) of the active rows at positions pos (A,)."""
        a = k.size(0)
        rows = self.row_ids[:a]
        self.k[layer][rows, :, pos] = k[:, :, 0]
        self.v[layer][rows, :, pos] = v[:, :, 0]
        return self.k[layer, :a, :, :self.span], self.v[layer, :a, :, :self.span]


def decode_rows(model: GPT, pool: CachePool, last: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One token for each active row: last (A, 1) at positions pos (A,) -> logits (A, V)."""
    a = last.size(0)
    mask = (torch.arange(pool.span, device=last.device) <= pos[:, None]).view(a, 1, 1, pool.span)
    x, rot = model.transformer.wte(last), None  # (A, 1, C)
    if model.config.rope:
        rot = (model.rope_cos[pos].view(a, 1, 1, -1), model.rope_sin[pos].view(a, 1, 1, -1))
    else:
        x = x + model.transformer.wpe(pos)[:, None, :]
    for i, block in enumerate(model.transformer.h):
        x = block(x, rot, pool, i, (pos, mask))
    return model.lm_head(model.transformer.ln_f(x))[:, -1, :]


class Engine:
    """Sequences waiting, and up to ``max_batch`` of them generating together (see the module
    docstring). :meth:`add` and :meth:`cancel` may be called from any thread; :meth:`step` from
    one thread only (the one that owns the model)."""

    def __init__(self, model: GPT, vocab, max_batch: int = 8, seed: int = 0, autocast=None):
        self.model, self.vocab, self.max_batch = model, vocab, max_batch
        p = next(model.parameters())
        self.device = p.device
        self.pool = CachePool(model, max_batch, p.device, autocast_dtype(p.device.type, p.dtype))
        self.rows: list[Sequence] = []  # the active sequences, row i = rows[i]
        self.waiting: deque[Sequence] = deque()
        self.lock = threading.Condition()
        self.eot = getattr(vocab.tokenizer, "eot_token", None)
        self._seeds = random.Random(seed)
        self._autocast = autocast
        self.steps = 0  # decode steps run
        self.row_steps = 0  # rows summed over those steps

    # ---- any thread

    def add(self, prompt: list[int], params: Params, on_text=None, on_done=None) -> Sequence:
        bs = self.model.config.block_size
        if not prompt or params.max_tokens < 1 or len(prompt) + params.max_tokens > bs:
            raise ValueError("a prompt of %d tokens and max_tokens=%d do not fit the context of %d"
                             % (len(prompt), params.max_tokens, bs))
        seq = Sequence(list(prompt), params, on_text, on_done)
        with self.lock:
            self.waiting.append(seq)
            self.lock.notify_all()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True

    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def wait_for_work(self, timeout: float | None = None) -> None:
        with self.lock:
            if not self.busy():
                self.lock.wait(timeout)

    # ---- the model's thread

    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting sequences into free rows (each prompt's forward), then one token for every
        active row in one forward."""
        ctx = self._autocast() if self._autocast else torch.autocast(self.device.type, enabled=False)
        with ctx:
            while len(self.rows) < self.max_batch:
                with self.lock:
                    seq = self.waiting.popleft() if self.waiting else None
                if seq is None:
                    break
                try:
                    self._prefill(seq)
                except Exception as e:  # this sequence alone fails; the others go on
                    traceback.print_exc()
                    if seq in self.rows:  # it was the last row
                        self.rows.remove(seq)
                    if seq.finish_reason is None:
                        seq.finish_reason, seq.error = "error", "%s: %s" % (type(e).__name__, e)
                        if seq.on_done:
                            seq.on_done(seq)
            self._drop_finished()
            if not self.rows:
                return
            a = len(self.rows)
            last = torch.tensor([[s.tokens[-1]] for s in self.rows], dtype=torch.long, device=self.device)
            positions = [len(s.prompt) + len(s.tokens) - 1 for s in self.rows]  # where each last token goes
            self.pool.span = max(positions) + 1
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)
            logits = decode_rows(self.model, self.pool, last, pos)
            self.steps += 1
            self.row_steps += a
            nxt = self._sample(logits)
            for seq, token in zip(self.rows, nxt):
                seq.max_batch_seen = max(seq.max_batch_seen, a)
                self._push(seq, token)
            self._drop_finished()

    def fail_all(self, message: str) -> None:
        """End every sequence with finish_reason 'error' (the model's thread hit an unexpected error)."""
        with self.lock:
            seqs = self.rows + list(self.waiting)
            self.rows, self.waiting = [], deque()
        for seq in seqs:
            if seq.finish_reason is None:
                seq.finish_reason, seq.error = "error", message
                if seq.on_done:
                    seq.on_done(seq)

    def _prefill(self, seq: Sequence) -> None:
        p = seq.params
        seq.stream = TextStream(self.vocab.tokenizer, p.stop, p.strip_space)
        seq.generator = torch.Generator(device=self.device)
        seq.generator.manual_seed((p.seed if p.seed is not None else self._seeds.getrandbits(63)) & (2 ** 64 - 1))
        if seq.cancelled:
            return self._finish(seq, None)
        r = len(self.rows)
        idx = torch.tensor([seq.prompt], dtype=torch.long, device=self.device)
        logits, _ = self.model(idx, cache=self.pool.row(r), last_only=True)
        self.rows.append(seq)
        seq.max_batch_seen = max(seq.max_batch_seen, 1)
        self._push(seq, self._sample_one(logits[:, -1, :], seq))

    def _sample(self, logits: torch.Tensor) -> list[int]:
        greedy = logits.float()
        if self.vocab.limit is not None and self.vocab.limit < greedy.size(-1):
            greedy = greedy[:, :self.vocab.limit]
        out = greedy.argmax(dim=-1).tolist()
        for i, seq in enumerate(self.rows):
            if seq.params.temperature != 0:
                out[i] = self._sample_one(logits[i:i + 1], seq)
        return out

    def _sample_one(self, logits: torch.Tensor, seq: Sequence) -> int:
        p = seq.params
        return int(sample_next(logits, p.temperature, p.top_k or None, p.top_p, self.vocab.limit, seq.generator))

    def _push(self, seq: Sequence, token: int) -> None:
        if self.eot is not None and token == self.eot and seq.params.stop_at_eot:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        text = seq.stream.push(token)
        if text and seq.on_text:
            seq.on_text(seq, text)
        if seq.stream.stopped:
            self._finish(seq, "stop")
        elif len(seq.tokens) >= seq.params.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str | None) -> None:
        if seq.finish_reason is not None:
            return
        rest = seq.stream.finish() if seq.stream else ""
        if rest and seq.on_text and not seq.cancelled:
            seq.on_text(seq, rest)
        seq.finish_reason = reason or "cancelled"
        if seq.on_done:
            seq.on_done(seq)

    def _drop_finished(self) -> None:
        """Free the rows of finished or cancelled sequences; the last active row fills each gap."""
        for r in range(len(self.rows) - 1, -1, -1):
            seq = self.rows[r]
            if seq.cancelled and seq.finish_reason is None:
                self._finish(seq, None)
            if seq.finish_reason is None:
                continue
            last = len(self.rows) - 1
            if r != last:
                moved = self.rows[last]
                self.pool.move(last, r, len(moved.prompt) + len(moved.tokens))
                self.rows[r] = moved
            self.rows.pop()
