"""Tokenizers, and the one answer to "which vocabulary does this model read?".

Three kinds, all rebuilt from a dataset's meta.json by :func:`load_tokenizer`:

- ``char`` (``CharTokenizer``): one token per character; the meta holds the ``stoi`` / ``itos``
  tables (and, for ``prepare corpus --tokenizer=char``, an ``<|endoftext|>`` entry after them);
- ``gpt2`` (``BPETokenizer``): a tiktoken encoding, named by the meta's ``tokenizer``;
- ``bpe`` (``ByteBPETokenizer``): a byte-level BPE trained by ``nanogpt prepare tokenizer``
  (see bpe.py); the meta holds its whole ``tokenizer.json`` (``tokenizer_json``), so a dataset
  folder never depends on the tokenizer folder it was prepared with.

:func:`corpus_tokenizer` turns ``prepare corpus --tokenizer=gpt2|char|DIR`` into one of them;
its ``meta()`` is what goes into the dataset's meta.json. A checkpoint records its dataset, so
:func:`vocabulary_for` finds that dataset's meta.json (under ``--data_root``, then under the
data_root the run was trained with) and picks the tokenizer; sample, eval and export all ask it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from .errors import TokenizerError, UserError, first_line

EOT_TEXT = "<|endoftext|>"
GPT2_VOCAB = 50257  # GPT-2 BPE: 50,256 merges-derived tokens plus <|endoftext|>
TRAINED_BPE = "bpe"  # meta["tokenizer"] of a dataset encoded with a trained byte-level BPE
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
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
    keys may be ints or, as read from JSON, strings). A table built for ``prepare corpus`` also has
    an ``<|endoftext|>`` entry (``eot_token`` in the meta), which ``encode`` makes of that text."""

    def __init__(self, meta: dict):
        self.stoi = dict(meta["stoi"])
        self.itos = {int(k): v for k, v in meta["itos"].items()}
        self.vocab_size = len(self.itos)
        eot = meta.get("eot_token")
        self.eot_token = int(eot) if eot is not None and self.itos.get(int(eot)) == EOT_TEXT else None

    @classmethod
    def build(cls, texts) -> "CharTokenizer":
        """The sorted distinct characters of every text in ``texts`` (read once), then ``<|endoftext|>``."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise TokenizerError("the corpus holds no text, so there are no characters to build a vocabulary from; "
                                 "check --source and --text_field")
        chars = sorted(seen) + [EOT_TEXT]
        return cls({"stoi": {c: i for i, c in enumerate(chars)}, "itos": dict(enumerate(chars)), "eot_token": len(chars) - 1})

    def encode_ordinary(self, text: str) -> list[int]:
        """Every character is a token (the text ``<|endoftext|>`` is 13 of them)."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            missing = sorted(set(text) - set(self.stoi))
            shown = ", ".join(repr(c) for c in missing[:10]) + (", ..." if len(missing) > 10 else "")
            raise TokenizerError("text has %d character(s) outside the dataset's %d-character vocabulary: %s"
                                 % (len(missing), len(self.stoi), shown)) from None

    def encode(self, text: str) -> list[int]:
        if self.eot_token is None or EOT_TEXT not in text:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(EOT_TEXT)):
            if i:
                ids.append(self.eot_token)
            ids.extend(self.encode_ordinary(part))
        return ids

    def encode_ordinary_batch(self, texts) -> list[list[int]]:
        return [self.encode_ordinary(t) for t in texts]

    def decode(self, ids) -> str:
        itos = self.itos
        return "".join(itos.get(int(i), "") for i in ids)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    @property
    def special_ids(self) -> frozenset:
        return frozenset() if self.eot_token is None else frozenset((self.eot_token,))

    def meta(self) -> dict:
        chars = [self.itos[i] for i in range(self.vocab_size)]
        out = {"tokenizer": "char", "vocab_size": self.vocab_size, "eot_token": self.eot_token,
               "stoi": {c: i for i, c in enumerate(chars)}, "itos": {str(i): c for i, c in enumerate(chars)}}
        if self.eot_token is None:
            del out["eot_token"]
        return out


class BPETokenizer:
    """A tiktoken encoding; ``encode`` turns the text ``<|endoftext|>`` into its special token."""

    def __init__(self, name: str = "gpt2", mirror: str | None = None):
        self.name = name
        self.enc = get_encoding(name, mirror)
        self.vocab_size = self.enc.n_vocab
        self.eot_token = self.enc.eot_token
        self.special_ids = frozenset(self.enc.encode_single_token(t) for t in self.enc.special_tokens_set)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_ordinary_batch(self, texts) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts))

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={EOT_TEXT})

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def decode_bytes(self, ids) -> bytes:
        return self.enc.decode_bytes([int(i) for i in ids])

    def meta(self) -> dict:
        return {"tokenizer": self.name, "vocab_size": self.vocab_size, "eot_token": self.eot_token}


