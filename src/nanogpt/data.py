"""Datasets on disk and batches from them.

A dataset is a folder ``<data_root>/<dataset>/`` holding ``train.bin`` and ``val.bin`` (token ids
as raw unsigned integers, uint16 when every id fits, else uint32) and ``meta.json``
(``vocab_size``, ``dtype``, ``tokenizer``, token counts, the largest id, and for character data
the ``stoi`` / ``itos`` tables). A large corpus comes in shards instead (``train_000000.bin``,
...), which ``meta.json`` lists under ``shards`` with their token counts and sha256s; a split is
read as the shards one after another (:class:`Tokens`), so its batches are those of the same
tokens in one file. Old nanoGPT folders with ``meta.pkl`` still load, read without unpickling
anything but plain values. Everything read is checked when it is opened.

Batches are random windows of ``block_size + 1`` tokens, drawn by a seeded generator whose state
goes into checkpoints, so a resumed run reads the batches an uninterrupted one would.

Chat data (``nanogpt prepare chat``; meta.json has a ``chat`` entry) has two more files per split:
``{split}.mask.bin``, one uint8 per token (1 = learned: an assistant reply), and
``{split}.starts.bin``, the uint64 offset of each conversation's first token. A window then starts
at a conversation start drawn at random and runs on into the following conversations (packed);
a window that runs past the end of the file is padded. Targets whose mask is 0, and the padding,
are -1, which the loss ignores, so only assistant tokens are learned.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import pickle
import queue
import re
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .config import Section, setting
from .errors import ConfigError, DataError

DTYPES = ("uint16", "uint32")
SHARD_FILE = re.compile(r"^(train|val)_\d{6}\.bin$")


@dataclass
class DataConfig(Section):
    """Where the training tokens come from and how many go into a step."""

    dataset: str = setting("openwebtext", "Dataset folder name under data_root, holding train.bin, val.bin and meta.json.")
    data_root: str = setting("data", "Folder that holds the dataset folders.")
    batch_size: int = setting(12, "Sequences per micro-step per process.", gt=0)
    gradient_accumulation_steps: int = setting(40, "Micro-steps per optimizer step, summed over all processes (divided by the world size under DDP).",
                                               gt=0)
    verify_shards: bool = setting(True, "Check each shard of a sharded dataset against the sha256 in its meta.json when training starts (each process reads every shard once).")
    prefetch: int = setting(2, "Training batches a background thread reads ahead while the device works (0 reads each in the loop); the batches and a resume are the same either way.",
                            ge=0)

    def check(self) -> None:
        if not self.dataset or os.sep in self.dataset or "/" in self.dataset:
            raise ConfigError("dataset must be a folder name under data_root, such as 'shakespeare_char'; got %r" % self.dataset)


def dataset_dir(data_root: str, dataset: str) -> str:
    return os.path.join(data_root, dataset)


def prepare_hint(dataset: str) -> str:
    if os.path.isfile(os.path.join("data", dataset, "prepare.py")):
        return "run `python data/%s/prepare.py` first" % dataset
    return "prepare it first, e.g. `nanogpt prepare corpus --source=YOUR_TEXT --out_dir=data/%s`" % dataset


# --------------------------------------------------------------------------------------------
# meta.json


def write_meta(out_dir: str, meta: dict) -> None:
    """Write ``meta.json`` through a temporary file and a rename."""
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, "meta.json"))


class _PlainUnpickler(pickle.Unpickler):
    """nanoGPT's meta.pkl holds only dicts, strings and ints, which unpickle without looking up
    any class or function; every such lookup is refused, so nothing can be imported or run."""

    def find_class(self, module, name):
        raise DataError("meta.pkl asks for %s.%s: refusing to unpickle anything but plain dicts, lists, "
                        "strings and numbers; re-create it, or write a meta.json" % (module, name))


def _read_meta_file(data_dir: str) -> tuple[object, str] | None:
    path = os.path.join(data_dir, "meta.json")
    if os.path.exists(path):
        if not os.path.isfile(path):
            raise DataError("%s is not a file; prepare the dataset again" % path)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f), path
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError("%s is not valid JSON (%s); prepare the dataset again" % (path, e)) from None
    path = os.path.join(data_dir, "meta.pkl")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _PlainUnpickler(io.BytesIO(data)).load(), path
    except DataError:
        raise
    except Exception as e:  # truncated or foreign data: pickle raises many kinds
        raise DataError("%s cannot be read (%s: %s); prepare the dataset again"
                        % (path, type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")) from None


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_meta(meta, path: str) -> dict:
    """Every field of a meta dict checked for its type and range; ``itos`` keys become ints and
    ``dtype`` defaults to uint16. Returns the cleaned dict."""
    if not isinstance(meta, dict):
        raise DataError("%s holds a %s, not a dict; prepare the dataset again" % (path, type(meta).__name__))
    meta = dict(meta)

    def bad(key: str, want: str):
        raise DataError("%s: %r must be %s, got %r; prepare the dataset again" % (path, key, want, meta[key]))

    meta.setdefault("dtype", "uint16")
    if meta["dtype"] not in DTYPES:
        bad("dtype", "'uint16' or 'uint32'")
    if "vocab_size" not in meta:
        if not isinstance(meta.get("stoi"), dict):
            raise DataError("%s has no vocab_size; prepare the dataset again" % path)
        meta["vocab_size"] = len(meta["stoi"])
    if not _is_int(meta["vocab_size"]) or meta["vocab_size"] <= 0:
        bad("vocab_size", "a positive integer")
    if meta["dtype"] == "uint16" and meta["vocab_size"] > 1 << 16:
        bad("dtype", "uint32 for a vocabulary of %d ids" % meta["vocab_size"])
    for key in ("train_tokens", "val_tokens", "max_token_id"):
        if meta.get(key) is not None and (not _is_int(meta[key]) or meta[key] < 0):
            bad(key, "a non-negative integer")
    if meta.get("eot_token") is not None and (not _is_int(meta["eot_token"]) or not 0 <= meta["eot_token"] < meta["vocab_size"]):
        bad("eot_token", "a token id below vocab_size")
    if meta.get("tokenizer") is not None and not isinstance(meta["tokenizer"], str):
        bad("tokenizer", "a string")
    if ("stoi" in meta) != ("itos" in meta):
        raise DataError("%s has %s without %s; prepare the dataset again" % (path, *(("stoi", "itos") if "stoi" in meta else ("itos", "stoi"))))
    if "stoi" in meta:
        meta["itos"] = _check_char_tables(meta, path)
    if meta.get("shards") is not None:
        _check_shards(meta, path)
    return meta


def _check_shards(meta: dict, path: str) -> None:
    shards = meta["shards"]
    if not isinstance(shards, dict):
        raise DataError("%s: 'shards' must map each split to a list of shards; prepare the dataset again" % path)
    for split, parts in shards.items():
        if not isinstance(parts, list):
            raise DataError("%s: shards[%r] must be a list; prepare the dataset again" % (path, split))
        for k, part in enumerate(parts):
            ok = (isinstance(part, dict) and isinstance(part.get("file"), str) and SHARD_FILE.match(part["file"])
                  and _is_int(part.get("tokens")) and part["tokens"] >= 0 and isinstance(part.get("sha256"), str)
                  and re.fullmatch(r"[0-9a-f]{64}", part["sha256"]))
            if not ok:
                raise DataError("%s: shards[%r][%d] must be {file: '%s_NNNNNN.bin', tokens: N, sha256: HEX}, got %r; "
                                "prepare the dataset again" % (path, split, k, split, part))
        want = meta.get("%s_tokens" % split)
        if want is not None and want != sum(p["tokens"] for p in parts):
            raise DataError("%s: %s_tokens is %d but its shards hold %d; prepare the dataset again"
                            % (path, split, want, sum(p["tokens"] for p in parts)))


def is_chat(meta: dict | None) -> bool:
    """Whether a dataset's meta says it holds conversations with a loss mask (``nanogpt prepare chat``)."""
    return bool(meta and isinstance(meta.get("chat"), dict))


