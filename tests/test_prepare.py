"""Dataset preparation: exact counts, checked downloads, any corpus, safe legacy meta."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest

from nanogpt import prepare
from nanogpt.prepare import PrepareError, fetch, load_meta, prepare_corpus, prepare_shakespeare_char, sha256_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRROR = os.path.join(os.path.dirname(ROOT), "shared", "data")
INPUT = os.path.join(ROOT, "data", "shakespeare_char", "input.txt")
needs_mirror = pytest.mark.skipif(not os.path.isdir(os.path.join(MIRROR, "tiktoken-cache")), reason="no ../shared/data mirror")


def test_shakespeare_char(tmp_path):
    shutil.copyfile(INPUT, tmp_path / "input.txt")  # the copy in the repository: no download
    meta = prepare_shakespeare_char(str(tmp_path))
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert (len(train), len(val), meta["vocab_size"]) == (1003854, 111540, 65)
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk["dtype"] == "uint16" and on_disk["itos"]["0"] == "\n" and on_disk["stoi"]["a"] == 39
    m = load_meta(str(tmp_path))
    text = open(INPUT, encoding="utf-8").read()
    assert "".join(m["itos"][i] for i in train[:200]) == text[:200]
    assert "".join(m["itos"][i] for i in val[-50:]) == text[-50:]


def test_fetch_checks_sha256_and_leaves_nothing_behind(tmp_path, monkeypatch):
    src = tmp_path / "mirror" / "x" / "f.txt"
    src.parent.mkdir(parents=True)
    src.write_text("hello")
    good = sha256_of(str(src))
    dest = tmp_path / "out" / "f.txt"
    with pytest.raises(PrepareError, match="expected 0000"):
        fetch("http://unused", str(dest), "0" * 64, "x/f.txt", mirror=str(tmp_path / "mirror"))
    assert not dest.parent.exists() or os.listdir(dest.parent) == []
    # the download path, with a file:// address standing in for the network
    monkeypatch.delenv("NANOGPT_DATA_MIRROR", raising=False)
    fetch(src.as_uri(), str(dest), good, "x/f.txt")
    assert dest.read_text() == "hello"
    # an existing file with the wrong content is reported, not overwritten
    dest.write_text("changed")
    with pytest.raises(PrepareError, match="delete it"):
        fetch(src.as_uri(), str(dest), good, "x/f.txt")
    with pytest.raises(PrepareError, match="download of .* failed"):
        fetch((tmp_path / "missing").as_uri(), str(tmp_path / "new.txt"), good, "x/f.txt")
    assert not (tmp_path / "new.txt").exists()


@needs_mirror
def test_shakespeare_bpe(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", MIRROR)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    meta = prepare.prepare_shakespeare(str(tmp_path / "shakespeare"))
    train = np.fromfile(tmp_path / "shakespeare" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "shakespeare" / "val.bin", dtype=np.uint16)
    assert (len(train), len(val)) == (301966 + 1, 36059 + 1)  # each split closed by <|endoftext|>
    assert train[-1] == val[-1] == 50256 and meta["vocab_size"] == 50257
    from nanogpt.tokenizer import get_gpt2_encoding
    assert get_gpt2_encoding().decode(train[:20].tolist()) == open(INPUT, encoding="utf-8").read()[:len(get_gpt2_encoding().decode(train[:20].tolist()))]


@needs_mirror
def test_corpus_from_local_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_DATA_MIRROR", MIRROR)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    docs = ["First document.\nWith two lines.", "Second one, ünïcode ✓.", "Third."]
    for i, d in enumerate(docs):
        (src / ("sub" if i else "") / ("d%d.txt" % i)).write_text(d, encoding="utf-8")
    rows = ["row %d says %s" % (i, "word " * i) for i in range(12)]
    with open(src / "more.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"text": r, "id": 1}) + "\n")
    from nanogpt.tokenizer import get_gpt2_encoding
    enc = get_gpt2_encoding()
    expected = sum(len(enc.encode_ordinary(t)) + 1 for t in docs + rows)
    for num_proc in (1, 2):
        out = tmp_path / ("out%d" % num_proc)
        meta = prepare_corpus(str(out), str(src), val_fraction=0.2, num_proc=num_proc)
        train = np.fromfile(out / "train.bin", dtype=np.uint16)
        val = np.fromfile(out / "val.bin", dtype=np.uint16)
        assert len(train) + len(val) == expected == meta["train_tokens"] + meta["val_tokens"]
        assert meta["documents"] == {"train": 12, "val": 3} and meta["dtype"] == "uint16"
        assert (train == 50256).sum() == 12 and (val == 50256).sum() == 3
    # the same bytes whatever the number of processes
    assert (tmp_path / "out2" / "train.bin").read_bytes() == (tmp_path / "out1" / "train.bin").read_bytes()
    assert (tmp_path / "out2" / "val.bin").read_bytes() == (tmp_path / "out1" / "val.bin").read_bytes()


def test_corpus_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(PrepareError, match="no 'text' field"):
        prepare_corpus(str(tmp_path / "o"), str(tmp_path / "bad.jsonl"), num_proc=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no .txt"):
        prepare_corpus(str(tmp_path / "o"), str(tmp_path / "empty"), num_proc=1)


def test_legacy_meta_pkl_is_read_without_unpickling_objects(tmp_path):
    plain = {"vocab_size": 3, "itos": {0: "a", 1: "b", 2: "c"}, "stoi": {"a": 0, "b": 1, "c": 2}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(plain))
    m = load_meta(str(tmp_path))
    assert m["vocab_size"] == 3 and m["itos"][2] == "c" and m["dtype"] == "uint16"

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > %s" % (tmp_path / "pwned"),))

    for bad in (OrderedDict(plain), {"x": Evil()}):
        (tmp_path / "meta.pkl").write_bytes(pickle.dumps(bad))
        with pytest.raises(PrepareError, match="refusing to unpickle"):
            load_meta(str(tmp_path))
    assert not (tmp_path / "pwned").exists()
    assert load_meta(str(tmp_path / "nothing")) is None


def test_prepare_script_as_users_run_it(tmp_path):
    env = dict(os.environ, NANOGPT_DATA_MIRROR=MIRROR)
    r = subprocess.run([sys.executable, "data/shakespeare_char/prepare.py", "--out_dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train 1,003,854 tokens" in r.stdout and (tmp_path / "meta.json").exists()
    r = subprocess.run([sys.executable, "-m", "nanogpt.cli", "prepare", "corpus"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: corpus needs --source")
