"""Trained byte-level BPE tokenizers: `nanogpt prepare tokenizer`, `prepare corpus --tokenizer`,
and the way train, sample, eval and export read the tokenizer back from the dataset's meta.
transformers itself checks what is exported."""

import gzip
import json
import os

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from helpers import assert_one_line_error, export, run_main, sample, train  # noqa: E402
from nanogpt import scoring  # noqa: E402
from nanogpt.bpe import train_tokenizer  # noqa: E402
from nanogpt.data import Tokens, load_meta  # noqa: E402
from nanogpt.prepare import prepare_corpus  # noqa: E402
from nanogpt.tokenizer import EOT_TEXT, ByteBPETokenizer, corpus_tokenizer, load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = os.path.join(ROOT, "data", "shakespeare_char", "input.txt")
with open(INPUT, encoding="utf-8") as _f:
    SHAKESPEARE = _f.read()
TEXT = ("ROMEO: Wherefore art thou, Romeo?\n\n  It's 2 o'clock<|endoftext|> caf\u00e9 \u6771\u4eac \U0001f642!\t"
        "<|im_start|>user\nhi<|im_end|>   \n")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A 512-token BPE trained on the first 200 kB of tiny Shakespeare, with one extra special token."""
    out = tmp_path_factory.mktemp("tok") / "tok-512"
    summary = train_tokenizer(INPUT, 512, str(out), special_tokens="<|im_start|>,<|im_end|>", max_bytes=200_000, progress=False)
    assert summary["vocab_size"] == 512 and summary["bytes"] == 200_000
    return out


@pytest.fixture(scope="module")
def bpe_data(tok_dir, tmp_path_factory):
    """Tiny Shakespeare's first 60 kB as 40 documents, prepared with the trained tokenizer."""
    root = tmp_path_factory.mktemp("data")
    docs = [SHAKESPEARE[i * 1500:(i + 1) * 1500] for i in range(40)]
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    meta = prepare_corpus(str(root / "sh512"), str(src), tokenizer=str(tok_dir), num_proc=1, val_fraction=0.1)
    return root, docs, meta


def test_trained_tokenizer(tok_dir):
    tok = corpus_tokenizer(str(tok_dir))
    assert tok.vocab_size == 512 and tok.eot_token == 0
    assert tok.special_tokens == {EOT_TEXT: 0, "<|im_start|>": 1, "<|im_end|>": 2}
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and ids.count(0) == 1 and 1 in ids and 2 in ids
    plain = tok.encode_ordinary(TEXT)  # special tokens' text is just text here
    assert tok.decode(plain) == TEXT and not set(plain) & {0, 1, 2}
    assert tok.encode_ordinary_batch([TEXT, "ab"]) == [plain, tok.encode_ordinary("ab")]
    assert len(tok.encode_ordinary(SHAKESPEARE[:20000])) < 20000 / 1.8  # it learned something
    again = load_tokenizer(json.loads(json.dumps(tok.meta())))  # through meta.json and back
    assert again.encode(TEXT) == ids and again.encode_ordinary(TEXT) == plain and again.vocab_size == 512


def test_transformers_loads_the_folder_and_agrees(tok_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    ours = corpus_tokenizer(str(tok_dir))
    for text in (TEXT, SHAKESPEARE[:3000]):
        ids = ours.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == ours.decode(ids) == text
    assert hf.eos_token_id == hf.bos_token_id == 0 and len(hf) == 512


def test_bytes_are_exact_across_a_split_character(tok_dir):
    tok = corpus_tokenizer(str(tok_dir))
    ids = tok.encode_ordinary("a\U0001f642b")
    assert len(ids) > 3  # the emoji's four bytes are several tokens
    assert sum(scoring.utf8_len(tok, [i]) for i in ids) == scoring.utf8_len(tok, ids + [0, 1]) == 6


def test_sources_stream_to_the_same_tokenizer(tmp_path):
    docs = [SHAKESPEARE[i * 700:(i + 1) * 700] for i in range(30)]
    lines = "".join(json.dumps({"body": d}) + "\n" for d in docs)
    (tmp_path / "a.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    sources = [tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": docs, "n": list(range(30))}), tmp_path / "c.parquet", row_group_size=7)
        sources.append(tmp_path / "c.parquet")
    except ImportError:
        pass
    made = []
    for i, src in enumerate(sources):
        out = tmp_path / ("t%d" % i)
        s = train_tokenizer(str(src), 300, str(out), text_field="body", progress=False)
        assert s["documents"] == 30 and s["bytes"] == len("".join(docs).encode("utf-8"))
        made.append((out / "tokenizer.json").read_text(encoding="utf-8"))
    assert all(m == made[0] for m in made)