def chat_files(data_dir: str, split: str, n: int) -> tuple[str, np.ndarray]:
    """The mask file of a chat split and its conversation starts, both checked against the
    ``n`` tokens of ``{split}.bin``."""
    mask = os.path.join(data_dir, "%s.mask.bin" % split)
    starts_path = os.path.join(data_dir, "%s.starts.bin" % split)
    for p in (mask, starts_path):
        if not os.path.isfile(p):
            raise DataError("%s is missing: meta.json says this is chat data; prepare it again with `nanogpt prepare chat`" % p)
    if os.path.getsize(mask) != n:
        raise DataError("%s has %d bytes but %s.bin holds %d tokens: the mask does not match; prepare the dataset again"
                        % (mask, os.path.getsize(mask), split, n))
    if os.path.getsize(starts_path) % 8:
        raise DataError("%s is not a whole number of uint64 offsets; prepare the dataset again" % starts_path)
    starts = np.fromfile(starts_path, dtype=np.uint64).astype(np.int64)
    if n and (not len(starts) or starts[0] != 0 or starts[-1] >= n or (len(starts) > 1 and np.any(np.diff(starts) <= 0))):
        raise DataError("%s does not hold increasing conversation offsets from 0 below %d; prepare the dataset again"
                        % (starts_path, n))
    return mask, starts


