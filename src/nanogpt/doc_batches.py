"""Batches that respect documents, and attention that stays inside them.

``batch_mode='documents'``: every row of a batch opens with ``<|endoftext|>`` followed by the
first token of a document, as GPT-2 saw its documents. A document is the run of tokens between
two end-of-text tokens of the split (the dataset's ``eot_token`` in meta.json); its *unit* is
that end-of-text token and its tokens, the token put in front of it. Rows are packed best-fit:
from ``doc_buffer`` units held in order of a seeded shuffle, each row takes the longest unit
that fits its space left, again and again; when none fits, the shortest held unit fills the gap
with its start and the rest of it is dropped. A unit longer than a row is cropped to one row.
Every row is full (no padding), so tokens per step are those of ``batch_mode='windows'``.

Each process reads its own documents (every ``world_size``-th, from its rank), shuffled anew
every pass over them. The packing position is a small int64 tensor that stands where the
windows loader keeps its generator state, so checkpoints, resumes and the background reader
treat both modes alike.

``doc_attention=True``: a token attends only to earlier tokens of its own document, and
positions count from each document's start, so every document is computed as if alone. It
runs through FlexAttention (a block mask from per-token document ids) on CUDA; on the CPU,
where FlexAttention has no backward pass, the same mask goes to
``scaled_dot_product_attention`` as a dense boolean mask. Sampling is unchanged: it is a
training choice, not part of the model.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import Section, setting
from .data import BatchLoader, Tokens
from .errors import CheckpointError, ConfigError, DataError

_FLEX = None  # (create_block_mask, flex_attention), imported on first use: importing it loads torch's compiler


def _flex():
    """FlexAttention's two functions, or (None, None) where torch has none (torch < 2.5)."""
    global _FLEX
    if _FLEX is None:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            if hasattr(torch, "compiler") and hasattr(torch.compiler, "disable"):
                create_block_mask = torch.compiler.disable(create_block_mask)  # built eagerly once per forward; attention compiles
            _FLEX = (create_block_mask, flex_attention)
        except ImportError:  # pragma: no cover - older torch
            _FLEX = (None, None)
    return _FLEX


@dataclass
class BatchConfig(Section):
    """How training rows are cut from the token stream, and what attention sees of them."""

    batch_mode: str = setting("windows", "'windows': rows are random windows of the token stream; 'documents': each row opens with <|endoftext|> and a document's start, packed best-fit from whole documents (one longer than a row is cropped). Needs the dataset's eot_token.",
                              choices=("windows", "documents"))
    doc_buffer: int = setting(1000, "batch_mode='documents': documents held for best-fit packing (more: fewer tokens cropped, slower to pack).", gt=0)
    doc_attention: bool = setting(False, "A token attends only to its own document, with positions counted from its start (FlexAttention on CUDA, a dense mask on the CPU). A training choice: sampling is unchanged.")


_INDEX_CACHE: dict = {}


