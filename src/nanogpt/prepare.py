"""Dataset preparation: checked downloads, tokenization, token files and ``meta.json``.

    nanogpt prepare shakespeare_char           # tiny Shakespeare, one token per character
    nanogpt prepare shakespeare                # tiny Shakespeare, GPT-2 BPE
    nanogpt prepare openwebtext                # OpenWebText from the Hugging Face hub (needs `datasets`)
    nanogpt prepare corpus --source=PATH_OR_HF_NAME --out_dir=data/mine [--tokenizer=gpt2|char|DIR]
    nanogpt prepare tokenizer --source=PATH_OR_HF_NAME --vocab_size=8192 --out=DIR   # see bpe.py

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

import os
import shutil
import sys
from dataclasses import dataclass

import numpy as np

from .config import Config, Section, setting
from .corpus import SHARD_TOKENS, prepare_corpus, token_dtype  # noqa: F401  (prepare_corpus: part of this module's interface)
from .download import fetch, sha256_of
from .errors import ConfigError, PrepareError, run_command

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
# command line

DATASETS = ("shakespeare_char", "shakespeare", "openwebtext", "corpus")


@dataclass
class PrepareSettings(Section):
    """Where a dataset is prepared, and from what (source and the rest: openwebtext and corpus)."""

    out_dir: str = setting("", "Output folder (default: data/<name>, or the folder of data/<name>/prepare.py).", path="out")
    mirror: str = setting("", "Local folder mirroring the downloads (default: $NANOGPT_DATA_MIRROR).", path="dir")
    source: str = setting("", "A .txt/.jsonl/.json (.gz, .zst)/.parquet file or a folder of them, or a Hugging Face dataset "
                          "name, streamed (openwebtext: %s)." % OPENWEBTEXT_HF)
    tokenizer: str = setting("gpt2", "Tokenizer of corpus and openwebtext: 'gpt2' (GPT-2 BPE), 'char' (the corpus's characters) or a folder from `nanogpt prepare tokenizer`.")
    text_field: str = setting("text", "JSON field / dataset column with the text.")
    val_fraction: float = setting(0.0005, "Share of documents held out for val.bin.", ge=0, lt=1)
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
                raise PrepareError("--source is for openwebtext and corpus; %s always reads tiny Shakespeare" % name)
            if cfg.tokenizer != "gpt2":
                raise PrepareError("--tokenizer is for openwebtext and corpus; %s has its own (use corpus --source=FILE for another)" % name)
            return (prepare_shakespeare_char if name == "shakespeare_char" else prepare_shakespeare)(out, cfg.mirror or None)
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
