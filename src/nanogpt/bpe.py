"""Train a byte-level BPE tokenizer on a corpus: ``nanogpt prepare tokenizer``.

    nanogpt prepare tokenizer --source=data/shakespeare_char/input.txt --vocab_size=8192 --out=tok-8k
    nanogpt prepare corpus --source=data/shakespeare_char/input.txt --tokenizer=tok-8k --out_dir=data/shakespeare_8k

The training is Hugging Face's ``tokenizers`` library (a Rust BPE trainer; pip install tokenizers).
It is well kept and widely used, its trainer takes the text from an iterator (so the corpus is
streamed, never held in memory whole), and the ``tokenizer.json`` it writes is the file
``transformers.AutoTokenizer`` loads: the tokenizer this project trains with is, byte for byte,
the one an exported model ships with.

The tokenizer is GPT-2's design: text is split with GPT-2's pattern (words, numbers, punctuation,
spaces), each piece is taken as UTF-8 bytes, and merges are learned over those bytes, so every
text encodes (there is no unknown token) and decodes back exactly. The vocabulary is the special
tokens (``<|endoftext|>`` first, id 0, then any named with ``--special_tokens``), the 256 bytes,
and the learned merges up to ``--vocab_size`` in all (fewer when the corpus runs out of pairs
seen ``--min_frequency`` times).

Sources: a .txt file (read in blocks), .jsonl / .json lines / .jsonl.gz (the ``--text_field`` of
each line), .parquet (that column, read in record batches; needs pyarrow), a folder of such
files (recursively, sorted), or a Hugging Face dataset name (read with ``streaming=True``; needs
datasets). Memory stays bounded: text is handed to the trainer a batch at a time, and what the
trainer keeps grows with the number of distinct words, not with the corpus; ``--max_bytes``
stops reading after that much text.

The folder written holds ``tokenizer.json`` (which ``prepare corpus --tokenizer=DIR`` reads) and
``tokenizer_config.json`` / ``special_tokens_map.json``, so that
``transformers.AutoTokenizer.from_pretrained(DIR)`` loads it as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass

from .config import Config, Section, setting
from .errors import ConfigError, PrepareError, run_command
from .tokenizer import EOT_TEXT, TOKENIZER_FILES, ByteBPETokenizer, _tokenizers_module, write_tokenizer_folder

N_BYTES = 256  # the byte alphabet every byte-level BPE starts from
BLOCK_CHARS = 1 << 20  # a .txt file is read about this many characters at a time
BATCH_CHARS = 1 << 20  # the trainer gets about this much text per batch
BATCH_DOCS = 1024  # and at most this many texts
SAMPLE_BYTES = 1 << 20  # the first this-many bytes of text measure the compression at the end


def _log(msg: str) -> None:
    print(msg, flush=True)


def special_token_list(names: str) -> list[str]:
    """``<|endoftext|>`` and then the comma-separated ``names`` (duplicates dropped, order kept)."""
    out = [EOT_TEXT]
    for name in names.split(","):
        name = name.strip()
        if name and name not in out:
            out.append(name)
    return out


# --------------------------------------------------------------------------------------------
# reading a source


def source_texts(source: str, field: str = "text", split: str = "train"):
    """Every text of ``source`` in order, read as ``prepare corpus`` reads it (corpus.py: local
    files when the path exists, else a Hugging Face dataset, streamed; long documents in pieces
    cut where GPT-2's pre-tokenizer splits anyway). Returns (an iterator of texts, the bytes of
    text to read, or None when unknown: compressed or columnar files, or a dataset)."""
    from . import corpus
    src = corpus.open_source(source, field, split)
    files = getattr(src, "files", None)
    size = None if files is None or any(p.endswith((".gz", ".zst", ".parquet")) for p in files) else src.total_bytes
    return corpus.source_texts(src), size


# --------------------------------------------------------------------------------------------
# training


def _first_text_or_fail(texts, source: str, field: str):
    """``texts`` again, once one that is not empty has been read; a source without text is an error."""
    import itertools
    for text in texts:
        if text:
            return itertools.chain([text], texts)
    raise PrepareError("%s holds no text (field %r); check --source and --text_field" % (source, field))


class _Feed:
    """Batches of texts for the trainer, counting what went through and keeping the first
    ``SAMPLE_BYTES`` of it; stops after ``max_bytes`` bytes of text (0: no limit)."""

    def __init__(self, texts, bar, max_bytes: int):
        self.texts, self.bar, self.max_bytes = texts, bar, max_bytes
        self.docs = self.bytes = 0
        self.sample: list[str] = []
        self.sample_bytes = 0

    def __iter__(self):
        batch, chars = [], 0
        for text in self.texts:
            if not text:
                continue
            data = text.encode("utf-8")
            n = len(data)
            if self.max_bytes and self.bytes + n > self.max_bytes:  # the last text read is cut to the budget
                n = self.max_bytes - self.bytes
                text = data[:n].decode("utf-8", errors="ignore")
            self.docs += 1
            self.bytes += n
            self.bar.update(n)
            if self.sample_bytes < SAMPLE_BYTES:
                self.sample.append(text)
                self.sample_bytes += n
            batch.append(text)
            chars += len(text)
            if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                yield batch
                batch, chars = [], 0
            if self.max_bytes and self.bytes >= self.max_bytes:
                break
        if batch:
            yield batch


def new_tokenizer():
    """An untrained byte-level BPE laid out as GPT-2's: GPT-2's split pattern, no space added in
    front of the text, bytes shown as printable characters, decoded back to bytes."""
    tk = _tokenizers_module()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(source: str, vocab_size: int, out: str, *, special_tokens: str = "", text_field: str = "text",
                    split: str = "train", min_frequency: int = 2, max_bytes: int = 0, progress: bool = True) -> dict:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``source`` and write it into ``out``
    (see the module docstring). Returns a summary: the vocabulary size reached, documents and
    bytes read, seconds taken, and bytes per token on the first MiB of the text."""
    from tqdm import tqdm

    tk = _tokenizers_module()
    specials = special_token_list(special_tokens)
    least = N_BYTES + len(specials)
    if vocab_size < least:
        raise ConfigError("vocab_size=%d is too small: the %d bytes and %d special token%s need %d ids; pass "
                          "--vocab_size=%d or more" % (vocab_size, N_BYTES, len(specials), "" if len(specials) == 1 else "s",
                                                       least, least))
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepareError("out=%s is a file; choose a folder for the tokenizer" % out)
    texts, size = source_texts(source, text_field, split)  # a bad source fails here, before any work
    texts = _first_text_or_fail(texts, source, text_field)
    tok = new_tokenizer()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    t0 = time.time()
    total = min(size, max_bytes) if size and max_bytes else size
    with tqdm(total=total, desc="reading text", unit="B", unit_scale=True, disable=not progress, dynamic_ncols=True) as bar:
        feed = _Feed(texts, bar, max_bytes)
        tok.train_from_iterator(feed, trainer)
    if feed.bytes == 0:
        raise PrepareError("%s holds no text (field %r); check --source and --text_field" % (source, text_field))
    tokenizer_json = tok.to_str()
    trained = ByteBPETokenizer(tokenizer_json, "the trained tokenizer")  # the same checks a reader makes
    sample = "".join(feed.sample)
    sample_tokens = len(trained.encode_ordinary(sample))
    write_folder(out, tokenizer_json)
    summary = {"vocab_size": trained.vocab_size, "requested_vocab_size": vocab_size, "special_tokens": specials,
               "documents": feed.docs, "bytes": feed.bytes, "seconds": round(time.time() - t0, 2),
               "bytes_per_token": round(len(sample.encode("utf-8")) / max(1, sample_tokens), 4)}
    _log("%s: byte-level BPE, %s tokens (%s special) from %s text%s, %s bytes of text in %.1f s; %.3f bytes/token "
         "on the first %s bytes" % (out, f"{trained.vocab_size:,}", len(specials), f"{feed.docs:,}", "" if feed.docs == 1 else "s",
                                    f"{feed.bytes:,}", summary["seconds"], summary["bytes_per_token"],
                                    f"{len(sample.encode('utf-8')):,}"))
    if trained.vocab_size < vocab_size:
        _log("note: the corpus gave only %s of the %s tokens asked for (no pair left seen %d times); more text gives more"
             % (f"{trained.vocab_size:,}", f"{vocab_size:,}", min_frequency))
    return summary


