"""Dataset preparation: checked downloads, tokenization, token files and ``meta.json``.

    nanogpt prepare shakespeare_char           # tiny Shakespeare, one token per character
    nanogpt prepare shakespeare                # tiny Shakespeare, GPT-2 BPE
    nanogpt prepare openwebtext                # OpenWebText from the Hugging Face hub (needs `datasets`)
    nanogpt prepare corpus --source=PATH_OR_HF_NAME --out_dir=data/mine [--tokenizer=gpt2|char|DIR]
    nanogpt prepare tokenizer --source=PATH_OR_HF_NAME --vocab_size=8192 --out=DIR   # see bpe.py
    nanogpt prepare chat --source=CONVERSATIONS.jsonl --out_dir=data/mychat   # chat SFT data, with a loss mask

(``python data/<name>/prepare.py [options]`` does the same into that folder.)

Tiny Shakespeare gets ``train.bin`` and ``val.bin``, the token ids as raw unsigned integers
(uint16 when the vocabulary fits in 65,536 ids, else uint32), and ``meta.json`` with
``vocab_size``, ``dtype``, ``tokenizer``, the token counts, the largest id, and for character
data the ``stoi`` / ``itos`` tables. A corpus (and openwebtext) gets shards, ``train_000000.bin``,
... and ``val_000000.bin``, ..., listed in ``meta.json`` with their sizes and sha256s, written so
that a killed preparation continues where it stopped (see :mod:`nanogpt.corpus`). Files are
written under a temporary name and renamed into place, so an interrupted run never leaves a
half-written file that looks finished.

Downloads are checked by sha256. Offline, point ``--mirror`` or ``NANOGPT_DATA_MIRROR`` at a
folder holding the same files (``tinyshakespeare/input.txt``, and ``tiktoken-cache/`` for the
GPT-2 BPE files).

BPE datasets follow GPT-2's training format: the ``<|endoftext|>`` token (50256) closes every
document, so the model sees where one text ends and the next begins. Tiny Shakespeare counts as
one document per split; each of its two files ends with that token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .config import Config, Section, setting
from .corpus import SHARD_TOKENS, prepare_corpus, token_dtype  # noqa: F401  (prepare_corpus: part of this module's interface)
from .download import fetch, sha256_of
from .errors import ConfigError, PrepareError, UserError, first_line, run_command

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_MIRROR_PATH = "tinyshakespeare/input.txt"
OPENWEBTEXT_HF = "Skylion007/openwebtext"  # parquet files on the hub: loads without a dataset script
GPT2_EOT = 50256  # <|endoftext|>


def _log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# tiny Shakespeare's text


def shakespeare_input(out_dir: str, mirror: str | None = None) -> str:
    """The path of tiny Shakespeare's ``input.txt`` in ``out_dir``, fetched when missing (from a
    correct copy in the sibling ``shakespeare_char`` folder when there is one, else via
    :func:`fetch`). An ``input.txt`` that is not tiny Shakespeare is kept and used as given, as
    nanoGPT users put their own text there; a note says so."""
    dest = os.path.join(out_dir, "input.txt")
    if os.path.isfile(dest):
        got = sha256_of(dest)
        if got != SHAKESPEARE_SHA256:
            _log("note: %s is not tiny Shakespeare (sha256 %s...): preparing it as given; delete it to get "
                 "tiny Shakespeare" % (dest, got[:16]))
        return dest
    sibling = os.path.join(os.path.dirname(os.path.abspath(out_dir)), "shakespeare_char")
    sibling_file = os.path.join(sibling, "input.txt")
    if (os.path.abspath(sibling_file) != os.path.abspath(dest) and os.path.isfile(sibling_file)
            and sha256_of(sibling_file) == SHAKESPEARE_SHA256):
        return fetch(SHAKESPEARE_URL, dest, SHAKESPEARE_SHA256, "input.txt", mirror=sibling)
    return fetch(SHAKESPEARE_URL, dest, SHAKESPEARE_SHA256, SHAKESPEARE_MIRROR_PATH, mirror)


# --------------------------------------------------------------------------------------------
# writing


def write_tokens(path: str, ids: np.ndarray) -> None:
    """Write raw ids to ``path`` through a temporary file and a rename."""
    tmp = path + ".tmp"
    try:
        ids.tofile(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise PrepareError("%s is not UTF-8 text (byte %d); convert it to UTF-8" % (path, e.start)) from None


# --------------------------------------------------------------------------------------------
# tiny Shakespeare


def prepare_shakespeare_char(out_dir: str = "data/shakespeare_char", mirror: str | None = None) -> dict:
    """Tiny Shakespeare at character level, as nanoGPT does it: ids are the positions of the
    characters in the sorted list of distinct characters; the first 90% of the text is
    ``train.bin``, the rest ``val.bin``. Returns the meta dict written to ``meta.json``."""
    from .data import write_meta

    path = shakespeare_input(out_dir, mirror)
    text = _read_text(path)
    if len(text) < 2:
        raise PrepareError("%s holds %d character(s); it needs at least 2 for a train and a val part" % (path, len(text)))
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    uniq, ids = np.unique(codes, return_inverse=True)  # sorted code points == sorted(set(text))
    chars = [chr(c) for c in uniq.tolist()]
    dtype = token_dtype(len(chars))
    ids = ids.reshape(-1).astype(dtype)
    n = int(0.9 * len(ids))
    write_tokens(os.path.join(out_dir, "train.bin"), ids[:n])
    write_tokens(os.path.join(out_dir, "val.bin"), ids[n:])
    meta = {"vocab_size": len(chars), "dtype": dtype.name, "tokenizer": "char",
            "train_tokens": n, "val_tokens": len(ids) - n, "max_token_id": len(chars) - 1,
            "stoi": {c: i for i, c in enumerate(chars)}, "itos": {str(i): c for i, c in enumerate(chars)}}
    write_meta(out_dir, meta)
    _log("%s: %s characters, vocab %d; train %s tokens, val %s tokens"
         % (out_dir, f"{len(ids):,}", len(chars), f"{n:,}", f"{len(ids) - n:,}"))
    return meta


def prepare_shakespeare(out_dir: str = "data/shakespeare", mirror: str | None = None) -> dict:
    """Tiny Shakespeare in GPT-2 BPE: the text is split 90/10 by characters, each part is encoded
    with ``encode_ordinary`` and closed by ``<|endoftext|>`` (so 301,967 train and 36,060 val
    tokens: nanoGPT's counts plus one each). Returns the meta dict written to ``meta.json``."""
    from .data import write_meta
    from .tokenizer import get_gpt2_encoding

    enc = get_gpt2_encoding(mirror)
    text = _read_text(shakespeare_input(out_dir, mirror))
    n = int(0.9 * len(text))
    dtype = token_dtype(enc.n_vocab)
    counts, top = {}, 0
    for split, part in (("train", text[:n]), ("val", text[n:])):
        ids = np.array(enc.encode_ordinary(part) + [enc.eot_token], dtype=dtype)
        write_tokens(os.path.join(out_dir, split + ".bin"), ids)
        counts[split] = len(ids)
        top = max(top, int(ids.max()))
    meta = {"vocab_size": enc.n_vocab, "dtype": dtype.name, "tokenizer": "gpt2",
            "train_tokens": counts["train"], "val_tokens": counts["val"], "max_token_id": top,
            "eot_token": enc.eot_token}
    write_meta(out_dir, meta)
    _log("%s: GPT-2 BPE; train %s tokens, val %s tokens (each ending with <|endoftext|>)"
         % (out_dir, f"{counts['train']:,}", f"{counts['val']:,}"))
    return meta


# --------------------------------------------------------------------------------------------
# conversations (chat SFT data)

CHAT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
CHAT_VAL_FRACTION = 0.1  # the chat default: small conversation files need a val set worth measuring


def _json_array_file(path: str) -> bool:
    """Whether a .json file holds one JSON array (rather than JSON lines)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _load_json_array(path: str) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError("%s is not a valid JSON array (%s)" % (path, e)) from None
    if not isinstance(rows, list):
        raise PrepareError("%s holds a JSON %s, not a list of objects" % (path, type(rows).__name__))
    return rows


def _hub_conversations(name: str, field: str, split: str):
    """A Hugging Face dataset (the optional ``datasets`` package) of conversations, one table."""
    try:
        import datasets
    except ImportError:
        raise PrepareError("%r is not a local file, and reading it from the Hugging Face hub needs the datasets "
                           "package: pip install datasets" % name) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # the hub, the network and the files can all fail in many ways
        raise PrepareError("%r is not a local file, and loading it as Hugging Face dataset (split %r) failed: %s"
                           % (name, split, first_line(e, 300))) from None
    if not hasattr(ds, "column_names") or not hasattr(ds, "__len__"):
        raise PrepareError("Hugging Face dataset %r split %r did not load as one table" % (name, split))
    if field not in ds.column_names:
        raise PrepareError("Hugging Face dataset %r has no %r column (columns: %s); pass --text_field"
                           % (name, field, ", ".join(ds.column_names)))
    return ds.remove_columns([c for c in ds.column_names if c != field])


def _open_text_lines(path: str):
    """The lines of a UTF-8 text file, gunzipped when its name ends with .gz."""
    if path.endswith(".gz"):
        import gzip
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


class _Conversations:
    """Conversations from a .jsonl / .jsonl.gz / .json (JSON lines, or one JSON array) file, a local .parquet file
    (needs pyarrow) or a Hugging Face dataset with a ``field`` column (needs datasets). Opening
    reads them all once and checks each (:func:`check_conversation`), so bad input is reported
    before any work starts; ``count`` is how many there are, and ``rows()`` gives (where,
    messages) with ``where`` naming the file and line (or row)."""

    def __init__(self, source: str, field: str, hf_split: str):
        self.source, self.field = source, field
        self.kind = "hub"
        if os.path.isdir(source):
            raise PrepareError("--source=%s is a folder; give one conversation file (.jsonl, .jsonl.gz, .json or .parquet)" % source)
        if os.path.isfile(source):
            if not source.endswith(CHAT_SUFFIXES):
                raise PrepareError("%s: unsupported file type; use .jsonl (one {\"messages\": [...]} object per line), "
                                   ".jsonl.gz or .parquet" % source)
            self.kind = "parquet" if source.endswith(".parquet") else "jsonl"
        if self.kind == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise PrepareError("reading %s needs pyarrow: pip install pyarrow" % source) from None
            try:
                self.table = pq.ParquetFile(source)
            except Exception as e:  # pyarrow raises several kinds for a file that is not parquet
                raise PrepareError("%s is not a readable parquet file (%s)" % (source, str(e).splitlines()[0][:200])) from None
            if field not in self.table.schema_arrow.names:
                raise PrepareError("%s has no %r column (columns: %s); pass --text_field"
                                   % (source, field, ", ".join(self.table.schema_arrow.names)))
        elif self.kind == "hub":
            self.ds = _hub_conversations(source, field, hf_split)
        self.count = 0
        for where, messages in self.rows():
            check_conversation(messages, where)
            self.count += 1

    def rows(self):
        if self.kind == "jsonl":
            try:
                yield from self._lines()
            except (UnicodeDecodeError, OSError, EOFError) as e:
                raise PrepareError("%s cannot be read as UTF-8 JSON lines (%s)" % (self.source, e)) from None
        elif self.kind == "parquet":
            i = 0
            for batch in self.table.iter_batches(batch_size=1000, columns=[self.field]):
                for messages in batch.column(0).to_pylist():
                    yield "%s row %d" % (self.source, i), messages
                    i += 1
        else:
            i = 0
            for batch in self.ds.iter(batch_size=1000):
                for messages in batch[self.field]:
                    yield "Hugging Face dataset %r row %d" % (self.source, i), messages
                    i += 1

    def _lines(self):
        if self.source.endswith(".json") and _json_array_file(self.source):  # one JSON array of conversations
            for i, row in enumerate(_load_json_array(self.source)):
                yield self._messages(row, "%s item %d" % (self.source, i))
            return
        with _open_text_lines(self.source) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                where = "%s line %d" % (self.source, i + 1)
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError("%s is not valid JSON (%s)" % (where, e.msg)) from None
                yield self._messages(row, where)

    def _messages(self, row, where: str):
        if not isinstance(row, dict) or self.field not in row:
            raise PrepareError("%s is not an object with a %r list; write {\"%s\": [{\"role\": ..., \"content\": ...}]}"
                               % (where, self.field, self.field))
        return where, row[self.field]


def check_conversation(messages, where: str) -> list[dict]:
    """One conversation's messages, checked; a PrepareError naming ``where`` when they are not a
    list of role/content messages, have an unknown role or no assistant turn, or a content holds
    the text ``<|endoftext|>`` (which would end its turn early)."""
    from . import chat_template

    try:
        messages = chat_template.check_messages(messages, where)
    except UserError as e:
        raise PrepareError(str(e)) from None
    if not any(m["role"] == "assistant" for m in messages):
        raise PrepareError("%s has no assistant turn: nothing in it would be learned; add one or leave it out" % where)
    for i, m in enumerate(messages):
        if chat_template.EOT_TEXT in m["content"]:
            raise PrepareError("%s: message %d holds the text %s, which ends a turn; remove it"
                               % (where, i, chat_template.EOT_TEXT))
    return messages


def prepare_chat(out_dir: str, source: str, *, field: str = "messages", val_fraction: float = CHAT_VAL_FRACTION,
                 hf_split: str = "train", seed: int = 2357, mirror: str | None = None) -> dict:
    """Conversations into ``out_dir`` for supervised finetuning, in the chat template of
    chat_template.py (GPT-2 BPE).

    For each split: ``{split}.bin`` (the token ids, uint16, conversations one after another),
    ``{split}.mask.bin`` (uint8, one per token: 1 where the token is learned, i.e. an assistant
    reply and its closing ``<|endoftext|>``) and ``{split}.starts.bin`` (uint64, the offset of each
    conversation's first token; training windows start only there). A seeded shuffle of the
    conversation indices picks ``val_fraction`` of them (at least one when there are two or more)
    for val. ``meta.json`` has a ``chat`` entry, which tells training, eval.py and the chat
    commands that this is chat data. Everything is written under temporary names and renamed into
    place only when every conversation was read and encoded.
    """
    from tqdm import tqdm

    from . import chat_template
    from .tokenizer import BPETokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError("val_fraction must be in [0, 1); got %r" % val_fraction)
    convs = _Conversations(source, field, hf_split)
    tok = BPETokenizer("gpt2", mirror)
    dtype = token_dtype(tok.vocab_size)
    n = convs.count
    if n == 0:
        raise PrepareError("%s holds no conversations" % source)
    is_val = np.zeros(n, dtype=bool)
    n_val = 0
    if n >= 2:
        n_val = min(n - 1, max(1, round(n * val_fraction)))
        is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True

    os.makedirs(out_dir, exist_ok=True)
    names = [split + suffix for split in ("train", "val") for suffix in (".bin", ".mask.bin", ".starts.bin")]
    paths = {name: os.path.join(out_dir, name) for name in names}
    tmps = {name: p + ".tmp" for name, p in paths.items()}
    files = {}
    counts = {"train": 0, "val": 0}
    learned = {"train": 0, "val": 0}
    top = 0
    try:
        for name in names:
            files[name] = open(tmps[name], "wb")
        with tqdm(total=n, desc="tokenizing", unit="conversation", dynamic_ncols=True) as bar:
            i = -1
            for i, (where, messages) in enumerate(convs.rows()):
                if i >= n:
                    raise PrepareError("%s changed while it was read; try again" % source)
                ids, mask = chat_template.encode(check_conversation(messages, where), tok)
                split = "val" if is_val[i] else "train"
                files[split + ".starts.bin"].write(np.array([counts[split]], dtype=np.uint64).tobytes())
                files[split + ".bin"].write(np.array(ids, dtype=dtype).tobytes())
                files[split + ".mask.bin"].write(np.array(mask, dtype=np.uint8).tobytes())
                counts[split] += len(ids)
                learned[split] += sum(mask)
                top = max(top, max(ids))
                bar.update(1)
            if i + 1 != n:
                raise PrepareError("%s changed while it was read; try again" % source)
        for f in files.values():
            f.close()
        for name in names:
            os.replace(tmps[name], paths[name])
    finally:
        for f in files.values():
            f.close()
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)

    meta = {"vocab_size": tok.vocab_size, "dtype": dtype.name, "tokenizer": "gpt2",
            "train_tokens": counts["train"], "val_tokens": counts["val"], "max_token_id": int(top),
            "eot_token": tok.eot_token,
            "chat": {"template": "plain", "mask": "uint8", "starts": "uint64",
                     "conversations": {"train": n - n_val, "val": n_val}, "learned_tokens": learned},
            "source": source, "seed": seed}
    from .data import write_meta
    write_meta(out_dir, meta)
    _log("%s: %s conversation%s (%s in val); train %s tokens (%s learned), val %s tokens (%s learned)" % (
        out_dir, f"{n:,}", "" if n == 1 else "s", f"{n_val:,}", f"{counts['train']:,}", f"{learned['train']:,}",
        f"{counts['val']:,}", f"{learned['val']:,}"))
    if counts["val"] == 0:
        _log("warning: val.bin is empty; add more conversations")
    return meta



# --------------------------------------------------------------------------------------------
# command line

DATASETS = ("shakespeare_char", "shakespeare", "openwebtext", "corpus", "chat")


@dataclass
class PrepareSettings(Section):
    """Where a dataset is prepared, and from what (source and the rest: openwebtext and corpus)."""

    out_dir: str = setting("", "Output folder (default: data/<name>, or the folder of data/<name>/prepare.py).", path="out")
    mirror: str = setting("", "Local folder mirroring the downloads (default: $NANOGPT_DATA_MIRROR).", path="dir")
    source: str = setting("", "A .txt/.jsonl/.json (.gz, .zst)/.parquet file or a folder of them, or a Hugging Face dataset "
                          "name, streamed (openwebtext: %s; chat: a .jsonl, .jsonl.gz or .parquet file of conversations, "
                          "or a dataset name)." % OPENWEBTEXT_HF)
    tokenizer: str = setting("gpt2", "Tokenizer of corpus and openwebtext: 'gpt2' (GPT-2 BPE), 'char' (the corpus's characters) or a folder from `nanogpt prepare tokenizer`.")
    text_field: str = setting("text", "JSON field / dataset column with the text (chat: with the messages; unset, 'messages').")
    val_fraction: float = setting(0.0005, "Share of documents held out for val.bin (chat: of conversations; unset, %g)." % CHAT_VAL_FRACTION,
                                  ge=0, lt=1)
    num_proc: int = setting(0, "Tokenizer processes (0: min(8, CPUs)).", ge=0)
    split: str = setting("train", "Hugging Face split to read.")
    hf_config: str = setting("", "Hugging Face dataset configuration (subset) to read, e.g. sample-10BT.")
    seed: int = setting(2357, "Seed of the draws that pick the val documents.", ge=0)
    shard_tokens: int = setting(SHARD_TOKENS, "Tokens per shard file (train_000000.bin, ...); the last shard of a split holds the rest.",
                                gt=0)
    dedup: bool = setting(False, "Leave out documents whose text equals an earlier document's.")

    def check(self) -> None:
        if not self.text_field:
            raise ConfigError("text_field must name the JSON field or column that holds the text; got ''")


class PrepareConfig(Config):
    """Every key of ``nanogpt prepare`` and ``data/<name>/prepare.py``."""

    sections = (("prepare", PrepareSettings),)


def prepare(name: str, cfg: PrepareConfig, default_out: str | None = None) -> dict:
    """Prepare dataset ``name`` as ``cfg`` says; returns its meta dict. A folder this created is
    removed again when preparation fails, so a failure leaves nothing behind."""
    if name not in DATASETS:
        raise ConfigError("unknown dataset %r; choose one of %s" % (name, ", ".join(DATASETS)))
    cfg.validate()
    out = cfg.out_dir or default_out or os.path.join("data", name)
    created = not os.path.exists(out)
    try:
        if name in ("shakespeare_char", "shakespeare"):
            if cfg.source:
                raise PrepareError("--source is for openwebtext, corpus and chat; %s always reads tiny Shakespeare" % name)
            if cfg.tokenizer != "gpt2":
                raise PrepareError("--tokenizer is for openwebtext and corpus; %s has its own (use corpus --source=FILE for another)" % name)
            return (prepare_shakespeare_char if name == "shakespeare_char" else prepare_shakespeare)(out, cfg.mirror or None)
        if name == "chat":
            if not cfg.source:
                raise PrepareError("chat needs --source=PATH (a .jsonl, .jsonl.gz or .parquet file of {\"messages\": [...]} "
                                   "conversations) or --source=HF_DATASET_NAME")
            return prepare_chat(out, cfg.source, field=cfg.text_field if "text_field" in cfg.sources else "messages",
                                val_fraction=cfg.val_fraction if "val_fraction" in cfg.sources else CHAT_VAL_FRACTION,
                                hf_split=cfg.split, seed=cfg.seed, mirror=cfg.mirror or None)
        source = cfg.source or (OPENWEBTEXT_HF if name == "openwebtext" else None)
        if not source:
            raise PrepareError("corpus needs --source=PATH (a .txt/.jsonl/.json file or a folder of them) "
                               "or --source=HF_DATASET_NAME")
        return prepare_corpus(out, source, tokenizer=cfg.tokenizer, text_field=cfg.text_field, val_fraction=cfg.val_fraction,
                              num_proc=cfg.num_proc or None, hf_split=cfg.split, hf_config=cfg.hf_config, seed=cfg.seed,
                              shard_tokens=cfg.shard_tokens,
                              dedup=cfg.dedup, mirror=cfg.mirror or None)
    except BaseException:
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise


def main(argv: list[str] | None = None, name: str | None = None, out_dir: str | None = None) -> None:
    """``nanogpt prepare NAME [--key=value ...]``; with ``name`` given (the per-dataset scripts)
    there is no positional argument and ``out_dir`` is the default output folder."""
    def run(args: list[str]) -> None:
        if name is None:
            if not args or args[0].startswith("-"):
                if args and args[0] in ("-h", "--help"):
                    PrepareConfig.parse(args)
                raise ConfigError("name the dataset: nanogpt prepare {%s} [--key=value ...]" % ",".join(DATASETS + ("tokenizer",)))
            if args[0] == "tokenizer":  # not a dataset: trains a tokenizer (bpe.py)
                from .bpe import TokenizerConfig, prepare_tokenizer
                prepare_tokenizer(TokenizerConfig.parse(args[1:]))
                return
            prepare(args[0], PrepareConfig.parse(args[1:]), out_dir)
        else:
            prepare(name, PrepareConfig.parse(args), out_dir)
    run_command(run, argv)


if __name__ == "__main__":
    main()