def split_ids(folder, split):
    """A split's tokens, one file or shards alike."""
    t = Tokens(str(folder), split, load_meta(str(folder)))
    return np.asarray(t[0:t.n])


def test_prepare_corpus_with_it(bpe_data, tok_dir):
    root, docs, meta = bpe_data
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 512 and meta["eot_token"] == 0 and meta["dtype"] == "uint16"
    on_disk = load_meta(str(root / "sh512"))
    tok = load_tokenizer(on_disk)
    assert tok.json == (tok_dir / "tokenizer.json").read_text(encoding="utf-8")  # the dataset carries its tokenizer
    texts = []
    for split in ("train", "val"):
        ids = split_ids(root / "sh512", split).tolist()
        assert ids.count(0) == meta["documents"][split] and ids[-1] == 0
        texts += tok.decode(ids).split(EOT_TEXT)[:-1]
    assert sorted(texts) == sorted(docs)


def test_prepare_corpus_char(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("abc", "ba\u00e9", "cab", "\u00e9\u00e9")), encoding="utf-8")
    meta = prepare_corpus(str(tmp_path / "c"), str(src), tokenizer="char", num_proc=1, val_fraction=0.25)
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == 5 and meta["eot_token"] == 4
    tok = load_tokenizer(load_meta(str(tmp_path / "c")))
    assert tok.encode("cab" + EOT_TEXT) == [2, 0, 1, 4] and tok.decode([3, 4]) == "\u00e9" + EOT_TEXT
    train_ids = split_ids(tmp_path / "c", "train").tolist()
    n_train = meta["documents"]["train"]
    assert n_train >= 1 and train_ids.count(4) == n_train and tok.decode(train_ids).count(EOT_TEXT) == n_train


def test_train_sample_eval_export(bpe_data, tmp_path, capsys):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from nanogpt.checkpoint import load_model
    from nanogpt.evaluate import EvalConfig, evaluate
    root, docs, meta = bpe_data
    out = tmp_path / "out"
    train(["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
           "--gradient_accumulation_steps=1", "--eval_iters=2", "--warmup_iters=1", "--dataset=sh512", "--data_root=%s" % root,
           "--out_dir=%s" % out, "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2"])
    model, _ = load_model(str(out / "ckpt.pt"))
    assert model.config.vocab_size == 512  # from the dataset's meta

    texts = sample(["--out_dir=%s" % out, "--device=cpu", "--num_samples=1", "--max_new_tokens=8", "--seed=1",
                    "--start=ROMEO:", "--data_root=%s" % root])
    assert texts[0].startswith("ROMEO:")

    r = evaluate(EvalConfig.parse(["--out_dir=%s" % out, "--device=cpu", "--data_root=%s" % root]))["perplexity"]
    val = split_ids(root / "sh512", "val")
    tok = load_tokenizer(meta)
    assert r["bytes"] == len(tok.decode(val[1:].tolist()).replace(EOT_TEXT, "").encode("utf-8"))  # bits per byte of the text
    assert r["bpb"] == pytest.approx(r["loss"] * r["tokens"] / np.log(2) / r["bytes"], rel=1e-6)

    hf_dir = tmp_path / "hf"
    export(["--out_dir=%s" % out, "--hf_dir=%s" % hf_dir, "--data_root=%s" % root])
    assert "AutoTokenizer" in capsys.readouterr().out
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok.encode(TEXT)
    assert hf_tok.encode(TEXT) == ids and hf_tok.decode(ids) == TEXT and hf_tok.model_max_length == 32
    hf_model = GPT2LMHeadModel.from_pretrained(str(hf_dir)).eval()
    assert hf_model.config.eos_token_id == 0
    x = torch.tensor([ids[:32]])
    model.eval()
    with torch.no_grad():
        assert (model(x)[0] - hf_model(x).logits).abs().max().item() <= 1e-5


