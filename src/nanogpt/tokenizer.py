"""Tokenizers: the character table of a char-level dataset, or GPT-2 BPE through tiktoken."""

from __future__ import annotations

import os


def get_gpt2_encoding(mirror: str | None = None):
    """tiktoken's GPT-2 encoding. Offline, its files come from TIKTOKEN_CACHE_DIR, or from
    <mirror>/tiktoken-cache when a data mirror is named (argument or NANOGPT_DATA_MIRROR)."""
    import tiktoken
    mirror = mirror or os.environ.get("NANOGPT_DATA_MIRROR")
    if not os.environ.get("TIKTOKEN_CACHE_DIR") and mirror and os.path.isdir(os.path.join(mirror, "tiktoken-cache")):
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(mirror, "tiktoken-cache")
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        from .config import UserError
        raise UserError("cannot load the GPT-2 BPE files (%s); offline, set TIKTOKEN_CACHE_DIR or NANOGPT_DATA_MIRROR"
                        % (str(e).splitlines()[0][:160] if str(e) else type(e).__name__)) from None


class CharTokenizer:
    def __init__(self, meta: dict):
        self.stoi = meta["stoi"]
        self.itos = {int(k): v for k, v in meta["itos"].items()}

    def encode(self, text: str) -> list[int]:
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.itos.get(i, "") for i in ids)


class GPT2Tokenizer:
    def __init__(self):
        self.enc = get_gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special={"<|endoftext|>"})

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))


def load_tokenizer(meta: dict | None):
    """The dataset's character table when it has one, else GPT-2 BPE."""
    if meta and "stoi" in meta:
        return CharTokenizer(meta)
    return GPT2Tokenizer()
