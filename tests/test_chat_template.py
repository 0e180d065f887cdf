"""The chat template: text, mask, and agreement with encoding the whole string at once."""

import pytest

from nanogpt import chat_template
from nanogpt.errors import UserError
from nanogpt.tokenizer import BPETokenizer

CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}]


def test_render_and_mask():
    text = chat_template.render(CONV)
    assert text == ("System: Be brief.<|endoftext|>User: What is the capital of France?<|endoftext|>"
                    "Assistant: Paris.<|endoftext|>")
    tok = BPETokenizer()
    ids, mask = chat_template.encode(CONV, tok)
    assert ids == tok.encode(text)  # piecewise encoding equals encoding the whole text
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(learned) == " Paris.<|endoftext|>"
    prompt = chat_template.prompt_ids(CONV[:2], tok)
    assert tok.decode(prompt).endswith("<|endoftext|>Assistant:")


@pytest.mark.parametrize("bad", [[], [{"role": "bot", "content": "x"}], [{"role": "user"}], "hi",
                                 [{"role": "user", "content": 3}]])
def test_bad_messages(bad):
    with pytest.raises(UserError):
        chat_template.check_messages(bad)
