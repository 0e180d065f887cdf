"""Tokenizers, and the one answer to "which vocabulary does this model read?".

A character-level dataset's meta.json holds its table (``CharTokenizer``); other datasets name a
tiktoken encoding (``BPETokenizer``, GPT-2's by default). A checkpoint records its dataset, so
:func:`vocabulary_for` finds that dataset's meta.json (under ``--data_root``, then under the
data_root the run was trained with) and picks the tokenizer; sample, eval and export all ask it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import TokenizerError, UserError, first_line

EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB = 50257  # GPT-2 BPE: 50,256 merges-derived tokens plus <|endoftext|>
# GPT-2's BPE files; Hugging Face calls them vocab.json and merges.txt
BPE_FILES = (
    ("vocab.json", "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783", "gpt2-bpe/encoder.json"),
    ("merges.txt", "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
     "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", "gpt2-bpe/vocab.bpe"),
)


def _use_mirror_cache(mirror: str | None) -> None:
    """Point tiktoken at ``<mirror>/tiktoken-cache`` when no cache folder is chosen yet."""
    mirror = mirror or os.environ.get("NANOGPT_DATA_MIRROR")
    if os.environ.get("TIKTOKEN_CACHE_DIR") or not mirror:
        return
    cache = os.path.join(mirror, "tiktoken-cache")
    if os.path.isdir(cache):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(cache)


def get_encoding(name: str = "gpt2", mirror: str | None = None):
    """A tiktoken encoding by name. Its files come from TIKTOKEN_CACHE_DIR when set, else from
    ``<mirror>/tiktoken-cache`` when a data mirror is named (argument or NANOGPT_DATA_MIRROR),
    else from tiktoken's own cache or a download."""
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError("BPE tokenization needs tiktoken: pip install tiktoken") from None
    _use_mirror_cache(mirror)
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # tiktoken raises ValueError, OSError or requests errors
        raise TokenizerError("cannot load the %s BPE files (%s); offline, set TIKTOKEN_CACHE_DIR or "
                             "NANOGPT_DATA_MIRROR to a folder that has them" % (name, first_line(e, 160))) from None


def get_gpt2_encoding(mirror: str | None = None):
    """tiktoken's GPT-2 encoding (50,257 tokens, ``<|endoftext|>`` = 50256); see :func:`get_encoding`."""
    return get_encoding("gpt2", mirror)


