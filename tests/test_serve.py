"""nanogpt serve, called as an OpenAI client calls it (the official ``openai`` package), and the
batching engine and streamed text underneath it."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import ROOT, sample

PROMPTS = ["Hello, my name is", "To be, or not to be", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "O", "ROMEO: But, soft! what light through yonder window breaks?", "1 2 3 4", "The end", "Once upon a time"]


def tiny_bpe_checkpoint(folder, block_size=64, seed=0):
    """A 2-layer GPT-2 BPE model, random but with peaked next-token distributions (greedy picks
    are unambiguous), saved as folder/ckpt.pt."""
    from nanogpt import checkpoint
    from nanogpt.model import GPT, GPTConfig
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=50257)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    os.makedirs(folder, exist_ok=True)
    checkpoint.save({"model": model.state_dict(), "model_args": dataclasses.asdict(cfg), "config": {}, "iter_num": 0},
                    os.path.join(folder, "ckpt.pt"))
    return model


class Running:
    """``nanogpt serve`` in a subprocess on a free loopback port; its log lines collected."""

    def __init__(self, out_dir, env, *args):
        cmd = [sys.executable, "-m", "nanogpt.cli", "serve", "--out_dir=%s" % out_dir, "--port=0", "--device=cpu",
               "--threads=1"] + list(args)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines, self.url = [], None
        started = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r"on (http://127\.0\.0\.1:\d+/v1)$", line.strip())
                if m:
                    self.url = m.group(1)
                    started.set()
            started.set()
        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        started.wait(120)
        assert self.url, "\n".join(self.lines)

    def client(self):
        import openai
        return openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        """Ctrl-C, as a person stops it: the server ends cleanly."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(20)
        self.reader.join(5)
        return code


@pytest.fixture(scope="module")
def served(tmp_path_factory, data_mirror):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    out = tmp_path_factory.mktemp("served") / "tiny"
    tiny_bpe_checkpoint(str(out))
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(data_mirror / "tiktoken-cache"), PYTHONUNBUFFERED="1")
    run = Running(out, env)
    run.out_dir = out
    yield run
    assert run.stop() == 0 and run.lines[-1] == "stopped", run.lines[-3:]


