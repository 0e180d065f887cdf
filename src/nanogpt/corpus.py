"""Any corpus, of any size, into token shards: sources read as streams, shards written so that a
killed preparation continues where it stopped.

    nanogpt prepare corpus --source=PATH_OR_HF_NAME --out_dir=data/mine [--shard_tokens=N] [--dedup=True]

Sources. A local file or folder (scanned recursively, hidden entries skipped, sorted): each
``.txt`` file is one document; each non-blank line of a ``.jsonl`` / ``.json`` file (plain,
``.gz``, or ``.zst`` with the zstandard package) is one, its text in ``text_field`` (a plain
``.json`` file may hold one JSON array instead, read whole); each row of a ``.parquet`` file
(pyarrow) is one.
Any other name is a Hugging Face dataset, read with ``streaming=True`` (the datasets package).
Nothing is copied or loaded whole first: files are read a block, a line or a row group at a time,
and long documents are cut into pieces where tokenization is unaffected.

Splits. Document ``i`` goes to val when a draw from a generator seeded with ``(seed, i // 65536)``
falls below ``val_fraction``; the second document always does (when ``val_fraction > 0``), so a
corpus of two or more documents has a val split. A corpus that is one ``.txt`` file is split by
text instead: its last 10% (or ``val_fraction`` if larger) goes to val. With ``dedup`` a document
whose text equals an earlier one's is left out.

Output. ``train_000000.bin``, ``train_000001.bin``, ... and ``val_000000.bin``, ...: the token
ids as raw unsigned integers, ``shard_tokens`` per shard (the last one of a split holds the
rest), and ``meta.json`` listing them with their token counts and sha256s. Each document ends
with the tokenizer's end-of-text token; a shard may end inside a document. The shards do not
depend on ``num_proc``.

Resuming. A shard is written as ``<name>.tmp`` and renamed into place once whole. After each
rename, ``progress.json`` (written to a temporary file, synced and renamed) records the shards so
far, how many tokens the unfinished ``.tmp`` of each split holds, and where in the input that is.
Run the same command again after a crash or a kill and it picks up there; the finished folder is
byte for byte the one an uninterrupted run writes. ``meta.json`` appears last, so a folder
without it is never mistaken for a dataset.
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import json
import os
import re
import time
import zlib

import numpy as np

from .config import looks_binary
from .errors import PrepareError, UserError

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
PIECE_CHARS = 1 << 16  # long documents are tokenized in pieces of about this many characters
BATCH_CHARS = 1 << 18  # a worker gets about this much text per task
BATCH_ITEMS = 4096  # and at most this many pieces
IN_FLIGHT = 2  # tasks per worker handed out ahead: what is held in memory stays bounded
SHARD_TOKENS = 100_000_000
PROGRESS = "progress.json"
FORMAT = 1
DRAW_BLOCK = 1 << 16  # documents per seeded block of val draws
TRAIN, VAL, DUPLICATE = 0, 1, 2
SPLITS = ("train", "val")
OWN_FILE = re.compile(r"^(train|val)(_\d{6})?\.bin(\.tmp)?$")

_fault = None  # tests: a function called with the name of each step of writing, after it is done


def _step(name: str) -> None:
    if _fault is not None:
        _fault(name)


def _log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# cutting documents into pieces


def _safe_cut(text: str, lo: int, hi: int) -> int:
    """The largest index ``i`` in (lo + 1, hi] just after a lone newline (``text[i-1]`` is a
    newline with non-space characters on both sides), or 0. GPT-2's pre-tokenizer always ends a
    piece there and starts a new one, so encoding the two sides separately gives the same tokens
    as encoding the whole. (Python's ``isspace`` covers every character the tokenizer counts as
    whitespace, so the test errs on the safe side.)"""
    end = min(hi, len(text) - 1)
    while True:
        i = text.rfind("\n", lo + 1, end)
        if i < 1:
            return 0
        if not text[i + 1].isspace() and not text[i - 1].isspace():
            return i + 1
        end = i


def _next_safe_cut(text: str, lo: int) -> int:
    """The smallest index ``i >= lo`` just after a lone newline (see :func:`_safe_cut`), or 0."""
    i = text.find("\n", max(lo - 1, 1))
    while 0 < i < len(text) - 1:
        if not text[i + 1].isspace() and not text[i - 1].isspace():
            return i + 1
        i = text.find("\n", i + 1)
    return 0


def _text_pieces(text: str, size: int):
    """``text`` in pieces of about ``size`` characters (more when no safe place is near), cut
    only where tokenization is unaffected."""
    start = 0
    while len(text) - start > size:
        cut = _safe_cut(text, start, start + size)
        probe = start + size
        while not cut and probe < len(text):  # no safe place in this window: look further on
            cut = _safe_cut(text, probe - 1, probe + size)
            probe += size
        if not cut:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _file_pieces(path: str, size: int):
    """A .txt file's text in pieces of about ``size`` characters, read a block at a time (a
    large file never sits in memory whole), cut only where tokenization is unaffected."""
    held, before = [], ""  # text read but not yielded yet; the character before this block
    try:
        with open(path, encoding="utf-8") as f:
            for block in iter(lambda: f.read(size), ""):
                view = before + block
                cut = _safe_cut(view, 0, len(view)) - len(before)
                if cut > 0:
                    held.append(block[:cut])
                    yield "".join(held)
                    held = [block[cut:]]
                else:
                    held.append(block)
                before = block[-1:]
    except UnicodeDecodeError as e:
        raise PrepareError("%s is not UTF-8 text (%s); convert it to UTF-8" % (path, e.reason)) from None
    yield "".join(held)


def _split_pieces(pieces, at: int):
    """(piece, is it after character ``at``?) for pieces of one text, one piece cut in two at a
    safe place near ``at`` (or, with none there, the whole piece on the first side)."""
    seen = 0
    for piece in pieces:
        if seen >= at:
            yield piece, True
        elif seen + len(piece) <= at:
            yield piece, False
        else:
            cut = _next_safe_cut(piece, at - seen)
            if cut:
                yield piece[:cut], False
                yield piece[cut:], True
            else:
                yield piece, False
        seen += len(piece)


class TextFile:
    """A document that is a whole .txt file, read in pieces when it is tokenized."""

    def __init__(self, path: str):
        self.path = path

    def pieces(self, size: int):
        return _file_pieces(self.path, size)


def document_pieces(doc, size: int):
    return doc.pieces(size) if isinstance(doc, TextFile) else _text_pieces(doc, size)


def document_digest(doc) -> bytes:
    """A 16-byte digest of a document's text, for finding exact duplicates."""
    h = hashlib.blake2b(digest_size=16)
    for piece in document_pieces(doc, PIECE_CHARS) if isinstance(doc, TextFile) else (doc,):
        h.update(piece.encode("utf-8", "surrogatepass"))
    return h.digest()