# --------------------------------------------------------------------------------------------
# bad input: one line each


def test_bad_input(tmp_path, tok_dir, capsys):
    r = run_main("prepare", ["tokenizer", "--source=%s" % INPUT, "--vocab_size=258", "--special_tokens=<|a|>,<|b|>",
                             "--out=%s" % (tmp_path / "t")], capsys)
    assert_one_line_error(r, "vocab_size=258 is too small", "--vocab_size=259")
    assert not (tmp_path / "t").exists()

    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    for name in ("empty.jsonl", "empty.txt"):
        r = run_main("prepare", ["tokenizer", "--source=%s" % (tmp_path / name), "--out=%s" % (tmp_path / "t")], capsys)
        assert_one_line_error(r, "holds no text")
        assert not (tmp_path / "t").exists()
    r = run_main("prepare", ["corpus", "--source=%s" % (tmp_path / "empty.jsonl"), "--tokenizer=char",
                             "--out_dir=%s" % (tmp_path / "c")], capsys)
    assert_one_line_error(r, "no text")

    src = tmp_path / "d.txt"
    src.write_text("some text\n", encoding="utf-8")
    r = run_main("prepare", ["corpus", "--source=%s" % src, "--tokenizer=%s" % (tmp_path / "nowhere"),
                             "--out_dir=%s" % (tmp_path / "c")], capsys)
    assert_one_line_error(r, "does not exist", "nanogpt prepare tokenizer")
    (tmp_path / "bad").mkdir()
    r = run_main("prepare", ["corpus", "--source=%s" % src, "--tokenizer=%s" % (tmp_path / "bad"), "--out_dir=%s" % (tmp_path / "c")], capsys)
    assert_one_line_error(r, "has no tokenizer.json")
    (tmp_path / "bad" / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text()[:5000], encoding="utf-8")
    r = run_main("prepare", ["corpus", "--source=%s" % src, "--tokenizer=%s" % (tmp_path / "bad"), "--out_dir=%s" % (tmp_path / "c")], capsys)
    assert_one_line_error(r, "is not a readable tokenizer.json")
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "bad" / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    r = run_main("prepare", ["corpus", "--source=%s" % src, "--tokenizer=%s" % (tmp_path / "bad"), "--out_dir=%s" % (tmp_path / "c")], capsys)
    assert_one_line_error(r, "not a byte-level BPE")
    assert not (tmp_path / "c").exists()
    with pytest.raises(Exception, match="tokenizer.json"):
        ByteBPETokenizer("{}")


def test_hub_dataset_is_streamed(tmp_path, monkeypatch, capsys):
    import sys
    import types
    calls = []

    def load_dataset(name, split, streaming=False):
        calls.append((name, split, streaming))
        return iter([{"text": SHAKESPEARE[i * 500:(i + 1) * 500], "id": i} for i in range(20)])
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    r = run_main("prepare", ["tokenizer", "--source=someone/corpus", "--split=validation", "--vocab_size=300",
                             "--out=%s" % (tmp_path / "t")], capsys)
    assert r.returncode == 0, r.stderr
    assert calls == [("someone/corpus", "validation", True)] and "from 20 texts" in r.stdout
    assert corpus_tokenizer(str(tmp_path / "t")).vocab_size == 300
    r = run_main("prepare", ["tokenizer", "--source=someone/corpus", "--text_field=body", "--out=%s" % (tmp_path / "u")], capsys)
    assert_one_line_error(r, "has no 'body' column")