def _check_char_tables(meta: dict, path: str) -> dict:
    stoi, itos = meta["stoi"], meta["itos"]
    if not isinstance(stoi, dict) or not isinstance(itos, dict):
        raise DataError("%s: stoi and itos must be dicts; prepare the dataset again" % path)
    try:
        itos = {int(k): v for k, v in itos.items()}
    except (TypeError, ValueError):
        raise DataError("%s: 'itos' keys must be integers" % path) from None
    n = meta["vocab_size"]
    for i, c in itos.items():
        if not 0 <= i < n or not isinstance(c, str):
            raise DataError("%s: itos entry %r: %r is not a character of an id below vocab_size %d; prepare the dataset again"
                            % (path, i, c, n))
    for c, i in stoi.items():
        if not _is_int(i) or itos.get(int(i)) != c:
            raise DataError("%s: stoi[%r] = %r does not match itos; prepare the dataset again" % (path, c, i))
    return itos


def load_meta(data_dir: str) -> dict | None:
    """The checked meta dict of a dataset folder (``meta.json``, else a legacy nanoGPT
    ``meta.pkl``); None when it has neither."""
    found = _read_meta_file(data_dir)
    return None if found is None else check_meta(*found)


def token_count(path: str, dtype: str, meta: dict | None = None, split: str = "") -> int:
    """How many tokens a token file holds; its size must be a whole number of tokens and agree
    with the count meta.json gives for it."""
    if os.path.isdir(path):
        raise DataError("%s is a folder, not a token file; prepare the dataset again" % path)
    size, item = os.path.getsize(path), np.dtype(dtype).itemsize
    if size % item:
        raise DataError("%s has %d bytes, not a whole number of %s tokens (%d bytes each): it was cut short or has another "
                        "dtype; prepare the dataset again" % (path, size, dtype, item))
    n = size // item
    want = (meta or {}).get("%s_tokens" % split) if split else None
    if want is not None and want != n:
        raise DataError("%s holds %d tokens but meta.json says %d: the file changed or was cut short; prepare the dataset again"
                        % (path, n, want))
    return n


_CHECKED: dict = {}  # (path, size, mtime) -> sha256: each shard is hashed once per process


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        from .download import sha256_of
        _CHECKED[key] = sha256_of(path)
    return _CHECKED[key]


def has_split(data_dir: str, split: str, meta: dict | None = None) -> bool:
    """Whether the dataset has ``split``: a manifest entry for it, or ``<split>.bin``."""
    shards = (meta or {}).get("shards")
    if shards is not None:
        return split in shards
    return os.path.isfile(os.path.join(data_dir, "%s.bin" % split))


