"""Dataset preparation: exact counts, checked downloads, any corpus, safe legacy meta, tokenizers."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import urllib.request
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from nanogpt import prepare
from nanogpt.data import load_meta
from nanogpt.download import fetch, sha256_of
from nanogpt.errors import DataError, PrepareError
from nanogpt.prepare import prepare_shakespeare_char
from nanogpt.tokenizer import CharTokenizer, TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
INPUT = ROOT / "data" / "shakespeare_char" / "input.txt"
TEXT = INPUT.read_text(encoding="utf-8")
EOT = 50256


@pytest.fixture
def mirror_env(data_mirror, monkeypatch):
    """The mirror configured through the environment, as users do it offline."""
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", str(data_mirror))
    return data_mirror


@pytest.fixture
def enc(data_mirror, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))
    from nanogpt.tokenizer import get_gpt2_encoding
    return get_gpt2_encoding()


def no_network(*args, **kwargs):
    raise AssertionError("the network was used")


# --------------------------------------------------------------------------------------------
# tiny Shakespeare


def test_shakespeare_char_counts_meta_and_roundtrip(tmp_path):
    shutil.copyfile(INPUT, tmp_path / "input.txt")  # the right file is there already: nothing is fetched
    meta = prepare_shakespeare_char(str(tmp_path))
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert (len(train), len(val), meta["vocab_size"]) == (1_003_854, 111_540, 65)
    assert os.path.getsize(tmp_path / "train.bin") == 2 * 1_003_854  # raw uint16, no header

    on_disk = json.loads((tmp_path / "meta.json").read_text(encoding="utf-8"))
    assert on_disk == meta
    assert {k: on_disk[k] for k in ("vocab_size", "dtype", "tokenizer", "train_tokens", "val_tokens", "max_token_id")} == {
        "vocab_size": 65, "dtype": "uint16", "tokenizer": "char", "train_tokens": 1_003_854, "val_tokens": 111_540,
        "max_token_id": 64}
    chars = sorted(set(TEXT))
    assert on_disk["itos"] == {str(i): c for i, c in enumerate(chars)} and on_disk["itos"]["0"] == "\n"
    assert on_disk["stoi"] == {c: i for i, c in enumerate(chars)}

    tok = load_tokenizer(load_meta(str(tmp_path)))
    assert isinstance(tok, CharTokenizer)
    assert tok.decode(train[:100]) == TEXT[:100]
    assert tok.decode(val.tolist()) == TEXT[1_003_854:]
    assert tok.encode(TEXT[:100]) == train[:100].tolist()
    assert not list(tmp_path.glob("*.tmp"))


def test_shakespeare_char_fetches_from_the_mirror(tmp_path, mirror_env, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    out = tmp_path / "shakespeare_char"
    meta = prepare_shakespeare_char(str(out))
    assert sha256_of(str(out / "input.txt")) == prepare.SHAKESPEARE_SHA256
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    assert sorted(p.name for p in out.iterdir()) == ["input.txt", "meta.json", "train.bin", "val.bin"]


def test_own_text_in_input_txt_is_prepared_as_given(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    (tmp_path / "input.txt").write_text("abcabcabcd", encoding="utf-8")
    meta = prepare_shakespeare_char(str(tmp_path))
    assert "not tiny Shakespeare" in capsys.readouterr().out
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (4, 9, 1)
    assert np.fromfile(tmp_path / "val.bin", dtype=np.uint16).tolist() == [3]


def test_shakespeare_bpe_with_eot(tmp_path, enc, monkeypatch):
    # no mirror configured: input.txt comes from the correct copy in the sibling shakespeare_char folder
    monkeypatch.delenv("NANOGPT_DATA_MIRROR", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    (tmp_path / "shakespeare_char").mkdir()
    shutil.copyfile(INPUT, tmp_path / "shakespeare_char" / "input.txt")
    out = tmp_path / "shakespeare"
    meta = prepare.prepare_shakespeare(str(out))
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (301_966 + 1, 36_059 + 1)  # nanoGPT's counts, each split closed by EOT
    assert train[-1] == val[-1] == EOT and (train == EOT).sum() == 1
    assert meta == json.loads((out / "meta.json").read_text())
    assert (meta["vocab_size"], meta["tokenizer"], meta["dtype"], meta["max_token_id"]) == (50257, "gpt2", "uint16", EOT)
    assert enc.decode(train[:-1].tolist()) == TEXT[:int(0.9 * len(TEXT))]
    tok = load_tokenizer(load_meta(str(out)))
    start = tok.decode(train[:50])
    assert len(start) > 100 and TEXT.startswith(start)
    assert tok.encode("O Romeo<|endoftext|>") == enc.encode_ordinary("O Romeo") + [EOT]


# --------------------------------------------------------------------------------------------
# checked downloads


def test_fetch_checks_sha256_and_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOGPT_DATA_MIRROR", raising=False)
    mirror = tmp_path / "mirror"
    (mirror / "x").mkdir(parents=True)
    (mirror / "x" / "f.txt").write_text("hello")
    good = sha256_of(str(mirror / "x" / "f.txt"))
    out = tmp_path / "out"
    dest = out / "f.txt"

    # a damaged mirror copy: one line naming the file, both hashes and what to do
    with pytest.raises(PrepareError, match=r"f\.txt from .* has sha256 [0-9a-f]{64}, expected 0{64}; replace") as e:
        fetch("http://unused.invalid/f.txt", str(dest), "0" * 64, "x/f.txt", mirror=str(mirror))
    assert "\n" not in str(e.value) and os.listdir(out) == []

    # a good mirror copy
    fetch("http://unused.invalid/f.txt", str(dest), good, "x/f.txt", mirror=str(mirror))
    assert dest.read_text() == "hello"

    # downloads, with file:// addresses standing in for the network
    src = tmp_path / "published.txt"
    src.write_text("hello")
    dest2 = out / "g.txt"
    with pytest.raises(PrepareError, match=r"g\.txt from file:.* expected 0{64}; retry"):
        fetch(src.as_uri(), str(dest2), "0" * 64, "x/g.txt")
    assert sorted(os.listdir(out)) == ["f.txt"]
    fetch(src.as_uri(), str(dest2), good, "x/g.txt")
    assert dest2.read_text() == "hello"
    with pytest.raises(PrepareError, match="download of .* failed"):
        fetch((tmp_path / "missing").as_uri(), str(out / "h.txt"), good, "x/h.txt")
    # a mirror that lacks the file: the download is tried instead
    fetch(src.as_uri(), str(out / "i.txt"), good, "x/i.txt", mirror=str(mirror))
    assert sorted(os.listdir(out)) == ["f.txt", "g.txt", "i.txt"]

    # a damaged existing file is replaced; one that cannot be replaced is left as it was
    dest.write_text("changed")
    fetch("http://unused.invalid/f.txt", str(dest), good, "x/f.txt", mirror=str(mirror))
    assert dest.read_text() == "hello"
    dest.write_text("changed")
    with pytest.raises(PrepareError):
        fetch((tmp_path / "missing").as_uri(), str(dest), good, "x/nothing.txt")
    assert dest.read_text() == "changed" and sorted(os.listdir(out)) == ["f.txt", "g.txt", "i.txt"]


def test_interrupted_download_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOGPT_DATA_MIRROR", raising=False)

    class Broken:
        def __init__(self):
            self.sent = False

        def read(self, n=-1):
            if self.sent:
                raise ConnectionResetError("connection reset")
            self.sent = True
            return b"partial"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Broken())
    with pytest.raises(PrepareError, match="connection reset.*NANOGPT_DATA_MIRROR"):
        fetch("https://example.invalid/input.txt", str(tmp_path / "input.txt"), "0" * 64, "tinyshakespeare/input.txt")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# any corpus


def make_corpus(root: Path):
    """A folder of .txt files and a .jsonl file; returns the documents in the order they are read."""
    (root / "b_sub").mkdir(parents=True)
    txt = {"a.txt": "First document.\nWith two lines.\n", "b_sub/c.txt": "Second one, ünïcode ✓ and émoji 🙂.",
           "b_sub/d.txt": "", "z.txt": "Last file.\n\n  indented\nline " * 40}
    for name, text in txt.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / ".hidden.txt").write_text("not a document")
    (root / "notes.md").write_text("not a document either")
    rows = ["row %d says %s" % (i, "word " * i) for i in range(12)]
    with open(root / "m.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": i, "text": r}) + "\n" + ("\n" if i == 3 else ""))  # a blank line is skipped
    return [txt["a.txt"], txt["b_sub/c.txt"], txt["b_sub/d.txt"]] + rows + [txt["z.txt"]]


# --------------------------------------------------------------------------------------------
# meta files


def test_legacy_meta_pkl_is_read_without_unpickling_objects(tmp_path):
    plain = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "stoi": {"a": 0, "b": 1, "c": 2}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(plain))
    m = load_meta(str(tmp_path))
    assert m == dict(plain, dtype="uint16")
    assert CharTokenizer(m).decode([2, 0, 1]) == "cab"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > %s" % (tmp_path / "pwned"),))

    for bad in (OrderedDict(plain), {"x": Evil()}):
        (tmp_path / "meta.pkl").write_bytes(pickle.dumps(bad))
        with pytest.raises(DataError, match="refusing to unpickle"):
            load_meta(str(tmp_path))
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(plain)[:20])
    with pytest.raises(DataError, match="cannot be read"):
        load_meta(str(tmp_path))
    assert load_meta(str(tmp_path / "nothing")) is None


def test_meta_json_preferred_and_normalised(tmp_path):
    (tmp_path / "meta.pkl").write_bytes(b"garbage")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 2, "itos": {"0": "x", "1": "y"}, "stoi": {"x": 0, "y": 1}}))
    assert load_meta(str(tmp_path)) == {"vocab_size": 2, "itos": {0: "x", 1: "y"}, "stoi": {"x": 0, "y": 1}, "dtype": "uint16"}
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_meta(str(tmp_path))


# --------------------------------------------------------------------------------------------
# tokenizers


def test_char_tokenizer_names_unknown_characters():
    tok = CharTokenizer({"stoi": {"a": 0, "b": 1}, "itos": {"0": "a", "1": "b"}})
    assert tok.decode(tok.encode("abba")) == "abba"
    with pytest.raises(TokenizerError, match=r"1 character\(s\) outside .*'z'"):
        tok.encode("abz")


def test_gpt2_encoding_uses_the_mirror_cache(data_mirror, monkeypatch):
    from nanogpt.tokenizer import get_gpt2_encoding
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", str(data_mirror))
    enc = get_gpt2_encoding()
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(data_mirror / "tiktoken-cache")
    assert (enc.n_vocab, enc.eot_token) == (50257, EOT)
    tok = load_tokenizer(None)
    assert tok.encode("hello<|endoftext|>") == [31373, EOT] and tok.decode(np.array([31373], np.uint16)) == "hello"


# --------------------------------------------------------------------------------------------
# command line


def run(args, **env):
    return subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **env))


def test_prepare_scripts_as_users_run_them(tmp_path, data_mirror):
    r = run(["data/shakespeare_char/prepare.py", "--out_dir=%s" % (tmp_path / "c")], NANOGPT_DATA_MIRROR=str(data_mirror))
    assert r.returncode == 0, r.stderr
    assert "train 1,003,854 tokens, val 111,540 tokens" in r.stdout
    assert load_meta(str(tmp_path / "c"))["vocab_size"] == 65

    make_corpus(tmp_path / "src")
    r = run(["data/openwebtext/prepare.py", "--source=%s" % (tmp_path / "src"), "--out_dir=%s" % (tmp_path / "o"),
             "--num_proc=2", "--val_fraction=0.1"], TIKTOKEN_CACHE_DIR=str(data_mirror / "tiktoken-cache"))
    assert r.returncode == 0, r.stderr
    assert load_meta(str(tmp_path / "o"))["documents"] == {"train": 14, "val": 2}

    r = run(["-m", "nanogpt.cli", "prepare", "corpus"])
    assert r.returncode == 2 and r.stderr.strip().startswith("error: corpus needs --source")
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_in_process(tmp_path, enc, capsys):
    (tmp_path / "t.txt").write_text("some text\nmore\n")
    prepare.main(["corpus", "--source=%s" % (tmp_path / "t.txt"), "--out_dir=%s" % (tmp_path / "o"), "--num_proc=1"])
    assert load_meta(str(tmp_path / "o"))["tokenizer"] == "gpt2"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        prepare.main(["shakespeare", "--source=x", "--out_dir=%s" % (tmp_path / "s")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --source is for openwebtext, corpus and chat")
