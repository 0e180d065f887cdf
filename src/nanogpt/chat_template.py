"""The chat template: how a conversation becomes tokens, and which of them the model learns.

GPT-2's vocabulary has one special token, ``<|endoftext|>``. Rather than grow the embedding with
role tokens (new rows that a pretrained model knows nothing about, and that every exporter and
outside tool must then learn), a conversation is plain text in which each turn ends with
``<|endoftext|>``::

    System: You are a helpful assistant.<|endoftext|>
    User: What is the capital of France?<|endoftext|>
    Assistant: Paris.<|endoftext|>

A turn is ``"{Role}: {content}"`` followed by ``<|endoftext|>``; roles are ``System``, ``User`` and
``Assistant``. A prompt for the next reply ends with ``"Assistant:"`` and generation stops at
``<|endoftext|>``. Only an assistant turn's content and its closing ``<|endoftext|>`` are learned
(mask 1); the role headers and every system or user token are not (mask 0). The exported model
stays a plain GPT-2, so Hugging Face, llama.cpp and the harness read it unchanged.
"""

from __future__ import annotations

from .errors import UserError

ROLES = ("system", "user", "assistant")
EOT_TEXT = "<|endoftext|>"


def header(role: str) -> str:
    """The text that opens a turn: ``"User:"`` and so on."""
    return role.capitalize() + ":"


def check_messages(messages, where: str = "the conversation") -> list[dict]:
    """``messages`` as a list of ``{"role", "content"}`` dicts, or a UserError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise UserError("%s has no messages; give a non-empty list of {\"role\", \"content\"} objects" % where)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError("%s: message %d is not an object with \"role\" and \"content\"" % (where, i))
        if m["role"] not in ROLES:
            raise UserError("%s: message %d has role %r; use one of %s" % (where, i, m["role"], ", ".join(ROLES)))
        if not isinstance(m["content"], str):
            raise UserError("%s: message %d has a content that is not a string" % (where, i))
        out.append({"role": m["role"], "content": m["content"]})
    return out


def segments(messages: list[dict], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """The conversation as ``(text, learned)`` pieces, in order. With ``add_generation_prompt`` an
    open ``"Assistant:"`` header ends it, ready for the model's reply."""
    out = []
    for m in check_messages(messages):
        learned = m["role"] == "assistant"
        out.append((header(m["role"]), False))
        out.append((" " + m["content"] + EOT_TEXT, learned))
    if add_generation_prompt:
        out.append((header("assistant"), False))
    return out


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as one string (``<|endoftext|>`` written out as text)."""
    return "".join(text for text, _ in segments(messages, add_generation_prompt))


def encode(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and a same-length 0/1 mask (1 = learned) for a conversation. ``tokenizer.encode``
    must turn the text ``<|endoftext|>`` into its special token, as our BPE tokenizer does."""
    ids: list[int] = []
    mask: list[int] = []
    for text, learned in segments(messages, add_generation_prompt):
        piece = tokenizer.encode(text)
        ids.extend(piece)
        mask.extend([int(learned)] * len(piece))
    return ids, mask


def prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """The tokens of a conversation followed by an open assistant header: what generation starts from."""
    return encode(messages, tokenizer, add_generation_prompt=True)[0]