def write_folder(out: str, tokenizer_json: str) -> None:
    """The tokenizer files written beside each other in a temporary folder and then moved into
    ``out`` (created when missing; other files there are left alone)."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    try:
        write_tokenizer_folder(tmp, tokenizer_json)
        os.makedirs(out, exist_ok=True)
        for name in TOKENIZER_FILES:
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# command line


@dataclass
class TokenizerSettings(Section):
    """What ``nanogpt prepare tokenizer`` trains, and on what."""

    source: str = setting("", "A .txt/.jsonl/.jsonl.gz/.parquet file or a folder of them, or a Hugging Face dataset name (streamed).")
    vocab_size: int = setting(8192, "Tokens in all: the special tokens, the 256 bytes and the learned merges.", gt=0)
    out: str = setting("", "Folder to write tokenizer.json, tokenizer_config.json and special_tokens_map.json into.", path="out")
    special_tokens: str = setting("", "Comma-separated special tokens added after <|endoftext|> (which is always id 0).")
    text_field: str = setting("text", "JSON field / parquet or dataset column with the text.")
    split: str = setting("train", "Hugging Face split to read.")
    min_frequency: int = setting(2, "Learn a merge only for a pair seen at least this often.", ge=1)
    max_bytes: int = setting(0, "Stop reading after this many bytes of text (0: read it all).", ge=0)

    def check(self) -> None:
        if not self.source:
            raise ConfigError("source must be set: --source=PATH (a .txt/.jsonl/.jsonl.gz/.parquet file or a folder) or "
                              "--source=HF_DATASET_NAME")
        if not self.out:
            raise ConfigError("out must be set: the folder to write the tokenizer into, e.g. --out=tokenizer-8k")
        if not self.text_field:
            raise ConfigError("text_field must name the JSON field or column that holds the text; got ''")
        for name in special_token_list(self.special_tokens):
            if name != name.strip() or any(c.isspace() for c in name):
                raise ConfigError("special_tokens: %r has whitespace in it; name tokens such as <|im_start|>" % name)


class TokenizerConfig(Config):
    """Every key of ``nanogpt prepare tokenizer``."""

    sections = (("tokenizer", TokenizerSettings),)


def prepare_tokenizer(cfg: TokenizerConfig) -> dict:
    cfg.validate()
    return train_tokenizer(cfg.source, cfg.vocab_size, cfg.out, special_tokens=cfg.special_tokens, text_field=cfg.text_field,
                           split=cfg.split, min_frequency=cfg.min_frequency, max_bytes=cfg.max_bytes)


def main(argv: list[str] | None = None) -> None:
    """``nanogpt prepare tokenizer --source=... --vocab_size=N --out=DIR``."""
    run_command(lambda args: prepare_tokenizer(TokenizerConfig.parse(args)), argv)


if __name__ == "__main__":
    main()