def post(url, body: bytes):
    """(status, JSON answer) of a raw POST: for bodies the openai client would never send."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_greedy_completion_equals_sample_py(served, data_mirror, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))
    c = served.client()
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 5
    [expected] = sample(["--out_dir=%s" % served.out_dir, "--device=cpu", "--start=%s" % PROMPTS[0], "--num_samples=1",
                         "--max_new_tokens=12", "--top_k=1", "--compile=False"])
    assert PROMPTS[0] + r.choices[0].text == expected


def test_streaming_gives_the_same_text(served):
    c = served.client()
    whole = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=0).choices[0].text
    chunks = list(c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=20, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole and len(chunks) > 5
    assert chunks[-1].choices[0].finish_reason == "length"

    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Who are you?"}]
    reply = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=15, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "length"
    text = reply.choices[0].message.content
    assert text and not text.startswith(" ")  # the space after "Assistant:" is the template's, not the reply's
    parts = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=15, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == text
    assert parts[0].choices[0].delta.role == "assistant" and parts[-1].usage.completion_tokens == 15


def test_eight_concurrent_requests_each_get_their_own_answer(served):
    c = served.client()
    asks = [dict(model="tiny", prompt=p, max_tokens=6 + 3 * i, temperature=0) for i, p in enumerate(PROMPTS)]
    alone = [c.completions.create(**a).choices[0].text for a in asks]
    before = len(served.lines)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda a: c.completions.create(**a).choices[0].text, asks))
    assert together == alone
    time.sleep(0.2)
    batches = [int(m.group(1)) for ln in served.lines[before:] for m in [re.search(r"in a batch of up to (\d+)", ln)] if m]
    assert len(batches) == 8 and max(batches) > 1, served.lines[before:]
    assert all(re.search(r"POST /v1/completions 200 in [\d.]+ s: \d+ prompt \+ \d+ completion tokens, [\d.]+ tokens/s", ln)
               for ln in served.lines[before:] if "batch" in ln)


def test_stop_n_and_seed(served):
    c = served.client()
    text = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=[stop, "\x00"])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == cut.choices[0].text
    a = c.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=10, n=3, seed=7, temperature=1.0, top_p=0.9)
    b = c.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=10, n=3, seed=7, temperature=1.0, top_p=0.9)
    assert [ch.index for ch in a.choices] == [0, 1, 2] and [ch.text for ch in a.choices] == [ch.text for ch in b.choices]
    assert len({ch.text for ch in a.choices}) > 1 and a.usage.completion_tokens == 30


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    import openai
    c = served.client()
    cases = [
        (openai.NotFoundError, dict(model="gpt-4o", prompt="x"), "model", "model_not_found"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", max_tokens=64), "max_tokens", "context_length_exceeded"),
        (openai.BadRequestError, dict(model="tiny", prompt="word " * 80, max_tokens=1), "prompt", "context_length_exceeded"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", temperature=3), "temperature", "invalid_value"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", top_p=0), "top_p", "invalid_value"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", n=0), "n", "invalid_value"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", max_tokens=-1), "max_tokens", "invalid_value"),
        (openai.BadRequestError, dict(model="tiny", prompt=[99999999]), "prompt", "invalid_value"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", logprobs=2), "logprobs", "unsupported_parameter"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", seed=2 ** 70), "seed", "invalid_value"),
        (openai.BadRequestError, dict(model="tiny", prompt="x", stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
    ]
    for err, kw, param, code in cases:
        with pytest.raises(err) as e:
            c.completions.create(**kw)
        body = e.value.response.json()["error"]
        assert 400 <= e.value.status_code < 500 and body["param"] == param and body["code"] == code, (kw, body)
        assert body["type"] == "invalid_request_error" and body["message"], body
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 80}])
    for raw in (b"{not json", b"[1, 2]", b'{"model": "tiny"}', b"\xff\xfe"):
        status, body = post(served.url + "/chat/completions", raw)
        assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}, (raw, body)
    status, body = post(served.url + "/embeddings", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"
    r = c.completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)  # still serving
    assert r.usage.completion_tokens == 3 and served.proc.poll() is None
    assert any(" 400 in " in ln and "context_length_exceeded" in ln for ln in served.lines)


def test_a_client_that_leaves_mid_stream_frees_its_row(served):
    c = served.client()
    stream = c.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=40, temperature=0, stream=True)
    next(iter(stream))
    stream.close()
    r = c.completions.create(model="tiny", prompt=PROMPTS[4], max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    deadline = time.time() + 20
    while not any("cancelled by the client" in ln for ln in served.lines) and time.time() < deadline:
        time.sleep(0.1)
    assert any("cancelled by the client" in ln for ln in served.lines), served.lines[-3:]


def test_a_missing_server_library_is_one_line(monkeypatch, capsys, tmp_path):
    import nanogpt.serve
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(SystemExit) as e:
        nanogpt.serve.main(["--out_dir=%s" % tmp_path, "--device=cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and "\n" not in err and "pip install 'nanogpt[serve]'" in err


# ------------------------------------------------------------------------------------------
# underneath: the engine and the text stream


@pytest.fixture(scope="module")
def bpe(data_mirror):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))
    from nanogpt.tokenizer import vocabulary_for
    return vocabulary_for({}, "data", 50257)


def test_text_streams_whole_characters_and_holds_back_stop_strings(bpe):
    from nanogpt.engine import TextStream
    tok = bpe.tokenizer
    text = "Tōkyō 東京 🙂 done"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # some characters span several tokens
    s = TextStream(tok)
    pieces = [s.push(t) for t in ids] + [s.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    s = TextStream(tok, stop=["京 🙂"])
    out = "".join(s.push(t) for t in ids) + s.finish()
    assert out == "Tōkyō 東" and s.stopped
    s = TextStream(tok, stop=["Tōk"])
    assert s.push(ids[0]) == "" and "".join(s.push(t) for t in ids[1:]) + s.finish() == ""


def test_rows_in_a_batch_do_not_change_each_others_tokens(bpe):
    """Each sequence of a batch, joining and leaving at different steps, equals generate() alone,
    with learned positions and with RoPE."""
    from nanogpt.engine import Engine, Params
    from nanogpt.generate import generate
    from nanogpt.model import GPT, GPTConfig
    tok = bpe.tokenizer
    for rope in (False, True):
        torch.manual_seed(1)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_size=50257, rope=rope)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        engine = Engine(model, bpe, max_batch=3)
        seqs = [engine.add(tok.encode(p), Params(max_tokens=4 + 2 * i, temperature=0, stop_at_eot=False))
                for i, p in enumerate(PROMPTS[:6])]
        while engine.busy():
            engine.step()
        assert engine.row_steps > engine.steps  # batched
        sampled = Params(max_tokens=12, temperature=1.0, top_k=50, seed=11)
        alone = engine.add(tok.encode(PROMPTS[0]), sampled)
        while engine.busy():
            engine.step()
        crowd = [engine.add(tok.encode(p), Params(max_tokens=8, temperature=0.9, seed=i)) for i, p in enumerate(PROMPTS[1:3])]
        again = engine.add(tok.encode(PROMPTS[0]), sampled)
        while engine.busy():
            engine.step()
        assert again.tokens == alone.tokens and all(s.finish_reason for s in crowd)  # a seed's draws are its own
        for s in seqs:
            ref = generate(model, torch.tensor([s.prompt]), s.params.max_tokens, temperature=0)[0, len(s.prompt):].tolist()
            assert s.tokens == ref and s.text == tok.decode(ref) and s.finish_reason == "length"