class Tokens:
    """The tokens of one split, read as one sequence: ``<split>.bin``, or the shards that
    meta.json lists for it. ``parts`` is [(path, tokens)], ``n`` their total and ``path`` what
    messages name. Every shard is checked when this opens: present, of the listed size, and
    (with ``verify``, once per process) of the listed sha256."""

    def __init__(self, data_dir: str, split: str, meta: dict | None = None, dataset: str = "", verify: bool = True):
        name = dataset or os.path.basename(os.path.normpath(data_dir))
        self.dtype = np.dtype((meta or {}).get("dtype", "uint16"))
        shards = (meta or {}).get("shards")
        if shards is None:
            self.path = os.path.join(data_dir, "%s.bin" % split)
            if not os.path.exists(self.path):
                raise DataError("dataset %r has no %s (looked for %s); %s"
                                % (name, os.path.basename(self.path), self.path, prepare_hint(name)))
            self.parts = [(self.path, token_count(self.path, self.dtype.name, meta, split))]
        else:
            self.path = os.path.join(data_dir, "%s_*.bin" % split)
            if split not in shards:
                raise DataError("dataset %r has no %s split in its meta.json; %s" % (name, split, prepare_hint(name)))
            self.parts = []
            for part in shards[split]:
                path = os.path.join(data_dir, part["file"])
                if not os.path.isfile(path):
                    raise DataError("dataset %r: shard %s, listed in meta.json, is missing; restore it or prepare the "
                                    "dataset again" % (name, path))
                n = token_count(path, self.dtype.name)
                if n != part["tokens"]:
                    raise DataError("%s holds %d tokens but meta.json says %d: the file changed or was cut short; prepare "
                                    "the dataset again" % (path, n, part["tokens"]))
                if verify and file_sha256(path) != part["sha256"]:
                    raise DataError("%s does not match the sha256 meta.json gives for it: the file changed; restore it or "
                                    "prepare the dataset again" % path)
                if n:
                    self.parts.append((path, n))
        self.starts = [0]
        for _, n in self.parts:
            self.starts.append(self.starts[-1] + n)
        self.n = self.starts[-1]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> np.ndarray:
        """``tokens[a:b]``, read from disk (as a slice of one array would give it)."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("Tokens reads slices with step 1 only")
        start, stop, _ = key.indices(self.n)
        return self.read(start, max(0, stop - start))

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens ``start .. start + count - 1`` (across shard boundaries as needed)."""
        out = np.empty(count, dtype=self.dtype)
        if count:
            self.read_rows([start], out.reshape(1, count))
        return out

    def read_rows(self, starts, out: np.ndarray) -> None:
        """Fill each row of ``out`` with the tokens from its start on: plain file reads (the GIL
        is free while the disk works), each file opened once per call."""
        if not 0 <= min(starts) <= max(starts) <= self.n - out.shape[1]:
            raise DataError("%s: tokens %d..%d asked of %d" % (self.path, min(starts), max(starts) + out.shape[1], self.n))
        files = {}
        try:
            for row, start in zip(out, starts):
                done, k = 0, bisect.bisect_right(self.starts, start) - 1
                while done < len(row):
                    path, n = self.parts[k]
                    at = start + done - self.starts[k]
                    take = min(len(row) - done, n - at)
                    f = files.get(k)
                    if f is None:
                        f = files[k] = open(path, "rb", buffering=0)
                    f.seek(at * self.dtype.itemsize)
                    view = memoryview(row[done:done + take]).cast("B")
                    if f.readinto(view) != view.nbytes:
                        raise DataError("%s was cut short while training read it; prepare the dataset again" % path)
                    done += take
                    k += 1
        finally:
            for f in files.values():
                f.close()


# --------------------------------------------------------------------------------------------
# batches