def _byte_symbols() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins: the character each byte is written as in a
    ``tokenizer.json`` vocabulary, mapped back to the byte. Bytes that print as themselves
    (``!`` .. ``~``, ``\xa1`` .. ``\xac``, ``\xae`` .. ``\xff``) keep their code point; the other 68
    take code points 256, 257, ... in byte order."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(part: dict | None) -> bool:
    if not part:
        return False
    if part.get("type") == "ByteLevel":
        return True
    return part.get("type") == "Sequence" and any(
        _is_byte_level(p) for p in part.get("pretokenizers", part.get("decoders", [])) or [])


def _tokenizers_module():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("a trained BPE tokenizer needs the tokenizers package: pip install tokenizers "
                             "(or pip install 'nanogpt[tokenizer]')") from None
    return tokenizers


class ByteBPETokenizer:
    """A byte-level BPE held as a Hugging Face ``tokenizer.json`` (what ``nanogpt prepare tokenizer``
    writes; GPT-2's own ``tokenizer.json`` loads too). Encoding and decoding go through the
    ``tokenizers`` library, so a transformers tokenizer built from the same file gives the same ids;
    ``decode_bytes`` maps ids straight to their bytes, exact even where a character spans two tokens."""

    def __init__(self, tokenizer_json: str, where: str = "tokenizer.json"):
        tokenizers = _tokenizers_module()
        try:
            spec = json.loads(tokenizer_json)
            tok = tokenizers.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # json and the Rust parser both raise their own kinds
            raise TokenizerError("%s is not a readable tokenizer.json (%s); train it again with nanogpt prepare tokenizer"
                                 % (where, first_line(e, 120))) from None
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not _is_byte_level(spec.get("pre_tokenizer")) or not _is_byte_level(spec.get("decoder")):
            raise TokenizerError("%s is not a byte-level BPE tokenizer (model %s); use one written by nanogpt prepare tokenizer"
                                 % (where, model.get("type")))
        self.json = tokenizer_json
        self.sha256 = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eot_token = tok.token_to_id(EOT_TEXT)
        if self.eot_token is None:
            raise TokenizerError("%s has no %s token; train it again with nanogpt prepare tokenizer" % (where, EOT_TEXT))
        added = tok.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.special_ids = frozenset(self.special_tokens.values())
        symbols = _byte_symbols()
        table: list[bytes] = [b""] * self.vocab_size
        for token, i in tok.get_vocab(with_added_tokens=True).items():
            if i in added:
                table[i] = added[i].content.encode("utf-8")
            elif i < self.vocab_size:
                try:
                    table[i] = bytes(symbols[c] for c in token)
                except KeyError:
                    raise TokenizerError("%s: token %d (%r) is not byte-level; use a tokenizer written by nanogpt prepare "
                                         "tokenizer" % (where, i, token)) from None
        self.table = table
        plain = tokenizers.Tokenizer.from_str(tokenizer_json)
        plain.no_truncation()
        plain.no_padding()
        plain.encode_special_tokens = True  # special tokens' text is split like any other text
        self.plain = plain

    @classmethod
    def from_folder(cls, folder: str) -> "ByteBPETokenizer":
        """The ``tokenizer.json`` of ``folder``; a missing or unreadable one is a one-line error."""
        if not os.path.isdir(folder):
            raise TokenizerError("tokenizer folder %s does not exist; train one with nanogpt prepare tokenizer "
                                 "--source=TEXT --vocab_size=N --out=%s, or pass gpt2 or char" % (folder, folder))
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError("%s has no tokenizer.json; train one with nanogpt prepare tokenizer --out=%s" % (folder, folder))
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError("cannot read %s (%s); train it again with nanogpt prepare tokenizer" % (path, first_line(e, 120))) from None
        return cls(text, path)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts) -> list[list[int]]:
        return [e.ids for e in self.plain.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """Special tokens written in the text (``<|endoftext|>`` and the others trained in) become their ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids) -> bytes:
        table = self.table
        return b"".join(table[int(i)] for i in ids)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def meta(self) -> dict:
        return {"tokenizer": TRAINED_BPE, "vocab_size": self.vocab_size, "eot_token": self.eot_token,
                "special_tokens": self.special_tokens, "tokenizer_sha256": self.sha256, "tokenizer_json": self.json}


def corpus_tokenizer(spec: str, texts=None, mirror: str | None = None):
    """The tokenizer ``prepare corpus --tokenizer=SPEC`` encodes with: ``'gpt2'`` (tiktoken's GPT-2
    BPE), ``'char'`` (one token per character of the corpus, plus ``<|endoftext|>``; ``texts()``
    must return an iterable over the corpus's documents, read once to collect the characters) or
    a folder written by ``nanogpt prepare tokenizer``. Its ``meta()`` goes into the dataset's
    meta.json, from which :func:`load_tokenizer` rebuilds the same tokenizer."""
    if spec == "gpt2":
        return BPETokenizer("gpt2", mirror)
    if spec == "char":
        if texts is None:
            raise TypeError("corpus_tokenizer('char') needs texts: a callable returning the documents")
        return CharTokenizer.build(texts())
    if not spec:
        raise TokenizerError("tokenizer must be gpt2, char or a folder written by nanogpt prepare tokenizer; got ''")
    return ByteBPETokenizer.from_folder(spec)


def load_tokenizer(meta: dict | None):
    """The dataset's trained BPE (``tokenizer_json``) or character table when its meta has one,
    else the tiktoken encoding its meta names (``"tokenizer"``), else GPT-2 BPE."""
    if meta and meta.get("tokenizer_json") is not None:
        if not isinstance(meta["tokenizer_json"], str):
            raise TokenizerError("the dataset's meta.json has a tokenizer_json that is not a string; prepare the dataset again")
        return ByteBPETokenizer(meta["tokenizer_json"], "the dataset's tokenizer_json")
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
    """'char' (a character table), 'bpe' (a trained byte-level BPE), 'gpt2' (GPT-2 BPE), or 'unknown'.

    Without a meta.json (GPT-2 weights, or a dataset folder that is not at hand) the vocabulary
    is GPT-2's when the model holds at least its 50,257 ids, as training and sampling assume."""
    if meta and "stoi" in meta and "itos" in meta:
        return "char"
    if meta and meta.get("tokenizer_json") is not None:
        return "bpe" if vocab_size >= meta.get("vocab_size", 0) else "unknown"
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
        if self.kind == "bpe":
            return "trained BPE of %s (%d tokens)" % (self.dataset or "the dataset", self.meta["vocab_size"])
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


def hf_tokenizer_files(tokenizer_json: str, block_size: int | None = None) -> dict[str, dict | str]:
    """The files that make a folder loadable by ``transformers.AutoTokenizer.from_pretrained``:
    the ``tokenizer.json`` itself, and a ``tokenizer_config.json`` / ``special_tokens_map.json``
    naming ``<|endoftext|>`` as GPT-2 does (beginning, end and unknown token) and the other
    special tokens. Text comes back from ``decode`` exactly as written (no clean-up of spaces)."""
    spec = json.loads(tokenizer_json)
    specials = [t["content"] for t in spec.get("added_tokens", []) if t.get("special")]
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    others = [t for t in specials if t != EOT_TEXT]
    if others:
        special["additional_special_tokens"] = others
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    if block_size:
        config["model_max_length"] = block_size
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": config, "special_tokens_map.json": special}


def write_tokenizer_folder(folder: str, tokenizer_json: str, block_size: int | None = None) -> list[str]:
    """Write :func:`hf_tokenizer_files` into ``folder`` (each file through a temporary name and a
    rename); returns the names written."""
    files = hf_tokenizer_files(tokenizer_json, block_size)
    for name, content in files.items():
        tmp = os.path.join(folder, name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n")
            os.replace(tmp, os.path.join(folder, name))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return list(files)


def write_hf_tokenizer(folder: str, vocab: Vocabulary, block_size: int, mirror: str | None = None) -> list[str]:
    """Tokenizer files beside an exported model: GPT-2's vocab.json / merges.txt (checked by
    sha256; from the data mirror when one is set) with the two small files GPT2Tokenizer reads,
    a trained BPE's tokenizer.json with its config (see :func:`hf_tokenizer_files`), or
    ``vocab_chars.json`` for a character table. Returns the names written."""
    from .download import fetch
    from .errors import ExportError, PrepareError
    from .hf import write_json
    if vocab.kind == "char":
        itos = {int(k): v for k, v in vocab.meta["itos"].items()}
        table = [itos.get(i, "") for i in range(max(itos) + 1)]
        write_json(os.path.join(folder, "vocab_chars.json"), {"vocab_size": len(table), "itos": table,
                                                               "stoi": {c: i for i, c in enumerate(table) if c}})
        return ["vocab_chars.json"]
    if vocab.kind == "bpe":
        return write_tokenizer_folder(folder, vocab.meta["tokenizer_json"], block_size)
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