# --------------------------------------------------------------------------------------------
# sources


class LocalSource:
    """The documents of a local file or folder (see the module text), with the bytes read so far
    for a progress bar and an ETA."""

    def __init__(self, source: str, text_field: str):
        self.source, self.text_field = source, text_field
        if os.path.isfile(source):
            if not source.endswith(ALL_SUFFIXES):
                raise PrepareError("%s: unsupported file type; use .txt (one document per file), .jsonl/.json (one JSON "
                                   "object per line; also .gz or .zst) or .parquet" % source)
            self.files = [source]
        else:
            files = []
            for d, dirs, names in os.walk(source):
                dirs[:] = [x for x in dirs if not x.startswith(".")]
                files += [os.path.join(d, x) for x in names if not x.startswith(".") and x.endswith(ALL_SUFFIXES)]
            if not files:
                raise PrepareError("no .txt, .jsonl, .json, .jsonl.gz, .jsonl.zst or .parquet files under %s" % source)
            self.files = sorted(files)
        for p in self.files:
            if p.endswith(TEXT_SUFFIXES + (".jsonl", ".json")) and looks_binary(p):
                raise PrepareError("%s is not UTF-8 text (it looks binary); convert it, or leave it out of --source" % p)
        self.sizes = [os.path.getsize(p) for p in self.files]
        self.total_bytes = sum(self.sizes)
        self.total_docs = None
        self.single_text = len(self.files) == 1 and self.files[0].endswith(TEXT_SUFFIXES)
        self._done, self._raw = 0, None  # bytes of the files finished; the open file

    def fingerprint(self) -> list:
        return [[os.path.relpath(p, self.source) if p != self.source else os.path.basename(p), s, os.stat(p).st_mtime_ns]
                for p, s in zip(self.files, self.sizes)]

    def bytes_read(self) -> int:
        raw = self._raw
        try:
            return self._done + (raw.tell() if raw is not None and not raw.closed else 0)
        except (OSError, ValueError):
            return self._done

    def documents(self):
        self._done = 0
        for path, size in zip(self.files, self.sizes):
            if path.endswith(TEXT_SUFFIXES):
                yield TextFile(path)
            elif path.endswith(PARQUET_SUFFIXES):
                yield from self._parquet(path, size)
            else:
                yield from self._json(path)
            self._done += size
            self._raw = None

    def _field(self, row, where: str) -> str:
        if not isinstance(row, dict) or self.text_field not in row:
            raise PrepareError("%s has no %r field; pass --text_field" % (where, self.text_field))
        text = row[self.text_field]
        if not isinstance(text, str):
            raise PrepareError("%s: field %r is %s, not a string" % (where, self.text_field, type(text).__name__))
        return text

    def _json(self, path: str):
        raw = self._raw = open(path, "rb")
        with raw:
            if path.endswith(".gz"):
                stream, kind = gzip.GzipFile(fileobj=raw), "gzip"
            elif path.endswith(".zst"):
                try:
                    import zstandard
                except ImportError:
                    raise PrepareError("reading %s needs the zstandard package: pip install zstandard" % path) from None
                stream, kind = io.BufferedReader(_ZstdReader(raw, path, zstandard.ZstdDecompressor())), "zstd"
            else:
                stream, kind = raw, None
            text = io.TextIOWrapper(stream, encoding="utf-8-sig")
            try:
                if kind is None and _starts_array(raw):
                    yield from self._array(path, text)
                    return
                for i, line in enumerate(text):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise PrepareError("%s line %d is not valid JSON (%s)" % (path, i + 1, e.msg)) from None
                    yield self._field(row, "%s line %d" % (path, i + 1))
            except UnicodeDecodeError as e:
                raise PrepareError("%s is not UTF-8 text (%s); convert it to UTF-8" % (path, e.reason)) from None
            except (OSError, EOFError, zlib.error) as e:
                if kind is None or isinstance(e, PermissionError):
                    raise
                raise PrepareError("%s is not a whole %s file (%s); fetch it again" % (path, kind, e)) from None
            except Exception as e:
                if kind == "zstd" and type(e).__name__ == "ZstdError":
                    raise PrepareError("%s is not a whole zstd file (%s); fetch it again" % (path, e)) from None
                raise

    def _array(self, path: str, text):
        try:
            rows = json.load(text)
        except json.JSONDecodeError as e:
            raise PrepareError("%s is not a valid JSON array (%s)" % (path, e)) from None
        if not isinstance(rows, list):
            raise PrepareError("%s holds a JSON %s, not a list of objects" % (path, type(rows).__name__))
        for i, row in enumerate(rows):
            yield self._field(row, "%s item %d" % (path, i))

    def _parquet(self, path: str, size: int):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PrepareError("reading %s needs the pyarrow package: pip install pyarrow" % path) from None
        try:
            f = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
            raise PrepareError("%s is not a parquet file (%s)" % (path, str(e).splitlines()[0][:160])) from None
        names = f.schema_arrow.names
        if self.text_field not in names:
            raise PrepareError("%s has no %r column (columns: %s); pass --text_field" % (path, self.text_field, ", ".join(names)))
        rows, done = max(1, f.metadata.num_rows), 0
        for batch in f.iter_batches(batch_size=1024, columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                if text is not None and not isinstance(text, str):
                    raise PrepareError("%s: column %r holds %s, not strings" % (path, self.text_field, type(text).__name__))
                yield text or ""
            done += batch.num_rows
            self._raw = _Position(size * done // rows)
        self._raw = None


class _ZstdReader(io.RawIOBase):
    """The decompressed bytes of a .zst file of one or more frames; a file that ends inside a
    frame is an error, not a short read."""

    def __init__(self, raw, path: str, decompressor):
        self.raw, self.path, self.d = raw, path, decompressor
        self.obj, self.buf, self.in_frame = decompressor.decompressobj(), bytearray(), False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            data = self.raw.read(1 << 16)
            if not data:
                if self.in_frame:
                    raise PrepareError("%s is not a whole zstd file (it ends inside a frame); fetch it again" % self.path)
                return 0
            while data:
                self.in_frame = True
                self.buf += self.obj.decompress(data)
                data = b""
                if self.obj.eof:  # a frame ended: what follows starts the next one
                    data, self.obj, self.in_frame = self.obj.unused_data, self.d.decompressobj(), False
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        del self.buf[:n]
        return n


class _Position:
    """Stands in for an open file whose position is known: ``tell()`` only."""

    closed = False

    def __init__(self, pos: int):
        self.pos = pos

    def tell(self) -> int:
        return self.pos


def _starts_array(raw) -> bool:
    head = raw.peek(4096)[:4096] if hasattr(raw, "peek") else b""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


class HubSource:
    """The documents of a Hugging Face dataset, streamed (``streaming=True``): nothing is
    downloaded whole first."""

    single_text = False
    total_bytes = None

    def __init__(self, name: str, text_field: str, split: str, config: str = ""):
        try:
            import datasets
        except ImportError:
            raise PrepareError("%r is not a local file or folder, and reading it from the Hugging Face hub needs the "
                               "datasets package: pip install datasets" % name) from None
        self.name, self.text_field, self.split, self.config = name, text_field, split, config
        try:
            args = (name, config) if config else (name,)
            self.ds = datasets.load_dataset(*args, split=split, streaming=True)
        except Exception as e:  # the hub, the network and the files can all fail in many ways
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise PrepareError("%r is not a local file or folder, and streaming it as a Hugging Face dataset (split %r) "
                               "failed: %s" % (name, split, first)) from None
        names = getattr(self.ds, "column_names", None)
        if names and text_field not in names:
            raise PrepareError("Hugging Face dataset %r has no %r column (columns: %s); pass --text_field"
                               % (name, text_field, ", ".join(names)))
        try:
            self.total_docs = self.ds.info.splits[split].num_examples or None
        except (AttributeError, KeyError, TypeError):
            self.total_docs = None

    def fingerprint(self) -> list:
        return [self.name, self.config, self.split]

    def bytes_read(self) -> int:
        return 0

    def documents(self):
        for row in self.ds:
            if self.text_field not in row:
                raise PrepareError("Hugging Face dataset %r has no %r column; pass --text_field" % (self.name, self.text_field))
            text = row[self.text_field]
            yield text if isinstance(text, str) else ""


def open_source(source: str, text_field: str = "text", hf_split: str = "train", hf_config: str = ""):
    """A local file or folder when that path exists, else a Hugging Face dataset name."""
    if os.path.exists(source):
        if hf_config:
            raise PrepareError("--hf_config is for Hugging Face datasets; %s is a local path" % source)
        return LocalSource(source, text_field)
    return HubSource(source, text_field, hf_split, hf_config)


def source_texts(src):
    """Every piece of text of a source, in order (for a tokenizer that learns from the corpus)."""
    for doc in src.documents():
        yield from document_pieces(doc, PIECE_CHARS)


# --------------------------------------------------------------------------------------------
# which split a document goes to


class ValDraws:
    """Document ``i`` is held out when ``default_rng((seed, i // 65536)).random(65536)[i % 65536]``
    is below ``fraction``, and document 1 always is (when ``fraction > 0``): the same documents on
    every run, without knowing how many there are."""

    def __init__(self, seed: int, fraction: float):
        self.seed, self.fraction = seed, fraction
        self.block, self.draws = -1, None

    def __call__(self, i: int) -> bool:
        if self.fraction <= 0:
            return False
        if i == 1:
            return True
        if i // DRAW_BLOCK != self.block:
            self.block = i // DRAW_BLOCK
            self.draws = np.random.default_rng((self.seed, self.block)).random(DRAW_BLOCK)
        return bool(self.draws[i % DRAW_BLOCK] < self.fraction)


def _tasks(src, settings: dict, start: tuple[int, int], seen: set | None):
    """(kind, text, last piece of its document?, position after it) for each piece from
    ``start`` on: kind is TRAIN, VAL or DUPLICATE (a left-out document, text ''). The pieces
    before ``start`` are skipped untokenized (and hashed, for ``dedup``)."""
    draws = ValDraws(settings["seed"], settings["val_fraction"])
    size = settings["piece_chars"]
    tail = settings["val_tail"]
    first_doc, first_piece = start
    for i, doc in enumerate(src.documents()):
        if i < first_doc:
            if seen is not None:
                seen.add(document_digest(doc))
            continue
        if seen is not None:
            digest = document_digest(doc)
            if digest in seen:
                yield DUPLICATE, "", True, (i + 1, 0)
                continue
            seen.add(digest)
        pieces = document_pieces(doc, size)
        if tail is not None:  # one text, split by characters
            kinds = ((piece, VAL if after else TRAIN) for piece, after in _split_pieces(pieces, tail))
        else:
            kind = VAL if draws(i) else TRAIN
            kinds = ((piece, kind) for piece in pieces)
        held = None
        for j, item in enumerate(kinds):
            if held is not None and j - 1 >= (first_piece if i == first_doc else 0):
                yield held[1], held[0], False, (i, j)
            held = item
        if held is not None:
            yield held[1], held[0], True, (i + 1, 0)


# --------------------------------------------------------------------------------------------
# tokenization (in worker processes when num_proc > 1)

_WORKER: dict = {}


def _init_worker(tok_meta: dict, dtype: str, eot: int | None) -> None:
    from .tokenizer import load_tokenizer
    _WORKER.update(tok=load_tokenizer(tok_meta), dtype=np.dtype(dtype), eot=eot)


def _batches(tasks, max_chars: int, max_items: int):
    """Groups of consecutive tasks holding about ``max_chars`` characters of text."""
    batch, chars = [], 0
    for task in tasks:
        batch.append(task)
        chars += len(task[1])
        if chars >= max_chars or len(batch) >= max_items:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_batch(batch):
    """A worker's unit of work: [(kind, text, last, pos)] -> ([(kind, last, pos)], lengths, ids)."""
    encode, eot, dtype = _WORKER["tok"].encode_ordinary, _WORKER["eot"], _WORKER["dtype"]
    ids, lengths = [], []
    for kind, text, last, _ in batch:
        piece = encode(text) if text else []
        if last and eot is not None and kind != DUPLICATE:
            piece.append(eot)
        ids.append(np.array(piece, dtype=dtype))  # a list of Python ints is ~20x the size: one piece's at a time
        lengths.append(len(piece))
    flat = np.concatenate(ids) if ids else np.zeros(0, dtype)
    return [(kind, last, pos) for kind, _, last, pos in batch], lengths, flat


def _in_order(pool, batches, depth: int):
    """``_encode_batch`` of each batch by the pool's workers, in order, at most ``depth`` ahead."""
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode_batch, (batch,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# --------------------------------------------------------------------------------------------
# shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(split: str, index: int) -> str:
    return "%s_%06d.bin" % (split, index)


class _CannotResume(Exception):
    """The files of an unfinished preparation do not match its progress.json."""


class ShardWriter:
    """The shards of one split: tokens go to ``<next shard>.tmp``, which is renamed into place
    when it holds ``shard_tokens``."""

    def __init__(self, out_dir: str, split: str, shard_tokens: int, dtype: np.dtype, state: dict | None = None):
        self.out_dir, self.split, self.shard_tokens, self.dtype = out_dir, split, shard_tokens, dtype
        state = state or {"shards": [], "partial_tokens": 0, "max_token_id": -1}
        self.shards = list(state["shards"])
        self.top = state["max_token_id"]
        self.held = state["partial_tokens"]
        self.committed = False  # a shard was renamed into place since the last checkpoint
        self.hash = hashlib.sha256()
        tmp = self.tmp_path()
        if self.held:  # resuming: the .tmp holds at least the tokens the checkpoint counted
            want = self.held * dtype.itemsize
            if not os.path.isfile(tmp) or os.path.getsize(tmp) < want:
                raise _CannotResume("%s is missing or shorter than %s says" % (tmp, PROGRESS))
            os.truncate(tmp, want)
            with open(tmp, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    self.hash.update(block)
            self.f = open(tmp, "ab")
        else:
            self.f = open(tmp, "wb")

    def tmp_path(self) -> str:
        return os.path.join(self.out_dir, shard_name(self.split, len(self.shards)) + ".tmp")

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.held

    def add(self, ids: np.ndarray) -> None:
        while len(ids):
            part = ids[:self.shard_tokens - self.held]
            data = part.tobytes()
            self.f.write(data)
            self.hash.update(data)
            self.held += len(part)
            self.top = max(self.top, int(part.max()))
            ids = ids[len(part):]
            if self.held == self.shard_tokens:
                self.commit()

    def commit(self) -> None:
        """Rename the .tmp into place as the next shard, and start the one after it."""
        tmp = self.tmp_path()
        name = shard_name(self.split, len(self.shards))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        _step("shard written")
        os.replace(tmp, os.path.join(self.out_dir, name))
        _step("shard renamed")
        self.shards.append({"file": name, "tokens": self.held, "sha256": self.hash.hexdigest()})
        self.held, self.hash, self.committed = 0, hashlib.sha256(), True
        self.f = open(self.tmp_path(), "wb")

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def finish(self) -> None:
        if self.held:
            self.commit()
        self.close()
        tmp = self.tmp_path()
        if os.path.exists(tmp):
            os.remove(tmp)

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()

    def state(self) -> dict:
        return {"shards": self.shards, "partial_tokens": self.held, "max_token_id": self.top}


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _clear_outputs(out_dir: str) -> None:
    """Remove what an earlier preparation wrote here: meta.json first (so the folder stops
    looking like a dataset), then its token files and progress."""
    for name in ("meta.json", PROGRESS, PROGRESS + ".tmp", "meta.json.tmp"):
        p = os.path.join(out_dir, name)
        if os.path.isfile(p):
            os.remove(p)
    for name in os.listdir(out_dir):
        if OWN_FILE.match(name):
            os.remove(os.path.join(out_dir, name))


def _remove_strays(out_dir: str, writers: dict) -> None:
    """Files an interrupted run wrote after its last checkpoint: shards renamed into place but not
    recorded, and .tmp files other than the ones being resumed."""
    keep = {w.tmp_path() for w in writers.values()}
    keep |= {os.path.join(out_dir, s["file"]) for w in writers.values() for s in w.shards}
    for name in os.listdir(out_dir):
        p = os.path.join(out_dir, name)
        if OWN_FILE.match(name) and p not in keep:
            os.remove(p)


# --------------------------------------------------------------------------------------------
# preparation


class _Progress:
    """Progress a person can see: on a terminal a tqdm bar of the source's bytes read (with an
    ETA) for local files, else of documents (with an ETA when the dataset says how many), with
    documents/s and tokens/s beside it; elsewhere (a log file) one line every ``interval`` s."""

    def __init__(self, src, docs_done: int, tokens_done: int, interval: float = 30.0):
        import sys
        self.src = src
        self.by_bytes = bool(src.total_bytes)
        self.total = src.total_bytes if self.by_bytes else src.total_docs
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, desc="tokenizing", unit="B" if self.by_bytes else "doc", unit_scale=self.by_bytes,
                            dynamic_ncols=True, initial=0 if self.by_bytes else docs_done, smoothing=0.1)
        self.t0, self.docs0, self.tokens0 = time.perf_counter(), docs_done, tokens_done
        self.docs, self.tokens, self.last, self.interval = docs_done, tokens_done, self.t0, interval

    def _done(self) -> int:
        return min(self.src.bytes_read(), self.total) if self.by_bytes else self.docs

    def update(self, docs: int, tokens: int) -> None:
        self.docs, self.tokens = docs, tokens
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(max(0, self._done() - self.bar.n))
            if now - self.last > 0.5:
                self.last = now
                _, dps, tps = self.rates()
                self.bar.set_postfix_str("%s doc/s, %s tok/s" % (_si(dps), _si(tps)), refresh=False)
        elif now - self.last >= self.interval:
            self.last = now
            dt, dps, tps = self.rates()
            line = "tokenizing: %s documents, %s tokens, %s doc/s, %s tok/s" % (
                f"{docs:,}", f"{tokens:,}", _si(dps), _si(tps))
            if self.total:
                share = self._done() / self.total
                eta = dt * (1 - share) / share if share > 0 else float("nan")
                line += ", %.1f%% of the %s, ETA %s" % (100 * share, "bytes" if self.by_bytes else "documents", _hms(eta))
            _log(line)

    def rates(self) -> tuple[float, float, float]:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return dt, (self.docs - self.docs0) / dt, (self.tokens - self.tokens0) / dt

    def close(self, finished: bool = False) -> None:
        if self.bar is not None:
            if finished and self.by_bytes and self.bar.total:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None


def _hms(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    s = int(seconds)
    return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return "%.2f%s" % (x / scale, unit)
    return "%.1f" % x if x < 10 else "%.0f" % x


def prepare_corpus(out_dir: str, source: str, *, tokenizer: str = "gpt2", text_field: str = "text",
                   val_fraction: float = 0.0005, num_proc: int | None = None, hf_split: str = "train", hf_config: str = "",
                   seed: int = 2357, shard_tokens: int = SHARD_TOKENS, dedup: bool = False, append_eot: bool = True,
                   mirror: str | None = None) -> dict:
    """Tokenize any corpus into shards in ``out_dir`` and write their manifest, ``meta.json``
    (see the module text); a preparation this folder holds unfinished is continued. ``num_proc``
    processes (default: min(8, CPUs)) tokenize, in order. Returns the meta dict."""
    from .tokenizer import corpus_tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError("val_fraction must be in [0, 1); got %r" % val_fraction)
    if shard_tokens < 1:
        raise PrepareError("shard_tokens must be at least 1; got %d" % shard_tokens)
    if seed < 0:
        raise PrepareError("seed must be a non-negative integer; got %d" % seed)
    num_proc = int(num_proc or min(8, os.cpu_count() or 1))
    if num_proc < 1:
        raise PrepareError("num_proc must be at least 1; got %d" % num_proc)
    src = open_source(source, text_field, hf_split, hf_config)  # a bad source fails before any download
    tok = corpus_tokenizer(tokenizer, texts=lambda: source_texts(src), mirror=mirror)
    tok_meta = dict(tok.meta())
    vocab = int(tok.vocab_size)
    dtype = token_dtype(vocab)
    eot = tok.eot_token if append_eot else None
    val_tail = None
    if src.single_text:  # one document: the last part of its text is the val split
        with open(src.files[0], encoding="utf-8", errors="replace") as f:
            chars = sum(len(b) for b in iter(lambda: f.read(1 << 22), ""))
        val_tail = chars - int(chars * max(val_fraction, 0.1)) if chars >= 2 else None
    settings = {"format": FORMAT, "source": source, "files": src.fingerprint(), "text_field": text_field, "split": hf_split,
                "tokenizer": tok_meta, "dtype": dtype.name, "eot_token": eot, "val_fraction": val_fraction, "seed": seed,
                "dedup": dedup, "shard_tokens": shard_tokens, "piece_chars": PIECE_CHARS, "val_tail": val_tail}

    os.makedirs(out_dir, exist_ok=True)
    progress_path = os.path.join(out_dir, PROGRESS)
    state = _resume_state(progress_path, settings)
    fresh = {"position": [0, 0], "done": False, "documents": {"train": 0, "val": 0, "duplicates": 0},
             "text_tokens": 0, "splits": {}}
    if state is None:
        _clear_outputs(out_dir)
        state = fresh
    else:
        done = sum(len(s["shards"]) for s in state["splits"].values())
        _log("%s: continuing an unfinished preparation: %d shard(s) written, from document %s"
             % (out_dir, done, f"{state['position'][0]:,}"))

    try:
        writers = {split: ShardWriter(out_dir, split, shard_tokens, dtype, state["splits"].get(split)) for split in SPLITS}
    except _CannotResume as e:
        _log("note: cannot continue the unfinished preparation (%s); starting over" % e)
        _clear_outputs(out_dir)
        state = fresh
        writers = {split: ShardWriter(out_dir, split, shard_tokens, dtype) for split in SPLITS}
    try:
        _remove_strays(out_dir, writers)
        if not state["done"]:
            state = _tokenize(src, settings, state, writers, tok, tok_meta, dtype, eot, num_proc, progress_path)
        for w in writers.values():
            w.finish()
        state["splits"] = {split: w.state() for split, w in writers.items()}
        state["done"] = True
        _write_json(progress_path, dict(state, settings=settings))
        _step("progress written")
    except UserError:
        for w in writers.values():
            w.close()
        _clear_outputs(out_dir)  # bad input: nothing here is worth resuming
        raise
    finally:
        for w in writers.values():
            w.close()

    counts = {split: w.tokens for split, w in writers.items()}
    if state["text_tokens"] == 0:
        _clear_outputs(out_dir)
        docs = state["documents"]["train"] + state["documents"]["val"]
        raise PrepareError("%s holds no text (%s); give a source with some" % (
            source, "no documents" if docs == 0 else "%d document%s, all empty" % (docs, "" if docs == 1 else "s")))
    docs = state["documents"]
    meta = dict(tok_meta)
    meta.update({"vocab_size": vocab, "dtype": dtype.name, "tokenizer": tok_meta.get("tokenizer", tokenizer),
                 "train_tokens": counts["train"], "val_tokens": counts["val"],
                 "max_token_id": int(max(w.top for w in writers.values())), "eot_token": eot,
                 "documents": {"train": docs["train"], "val": docs["val"]} if val_tail is None else {"train": 1, "val": 1},
                 "duplicates": docs["duplicates"] if dedup else None,
                 "val_split_by": "text" if val_tail is not None else "documents", "source": source, "seed": seed,
                 "val_fraction": val_fraction, "shard_tokens": shard_tokens,
                 "shards": {split: w.shards for split, w in writers.items()}})
    _write_json(os.path.join(out_dir, "meta.json"), meta)
    _step("meta written")
    os.remove(progress_path)
    n = docs["train"] + docs["val"]
    shards = sum(len(w.shards) for w in writers.values())
    _log("%s: %s document%s (%s in val%s), %s in %d shard%s; train %s tokens, val %s tokens" % (
        out_dir, f"{n:,}", "" if n == 1 else "s", f"{docs['val']:,}" if val_tail is None else "the last part of the text",
        ", %s duplicates left out" % f"{docs['duplicates']:,}" if dedup else "", dtype.name, shards,
        "" if shards == 1 else "s", f"{counts['train']:,}", f"{counts['val']:,}"))
    if counts["val"] == 0 or counts["train"] == 0:
        _log("warning: the %s split is empty; %s" % ("val" if counts["val"] == 0 else "train",
                                                  "raise --val_fraction" if counts["val"] == 0 else "lower --val_fraction"))
    return meta


def _resume_state(progress_path: str, settings: dict) -> dict | None:
    """The recorded state of an unfinished preparation with these settings; None when there is
    none. One with other settings is an error naming the first difference."""
    if not os.path.isfile(progress_path):
        return None
    try:
        with open(progress_path, encoding="utf-8") as f:
            state = json.load(f)
        old = state["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        _log("note: %s cannot be read; starting over" % progress_path)
        return None
    for key in settings:
        if old.get(key) != settings[key]:
            what = "the source files changed" if key == "files" else "--%s was %r, now %r" % (key, old.get(key), settings[key])
            raise PrepareError("%s holds an unfinished preparation with other settings (%s): run it with the same settings "
                               "to finish it, or delete %s to start over" % (os.path.dirname(progress_path) or ".", what,
                                                                              progress_path))
    return state


def _tokenize(src, settings, state, writers, tok, tok_meta, dtype, eot, num_proc, progress_path) -> dict:
    """Tokenize from the recorded position to the end of the source; a checkpoint after each
    piece in which a shard was renamed into place."""
    docs = dict(state["documents"])
    text_tokens = state["text_tokens"]
    position = tuple(state["position"])
    seen = set() if settings["dedup"] else None
    tasks = _tasks(src, settings, position, seen)
    batches = _batches(tasks, BATCH_CHARS, BATCH_ITEMS)
    names = {TRAIN: "train", VAL: "val", DUPLICATE: "duplicates"}
    bar = _Progress(src, docs["train"] + docs["val"], sum(w.tokens for w in writers.values()))

    def checkpoint(pos) -> None:
        for w in writers.values():
            w.sync()
        _step("partial synced")
        snapshot = {"position": list(pos), "done": False, "documents": docs, "text_tokens": text_tokens,
                    "splits": {split: w.state() for split, w in writers.items()}, "settings": settings}
        _write_json(progress_path, snapshot)
        _step("progress written")
        for w in writers.values():
            w.committed = False

    def consume(results) -> None:
        nonlocal text_tokens
        for flags, lengths, ids in results:
            offset = 0
            for (kind, last, pos), k in zip(flags, lengths):
                if kind != DUPLICATE:
                    writers[SPLITS[kind]].add(ids[offset:offset + k])
                    text_tokens += k - (1 if last and eot is not None else 0)
                offset += k
                if last:
                    docs[names[kind]] += 1
                if any(w.committed for w in writers.values()):
                    checkpoint(pos)
            bar.update(docs["train"] + docs["val"], sum(w.tokens for w in writers.values()))

    try:
        initargs = (tok_meta, dtype.name, eot)
        if num_proc == 1:
            _WORKER.update(tok=tok, dtype=dtype, eot=eot)
            consume(map(_encode_batch, batches))
        else:
            import multiprocessing

            # spawn: fresh workers that share no threads or locks with this process
            with multiprocessing.get_context("spawn").Pool(num_proc, _init_worker, initargs) as pool:
                consume(_in_order(pool, batches, IN_FLIGHT * num_proc))
        bar.close(finished=True)
    except KeyboardInterrupt:
        bar.close()
        _log("interrupted: run the same command again to continue from the last finished shard")
        raise
    finally:
        bar.close()
    dt, dps, tps = bar.rates()
    done = bar.docs - bar.docs0
    _log("tokenized %s document%s, %s tokens in %.1f s: %s documents/s, %s tokens/s" % (
        f"{done:,}", "" if done == 1 else "s", f"{bar.tokens - bar.tokens0:,}", dt, _si(dps), _si(tps)))
    return dict(state, documents=docs, text_tokens=text_tokens, position=list(position))
