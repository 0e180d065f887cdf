"""Tokenizers: the character table of a char-level dataset, or a BPE encoding through tiktoken.

Both kinds have ``encode(str) -> list[int]`` and ``decode(ids) -> str``; :func:`load_tokenizer`
picks one from a dataset's meta dict (see :func:`nanogpt.prepare.load_meta`).
"""

from __future__ import annotations

import os

from .config import UserError

EOT_TEXT = "<|endoftext|>"


class TokenizerError(UserError, ValueError):
    """The tokenizer files cannot be loaded, or text does not fit the vocabulary; one line."""


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
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TokenizerError("cannot load the %s BPE files (%s); offline, set TIKTOKEN_CACHE_DIR or "
                             "NANOGPT_DATA_MIRROR to a folder that has them" % (name, first)) from None


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

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])


def load_tokenizer(meta: dict | None):
    """The dataset's character table when its meta has one, else the BPE encoding its meta names
    (``"tokenizer"``), else GPT-2 BPE."""
    if meta and "stoi" in meta:
        return CharTokenizer(meta)
    name = (meta or {}).get("tokenizer") or "gpt2"
    return BPETokenizer(name if name != "char" else "gpt2")