class BatchLoader:
    """Samples ``batch_size`` windows of ``block_size + 1`` tokens from a split's :class:`Tokens`
    (``<data_dir>/<split>.bin`` or its shards; a window may span two shards).

    Each window is one plain file read: nothing is mapped into this process over a long run, and
    the GIL is free while the disk works. Sampling uses its own generator, whose state goes into
    checkpoints.

    With ``prefetch > 0`` a background thread reads that many batches ahead (into pinned memory
    on CUDA) while the device works; the batches, their order and ``state_dict`` are the same as
    without it, so a resume is exact either way.
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, block_size: int, device: str,
                 seed: int, dtype: str = "uint16", vocab_size: int | None = None, dataset: str = "",
                 prefetch: int = 0, meta: dict | None = None, verify: bool = True):
        name = dataset or os.path.basename(os.path.normpath(data_dir))
        self.tokens = Tokens(data_dir, split, dict(meta or {}, dtype=dtype), name, verify)
        self.path, self.dtype = self.tokens.path, self.tokens.dtype
        n = self.tokens.n
        if n == 0:
            raise DataError("%s is empty; %s" % (self.path, prepare_hint(name)))
        self.mask_path, self.starts = chat_files(data_dir, split, n) if is_chat(meta) else (None, None)
        self.pad = int((meta or {}).get("eot_token") or 0)  # input after the end of a chat split; never a target
        if n < block_size + 1 and self.starts is None:
            raise DataError("%s holds %d tokens, fewer than block_size + 1 = %d; lower --block_size or add data"
                            % (self.path, n, block_size + 1))
        self.n = n
        self.batch_size, self.block_size = batch_size, block_size
        self.device = device
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)  # where the next batch to hand out starts
        self.prefetch = prefetch
        self._worker = None

    def _read(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch from ``generator``'s stream, still in host memory."""
        if self.starts is None:
            starts = torch.randint(self.n - self.block_size, (self.batch_size,), generator=generator).tolist()
        else:  # chat: windows begin where conversations do
            starts = self.starts[torch.randint(len(self.starts), (self.batch_size,), generator=generator).numpy()].tolist()
        raw = np.empty((self.batch_size, self.block_size + 1), dtype=self.dtype)
        if self.starts is None:
            self.tokens.read_rows(starts, raw)
        else:  # chat: a window may run past the end of the split, where it is padded (never a target)
            for row, start in zip(raw, starts):
                take = min(len(row), self.n - start)
                row[:take] = self.tokens.read(start, take)
                row[take:] = self.pad
        return self._batch(raw.astype(np.int64), self._learned(starts) if self.mask_path is not None else None)

    def _batch(self, rows: np.ndarray, learned: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) from rows of ``block_size + 1`` ids (B, T+1), checked against vocab_size; a target
        whose ``learned`` entry is 0 becomes -1 (no loss); pinned on CUDA."""
        if self.vocab_size is not None:
            top = int(rows.max())
            if top >= self.vocab_size:
                raise DataError("%s contains token id %d but the model's vocab_size is %d; re-prepare the data or raise --vocab_size"
                                % (self.path, top, self.vocab_size))
        t = torch.from_numpy(rows)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T) each
        if learned is not None:
            y[torch.from_numpy(learned[:, 1:]) == 0] = -1  # chat data: only assistant tokens are targets
        if self.device.startswith("cuda"):
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def _learned(self, starts: list[int]) -> np.ndarray:
        """The chat mask of each window, (B, T+1) uint8; 0 past the end of the split."""
        mask = np.zeros((self.batch_size, self.block_size + 1), dtype=np.uint8)
        with open(self.mask_path, "rb", buffering=0) as f:
            for row, start in zip(mask, starts):
                f.seek(start)
                f.readinto(memoryview(row))
        return mask

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch <= 0:
            x, y = self._read(self.generator)
        else:
            if self._worker is None:
                self._worker = _Prefetcher(self._read, self._fork(), self.prefetch)
            try:
                x, y, state = self._worker.get()
            except BaseException:
                self.close()
                raise
            self.generator.set_state(state)  # as if this batch had been read here
        if self.device.startswith("cuda"):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        elif self.device != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def _fork(self) -> torch.Generator:
        """A copy of the sampling stream at its position, for the background reader."""
        generator = torch.Generator()
        generator.set_state(self.generator.get_state())
        return generator

    def close(self) -> None:
        """Stop the background reader, dropping what it read ahead; ``next`` starts a new one."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def reseed(self, seed: int) -> None:
        self.close()
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.generator.set_state(state["generator"])


class _Prefetcher:
    """A daemon thread that calls ``read(generator)`` ahead into a bounded queue, passing on the
    generator's state after each batch, or the error that stopped it. ``generator`` is its own
    copy of the loader's stream."""

    def __init__(self, read, generator, depth: int):
        self.queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(read, generator), daemon=True, name="batch-prefetch")
        self.thread.start()

    def _run(self, read, generator) -> None:
        while not self.stopped.is_set():
            try:
                item = (*read(generator), generator.get_state())
            except BaseException as e:  # handed to the training loop, which raises it
                item = e
            self.queue.put(item)  # stop() makes room, so this never blocks a stop
            if isinstance(item, BaseException):
                return

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self.stopped.set()
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        self.thread.join()