def document_spans(tokens: Tokens, eot: int, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the non-empty documents of ``tokens``: the runs between end-of-text
    tokens, without them. Read in chunks of ``chunk`` tokens; kept for the process (evaluations
    make a loader each time)."""
    key = (tuple(tokens.parts), tokens.n, eot)
    if key in _INDEX_CACHE:
        return _INDEX_CACHE[key]
    found = [np.flatnonzero(tokens.read(at, min(chunk, tokens.n - at)) == eot) + at for at in range(0, tokens.n, chunk)]
    eots = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], eots + 1)).astype(np.int64)
    ends = np.concatenate((eots, [tokens.n])).astype(np.int64)
    keep = ends > starts
    spans = starts[keep], (ends - starts)[keep]
    if len(_INDEX_CACHE) >= 4:
        _INDEX_CACHE.pop(next(iter(_INDEX_CACHE)))
    _INDEX_CACHE[key] = spans
    return spans


# --------------------------------------------------------------------------------------------
# best-fit packing


class PackingStream:
    """Which documents fill each row: the packing position of one process, with the methods of a
    ``torch.Generator`` that the loader, the background reader and checkpoints use
    (``manual_seed``, ``get_state``, ``set_state``).

    ``units[i]`` is the length of document i's unit (its end-of-text token and its tokens),
    cropped to ``row`` tokens; ``full[i]`` the uncropped length (default: ``units``).
    Documents come from a shuffle of ``range(len(units))`` seeded by (seed, epoch); ``buffer``
    of them are held, sorted by (length, arrival), for best-fit. ``cropped`` counts the tokens of
    the documents taken that were left out of rows (informative; not part of the state)."""

    VERSION = 1

    def __init__(self, units: np.ndarray, row: int, buffer: int, seed: int, full: np.ndarray | None = None):
        self.units, self.row, self.buffer = units, row, buffer
        self.full = units if full is None else full
        self.cropped = 0
        self._perm_key, self._perm = None, None
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "PackingStream":
        self.seed, self.epoch, self.cursor, self.arrivals = int(seed), 0, 0, 0
        self.held: list[tuple[int, int, int]] = []  # (unit length, arrival, document)
        return self

    def _order(self) -> np.ndarray:
        key = (self.seed, self.epoch)
        if self._perm_key != key:
            rng = np.random.default_rng([self.seed % (1 << 64), self.epoch])
            self._perm, self._perm_key = rng.permutation(len(self.units)), key
        return self._perm

    def _top_up(self) -> None:
        while len(self.held) < self.buffer:
            if self.cursor == len(self.units):
                self.epoch, self.cursor = self.epoch + 1, 0
            doc = int(self._order()[self.cursor])
            self.cursor += 1
            bisect.insort(self.held, (int(self.units[doc]), self.arrivals, doc))
            self.arrivals += 1

    def pack(self) -> list[tuple[int, int]]:
        """One row: [(document, tokens of its unit taken), ...] adding up to ``row``."""
        out, left = [], self.row
        while left:
            self._top_up()
            i = bisect.bisect_right(self.held, (left, float("inf"))) - 1  # the longest that fits
            length, _, doc = self.held.pop(i if i >= 0 else 0)  # nothing fits: the shortest fills the gap
            take = min(length, left)
            out.append((doc, take))
            self.cropped += int(self.full[doc]) - take
            left -= take
        return out

    def get_state(self) -> torch.Tensor:
        head = [self.VERSION, len(self.units), self.row, self.seed, self.epoch, self.cursor, self.arrivals, len(self.held)]
        held = [v for _, arrival, doc in self.held for v in (arrival, doc)]
        return torch.tensor(head + held, dtype=torch.int64)

    def set_state(self, state: torch.Tensor) -> None:
        if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or state.numel() < 8 or int(state[0]) != self.VERSION:
            raise CheckpointError("the checkpoint's batch position is not one of batch_mode='documents'; resume with the "
                                  "batch_mode it was trained with")
        v = state.tolist()
        if v[1] != len(self.units) or v[2] != self.row:
            raise CheckpointError("the checkpoint's batch position is for %d documents in rows of %d tokens, not %d in rows of "
                                  "%d: the dataset or block_size changed; resume with the same ones" % (v[1], v[2], len(self.units), self.row))
        self.seed, self.epoch, self.cursor, self.arrivals = v[3], v[4], v[5], v[6]
        pairs = v[8:8 + 2 * v[7]]
        self.held = sorted((int(self.units[doc]), arrival, doc) for arrival, doc in zip(pairs[::2], pairs[1::2]))

    def fork(self) -> "PackingStream":
        """An independent copy at the same position (for the background reader)."""
        other = PackingStream(self.units, self.row, self.buffer, self.seed, self.full)
        other.set_state(self.get_state())
        return other


class DocumentLoader(BatchLoader):
    """``BatchLoader`` for ``batch_mode='documents'``: the same constructor (plus the end-of-text
    id, this process's rank and the world size, and the buffer size) and the same methods; its
    ``generator`` is a :class:`PackingStream`."""

    def __init__(self, data_dir: str, split: str, batch_size: int, block_size: int, device: str, seed: int,
                 dtype: str = "uint16", vocab_size: int | None = None, dataset: str = "", prefetch: int = 0,
                 meta: dict | None = None, verify: bool = True, *, eot: int, rank: int = 0, world_size: int = 1,
                 buffer: int = 1000):
        super().__init__(data_dir, split, batch_size, block_size, device, seed, dtype, vocab_size, dataset, prefetch, meta,
                         verify)  # self.tokens: the split, one file or its shards (data.Tokens)
        self.eot = eot
        starts, lengths = document_spans(self.tokens, eot)
        if len(starts) < world_size:
            raise DataError("%s holds %d document(s), fewer than the %d processes that each need their own; add documents, "
                            "run fewer processes or use --batch_mode=windows" % (self.path, len(starts), world_size))
        self.starts, self.lengths = starts[rank::world_size], lengths[rank::world_size]
        units = np.minimum(self.lengths + 1, block_size + 1)
        self.generator = PackingStream(units, block_size + 1, buffer, seed, full=self.lengths + 1)

    def _fork(self):
        return self.generator.fork()

    def _read(self, stream: PackingStream) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((self.batch_size, self.block_size + 1), dtype=np.int64)
        for row in rows:
            at = 0
            for doc, take in stream.pack():
                row[at] = self.eot
                row[at + 1:at + take] = self.tokens.read(int(self.starts[doc]), take - 1)
                at += take
        return self._batch(rows)


def eot_of(meta: dict | None, dataset: str, want: str) -> int:
    """The dataset's end-of-text id, which ``want`` (a setting, for the message) needs."""
    eot = (meta or {}).get("eot_token")
    if eot is None:
        raise DataError("%s needs the dataset's end-of-text token, and %r's meta.json names none (eot_token); prepare it "
                        "with `nanogpt prepare corpus` (which closes every document with <|endoftext|>) or use "
                        "--batch_mode=windows --doc_attention=False" % (want, dataset))
    return int(eot)


# --------------------------------------------------------------------------------------------
# attention inside documents


def attention_kind(device_type: str) -> str:
    """How doc_attention runs on ``device_type``: 'flex' on CUDA, 'dense' on the CPU (where
    FlexAttention has no backward pass); refused elsewhere."""
    if device_type == "cpu":
        return "dense"
    if device_type == "cuda":
        if _flex()[1] is None:
            raise ConfigError("doc_attention=True needs FlexAttention (torch.nn.attention.flex_attention), which torch %s "
                              "lacks; install torch >= 2.5 or pass --doc_attention=False" % torch.__version__)
        return "flex"
    raise ConfigError("doc_attention=True trains on cuda (FlexAttention) or cpu; torch cannot train it on %r: pass "
                      "--doc_attention=False or another --device" % device_type)


def document_positions(idx: torch.Tensor, eot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token document ids and positions within the document, (B, T) each: a document
    starts at every end-of-text token (and at the row's start)."""
    T = idx.size(1)
    opens = idx == eot
    docs = opens.long().cumsum(1)  # (B, T)
    t = torch.arange(T, device=idx.device).expand_as(idx)
    start = torch.where(opens, t, torch.zeros_like(t)).cummax(1).values  # where each token's document starts
    return docs, t - start


def _block_mask(docs: torch.Tensor):
    B, T = docs.shape

    def same_document(b, h, q, kv):
        return (q >= kv) & (docs[b, q] == docs[b, kv])
    return _flex()[0](same_document, B, None, T, T, device=docs.device)




def document_mask(idx: torch.Tensor, eot: int, kind: str):
    """(positions (B, T), the mask that :func:`document_attention` takes) for token ids ``idx``."""
    docs, pos = document_positions(idx, eot)
    if kind == "flex":
        return pos, _block_mask(docs)
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return pos, ((docs.unsqueeze(2) == docs.unsqueeze(1)) & causal).unsqueeze(1)  # (B, 1, T, T)


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Attention of q, k, v (B, nh, T, hs) under a mask from :func:`document_mask`."""
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return _flex()[1](q, k, v, block_mask=mask)