class CharTokenizer:
    """One token per character, from a meta dict with ``stoi`` (char -> id) and ``itos`` (id -> char;
    keys may be ints or, as read from JSON, strings)."""

    def __init__(self, meta: dict):
        self.stoi = dict(meta["stoi"])
        self.itos = {int(k): v for k, v in meta["itos"].items()}
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - set(self.stoi))
            shown = ", ".join(repr(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise TokenizerError("text has %d character(s) outside the dataset's %d-character vocabulary: %s"
                                 % (len(missing), len(self.stoi), shown)) from None

    def decode(self, ids) -> str:
        itos = self.itos
        return "".join(itos.get(int(i), "") for i in ids)


class BPETokenizer:
    """A tiktoken encoding; ``encode`` turns the text ``<|endoftext|>`` into its special token."""

    def __init__(self, name: str = "gpt2", mirror: str | None = None):
        self.enc = get_encoding(name, mirror)
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={EOT_TEXT})

    def encode_ordinary(self, text: str) -> list[int]:
        """The ids of ``text`` with special-token text encoded as plain text."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def meta(self) -> dict:
        """What a dataset's meta.json records so that :func:`load_tokenizer` rebuilds this."""
        return {"tokenizer": self.enc.name, "vocab_size": self.vocab_size, "eot_token": self.eot_token}


def corpus_tokenizer(spec: str, texts=None, mirror: str | None = None):
    """The tokenizer ``prepare corpus --tokenizer=SPEC`` encodes with: 'gpt2' (GPT-2 BPE).
    ``texts`` (the corpus, as an iterable of strings) is for tokenizers built from the corpus."""
    if spec != "gpt2":
        raise TokenizerError("--tokenizer=%s: this version prepares corpora with --tokenizer=gpt2 only" % spec)
    return BPETokenizer("gpt2", mirror)


def load_tokenizer(meta: dict | None):
    """The dataset's character table when its meta has one, else the BPE encoding its meta names
    (``"tokenizer"``), else GPT-2 BPE."""
    if meta and "stoi" in meta:
        return CharTokenizer(meta)
    name = (meta or {}).get("tokenizer") or "gpt2"
    return BPETokenizer(name if name != "char" else "gpt2")


# --------------------------------------------------------------------------------------------
# which vocabulary a model reads


def find_meta(train_config: dict | None, data_root: str) -> dict | None:
    """The meta dict of the dataset a run was trained on: looked up under ``data_root`` first,
    then under the data_root the run was trained with (a folder without meta.json, such as a
    fresh clone's data/shakespeare_char, is passed over)."""
    from .data import load_meta
    dataset = (train_config or {}).get("dataset")
    if not dataset:
        return None
    for root in (data_root, (train_config or {}).get("data_root")):
        folder = os.path.join(root, dataset) if root else ""
        meta = load_meta(folder) if folder and os.path.isdir(folder) else None
        if meta is not None:
            return meta
    return None


def vocabulary_kind(meta: dict | None, vocab_size: int) -> str:
    """'char' (a character table), 'gpt2' (GPT-2 BPE), or 'unknown'.

    Without a meta.json (GPT-2 weights, or a dataset folder that is not at hand) the vocabulary
    is GPT-2's when the model holds at least its 50,257 ids, as training and sampling assume."""
    if meta and "stoi" in meta and "itos" in meta:
        return "char"
    if vocab_size < GPT2_VOCAB:
        return "unknown"
    if meta:
        ok = (meta.get("tokenizer") or "gpt2") == "gpt2" and meta.get("vocab_size", GPT2_VOCAB) == GPT2_VOCAB
        return "gpt2" if ok else "unknown"
    return "gpt2"


@dataclass
class Vocabulary:
    """What a model reads: its tokenizer, the dataset's meta (None for GPT-2 weights), its kind
    ('char', 'gpt2' or 'unknown') and how many leading logits are real tokens (None: all)."""

    tokenizer: object
    meta: dict | None
    kind: str
    limit: int | None
    dataset: str | None = None

    @property
    def name(self) -> str:
        if self.kind == "char":
            return "characters of %s" % (self.dataset or "the dataset")
        return "BPE %s" % ((self.meta or {}).get("tokenizer") or "gpt2")


def vocabulary_for(train_config: dict | None, data_root: str, model_vocab: int) -> Vocabulary:
    """The vocabulary of a model trained with ``train_config`` (None for GPT-2 weights). A model
    with fewer entries than GPT-2 BPE cannot use it: without its meta.json that is an error
    naming --data_root, raised before BPE files are looked for."""
    meta = find_meta(train_config, data_root)
    if meta is None and model_vocab < GPT2_VOCAB:
        dataset = (train_config or {}).get("dataset") or "the dataset"
        raise UserError("the model has %d vocabulary entries, too few for GPT-2 BPE, and the meta.json of %s was not "
                        "found; pass --data_root=FOLDER holding %s/" % (model_vocab, dataset, dataset))
    tok = load_tokenizer(meta)
    if tok.vocab_size > model_vocab:
        raise UserError("the model has %d vocabulary entries, fewer than the %d of its tokenizer; pass --data_root=FOLDER "
                        "holding the training dataset's meta.json" % (model_vocab, tok.vocab_size))
    limit = tok.vocab_size if tok.vocab_size < model_vocab else None
    return Vocabulary(tok, meta, vocabulary_kind(meta, model_vocab), limit, (train_config or {}).get("dataset"))


# --------------------------------------------------------------------------------------------
# tokenizer files for a Hugging Face folder


def write_hf_tokenizer(folder: str, vocab: Vocabulary, block_size: int, mirror: str | None = None) -> list[str]:
    """Tokenizer files beside an exported model: GPT-2's vocab.json / merges.txt (checked by
    sha256; from the data mirror when one is set) with the two small files GPT2Tokenizer reads,
    or ``vocab_chars.json`` for a character table. Returns the names written."""
    from .download import fetch
    from .errors import ExportError, PrepareError
    from .hf import write_json
    if vocab.kind == "char":
        itos = vocab.meta["itos"]
        table = [itos.get(i, "") for i in range(max(itos) + 1)]
        write_json(os.path.join(folder, "vocab_chars.json"), {"vocab_size": len(table), "itos": table,
                                                               "stoi": {c: i for i, c in enumerate(table) if c}})
        return ["vocab_chars.json"]
    if vocab.kind != "gpt2":
        return []
    for name, url, sha, mirror_path in BPE_FILES:
        try:
            fetch(url, os.path.join(folder, name), sha, mirror_path, mirror)
        except PrepareError as e:
            raise ExportError("%s; or pass --tokenizer=False to export the model alone" % e) from None
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tok_config = dict(special, tokenizer_class="GPT2Tokenizer", model_max_length=block_size, add_prefix_space=False,
                      add_bos_token=False, errors="replace", clean_up_tokenization_spaces=False)
    write_json(os.path.join(folder, "tokenizer_config.json"), tok_config)
    write_json(os.path.join(folder, "special_tokens_map.json"), special)
    return [name for name, *_ in BPE_FILES] + ["tokenizer_config.json", "special_tokens_map.json"]
