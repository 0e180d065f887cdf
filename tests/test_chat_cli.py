"""nanogpt chat, driven through a pseudo-terminal as a person types into it."""

import io
import os
import sys

import pytest
import torch

from helpers import ROOT
from test_serve import tiny_bpe_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_mirror):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))
    out = tmp_path_factory.mktemp("chat") / "tiny"
    model = tiny_bpe_checkpoint(str(out), seed=3).eval()
    from nanogpt.tokenizer import vocabulary_for
    return out, model, vocabulary_for({}, "data", 50257).tokenizer


def greedy_reply(model, tok, messages, max_new):
    """The reply as the chat template and generate() give it: up to <|endoftext|>, less the space
    that follows "Assistant:"."""
    from nanogpt.chat_template import prompt_ids
    from nanogpt.generate import generate
    ids = prompt_ids(messages, tok)
    new = generate(model, torch.tensor([ids]), max_new, temperature=0)[0, len(ids):].tolist()
    if tok.eot_token in new:
        new = new[:new.index(tok.eot_token)]
    text = tok.decode(new)
    return text[1:] if text.startswith(" ") else text


def test_chat_in_a_terminal(tiny):
    pexpect = pytest.importorskip("pexpect")
    out, model, tok = tiny
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, ["-m", "nanogpt.cli", "chat", "--out_dir=%s" % out, "--device=cpu", "--threads=1",
                                           "--temperature=0", "--max_new_tokens=10"],
                          cwd=ROOT, env=env, encoding="utf-8", timeout=90)

    def ask(line):
        child.sendline(line)
        child.expect_exact("Assistant: ")
        child.expect_exact("\r\nUser: ")
        return child.before.replace("\r\n", "\n")

    try:
        child.expect_exact("User: ")
        first = ask("Hello there")
        assert first == greedy_reply(model, tok, [{"role": "user", "content": "Hello there"}], 10)
        second = ask("And then?")
        assert second == greedy_reply(model, tok, [{"role": "user", "content": "Hello there"},
                                                   {"role": "assistant", "content": first},
                                                   {"role": "user", "content": "And then?"}], 10)
        child.sendline("/temp 0.7")
        child.expect_exact("(temperature 0.7)")
        child.sendline("/temp hot")
        child.expect_exact("/temp takes a number")
        child.sendline("/temp 0")
        child.expect_exact("(temperature 0, greedy)")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        assert ask("Hello there") == first  # the history is gone
        child.sendline("word " * 25)  # ~26 tokens each: the context of 64 cannot hold two with their replies
        child.expect_exact("User: ")
        child.sendline("more " * 25)
        child.expect(r"\(dropped the \d+ oldest messages to fit the context of 64 tokens\)")
        child.expect_exact("User: ")
        child.sendline("word " * 70)
        child.expect_exact("too long for the model's context of 64 tokens")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_history_drops_whole_exchanges_and_keeps_the_system_message(tiny):
    from nanogpt.chat import fit_history
    from nanogpt.chat_template import prompt_ids
    _, _, tok = tiny
    system = [{"role": "system", "content": "Be brief."}]
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": "question %d " % i + "x " * 8}, {"role": "assistant", "content": "answer %d" % i}]
    turns.append({"role": "user", "content": "last one"})
    ids, kept, budget = fit_history(system, turns, tok, 64, 16)
    assert kept[0]["role"] == "user" and kept[-1]["content"] == "last one" and 1 < len(kept) < len(turns)
    assert ids == prompt_ids(system + kept, tok) and len(ids) + budget <= 64 and budget == 16
    ids, kept, budget = fit_history(system, [{"role": "user", "content": "y " * 50}], tok, 64, 16)
    assert 0 < budget < 16 and len(ids) + budget == 64  # one long message: a shorter reply
    assert fit_history(system, [{"role": "user", "content": "y " * 80}], tok, 64, 16)[0] is None


def test_replies_stream_as_they_are_generated(tiny):
    from nanogpt.chat import Chat, ChatConfig
    _, model, tok = tiny
    from nanogpt.tokenizer import vocabulary_for

    class Recorder(io.StringIO):
        writes = 0

        def write(self, s):
            self.writes += 1
            return super().write(s)
    rec = Recorder()
    chat = Chat(model, vocabulary_for({}, "data", 50257), ChatConfig.parse(["--temperature=0", "--max_new_tokens=12"]), out=rec)
    text = chat.reply("Tell me something")
    assert rec.writes >= 8 and rec.getvalue() == "Assistant: " + text + "\n"
    assert chat.turns[-1] == {"role": "assistant", "content": text}


def test_a_character_model_cannot_chat(data_root, tmp_path, capsys):
    import dataclasses

    from nanogpt import checkpoint
    from nanogpt.chat import main
    from nanogpt.model import GPT, GPTConfig
    cfg = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=65)
    checkpoint.save({"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg), "iter_num": 0,
                     "config": {"dataset": "shakespeare_char", "data_root": str(data_root)}}, str(tmp_path / "ckpt.pt"))
    with pytest.raises(SystemExit) as e:
        main(["--out_dir=%s" % tmp_path, "--device=cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and "<|endoftext|>" in err, err
