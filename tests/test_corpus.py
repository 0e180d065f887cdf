"""A corpus at scale: shards and their manifest, the loader over them, resuming after a crash at
any step or a real SIGKILL, streamed sources, bounded memory, splits, dedup, and bad input."""

import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, assert_one_line_error, run_main
from nanogpt import corpus
from nanogpt.corpus import ValDraws, prepare_corpus
from nanogpt.data import BatchLoader, DataError, Tokens, load_meta
from nanogpt.errors import PrepareError

TEXT = (Path(ROOT) / "data" / "shakespeare_char" / "input.txt").read_text(encoding="utf-8")
EOT = 50256


@pytest.fixture
def enc(data_mirror, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))
    from nanogpt.tokenizer import get_gpt2_encoding
    return get_gpt2_encoding()


def shakespeare_docs(n: int, seed: int = 0) -> list:
    """``n`` passages of tiny Shakespeare of random lengths (some empty)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = rng.randrange(len(TEXT) - 3000)
        out.append(TEXT[a:a + rng.choice([0, 5, 80, 400, 1500])])
    return out


def write_corpus(root: Path, seed: int = 0) -> list:
    """A folder of .txt, .jsonl, .jsonl.gz and .json (array) files; the documents in reading order."""
    docs = shakespeare_docs(60, seed)
    root.mkdir(parents=True)
    (root / "a.txt").write_text(docs[0], encoding="utf-8")
    with open(root / "b.jsonl", "w", encoding="utf-8") as f:
        for d in docs[1:25]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[25:50]:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n\n")
    (root / "d.json").write_text(json.dumps([{"text": d} for d in docs[50:]]), encoding="utf-8")
    return docs


def split_ids(out, split: str) -> np.ndarray:
    t = Tokens(str(out), split, load_meta(str(out)))
    return t.read(0, t.n) if t.n else np.zeros(0, np.uint16)


def documents_of(ids: np.ndarray, enc) -> list:
    docs, start = [], 0
    for end in np.flatnonzero(ids == EOT):
        docs.append(enc.decode(ids[start:end].tolist()))
        start = end + 1
    assert start == len(ids)
    return docs


def folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


# --------------------------------------------------------------------------------------------
# shards, the manifest and the loader


def test_long_documents_are_cut_without_changing_tokens(enc, tmp_path):
    rng = random.Random(0)
    alphabet = ["a", "Zq", " ", "  ", "\n", "\n\n", "\t", "\r\n", "'s", "'ll", "12", "!?", ".", "\u00a0", "\u3000",
                "\u2028", "é", "✓", "\x1c", "\n ", " \n", "'"]
    for trial in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200)))
        size = rng.randint(1, 30)
        pieces = list(corpus._text_pieces(text, size))
        assert "".join(pieces) == text
        assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text), (text, size)
        path = tmp_path / "t.txt"
        path.write_text(text, encoding="utf-8", newline="")
        read = path.read_text(encoding="utf-8")  # newlines as Python reads them
        pieces = list(corpus._file_pieces(str(path), size))
        assert "".join(pieces) == read
        assert [t for p in pieces for t in enc.encode_ordinary(p)] == enc.encode_ordinary(read), (text, size)
        at = rng.randint(0, len(text))
        split = list(corpus._split_pieces(corpus._text_pieces(text, size), at))
        assert "".join(p for p, _ in split) == text and [a for _, a in split] == sorted(a for _, a in split)
        assert [t for p, _ in split for t in enc.encode_ordinary(p)] == enc.encode_ordinary(text), (text, size, at)
    pieces = list(corpus._text_pieces(TEXT, 5000))
    assert len(pieces) > 200 and max(map(len, pieces)) <= 5000


def test_shards_hold_every_document_and_batches_match_one_file(tmp_path, enc, monkeypatch):
    docs = write_corpus(tmp_path / "src")
    out = tmp_path / "out"
    meta = prepare_corpus(str(out), str(tmp_path / "src"), val_fraction=0.2, num_proc=1, shard_tokens=500)
    assert meta == json.loads((out / "meta.json").read_text(encoding="utf-8")) == load_meta(str(out))
    assert (meta["dtype"], meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == ("uint16", "gpt2", 50257, EOT)
    for split in ("train", "val"):
        shards = meta["shards"][split]
        assert [s["file"] for s in shards] == ["%s_%06d.bin" % (split, i) for i in range(len(shards))]
        assert all(s["tokens"] == 500 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 500
        for s in shards:
            data = (out / s["file"]).read_bytes()
            assert len(data) == 2 * s["tokens"] and hashlib.sha256(data).hexdigest() == s["sha256"]
        assert meta["%s_tokens" % split] == sum(s["tokens"] for s in shards)
    assert sorted(p.name for p in out.iterdir()) == sorted(["meta.json"] + [s["file"] for v in meta["shards"].values() for s in v])
    train, val = split_ids(out, "train"), split_ids(out, "val")
    assert meta["max_token_id"] == max(train.max(), val.max())
    # every document once, in reading order, in the split its seeded draw names
    draws = ValDraws(2357, 0.2)
    picked = [i for i in range(len(docs)) if draws(i)]
    assert 1 in picked and 5 < len(picked) < 25
    assert documents_of(val, enc) == [docs[i] for i in picked]
    assert documents_of(train, enc) == [d for i, d in enumerate(docs) if i not in picked]
    assert meta["documents"] == {"train": len(docs) - len(picked), "val": len(picked)}

    # the same bytes from worker processes handed many small tasks
    monkeypatch.setattr(corpus, "BATCH_CHARS", 3000)
    prepare_corpus(str(tmp_path / "out2"), str(tmp_path / "src"), val_fraction=0.2, num_proc=2, shard_tokens=500)
    assert folder_bytes(out) == folder_bytes(tmp_path / "out2")

    # reads across shard boundaries; batches are those of the same tokens in one file
    t = Tokens(str(out), "train", meta)
    assert t.n == len(train) and len(t.parts) == len(meta["shards"]["train"])
    for start, count in ((0, 1), (495, 10), (0, t.n), (990, 1020), (t.n - 3, 3)):
        assert t.read(start, count).tolist() == train[start:start + count].tolist()
    one = tmp_path / "one"
    one.mkdir()
    train.tofile(one / "train.bin")
    (one / "meta.json").write_text(json.dumps({"vocab_size": 50257, "dtype": "uint16", "train_tokens": len(train)}))
    a = BatchLoader(str(out), "train", 8, 64, "cpu", seed=3, meta=meta, vocab_size=50257)
    b = BatchLoader(str(one), "train", 8, 64, "cpu", seed=3, meta=load_meta(str(one)), vocab_size=50257)
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert xa.equal(xb) and ya.equal(yb)


def test_eval_reads_a_sharded_split_as_one_file(tmp_path, enc):
    from nanogpt.evaluate import split_tokens
    from nanogpt.tokenizer import load_tokenizer
    write_corpus(tmp_path / "src")
    prepare_corpus(str(tmp_path / "c"), str(tmp_path / "src"), num_proc=1, shard_tokens=300, val_fraction=0.3)
    tok = load_tokenizer(load_meta(str(tmp_path / "c")))
    val = split_ids(tmp_path / "c", "val")
    tokens, where = split_tokens("c", [str(tmp_path)], "val", tok, 0)
    assert len(tokens) == len(val) and tokens[250:700].tolist() == val[250:700].tolist() and where.endswith("val_*.bin")
    head, _ = split_tokens("c", [str(tmp_path)], "val", tok, 500)
    assert head.tolist() == val[:500].tolist()


def test_one_text_file_is_split_by_text(tmp_path, enc):
    text = TEXT[:30_000]
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    meta = prepare_corpus(str(tmp_path / "o"), str(tmp_path / "book.txt"), num_proc=1, shard_tokens=1000)
    both = np.concatenate([split_ids(tmp_path / "o", s) for s in ("train", "val")])
    assert both.tolist() == enc.encode_ordinary(text) + [EOT]  # no end-of-text token at the cut
    assert meta["val_split_by"] == "text" and 0.08 < meta["val_tokens"] / len(both) < 0.12


def test_dedup_and_seeded_val_split(tmp_path, enc):
    docs = shakespeare_docs(40, seed=1)
    rows = docs + docs[:10] + [docs[3]]  # 11 exact duplicates
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in rows), encoding="utf-8")
    uniq = list(dict.fromkeys(rows))
    m = prepare_corpus(str(tmp_path / "o"), str(tmp_path / "d.jsonl"), num_proc=1, dedup=True, val_fraction=0.3)
    assert m["duplicates"] == len(rows) - len(uniq) and sum(m["documents"].values()) == len(uniq)
    got = documents_of(split_ids(tmp_path / "o", "train"), enc) + documents_of(split_ids(tmp_path / "o", "val"), enc)
    assert sorted(got) == sorted(uniq)
    plain = prepare_corpus(str(tmp_path / "p"), str(tmp_path / "d.jsonl"), num_proc=1, val_fraction=0.3)
    assert sum(plain["documents"].values()) == len(rows) and plain["duplicates"] is None
    # the split is fixed by the seed: the same again, another with another seed
    again = prepare_corpus(str(tmp_path / "q"), str(tmp_path / "d.jsonl"), num_proc=1, val_fraction=0.3)
    assert folder_bytes(tmp_path / "p") == folder_bytes(tmp_path / "q")
    other = prepare_corpus(str(tmp_path / "r"), str(tmp_path / "d.jsonl"), num_proc=1, val_fraction=0.3, seed=1)
    assert other["val_tokens"] != again["val_tokens"]


# --------------------------------------------------------------------------------------------
# resuming


def steps_of(out: Path, src: Path, **kw) -> list:
    seen = []
    corpus._fault = seen.append
    try:
        prepare_corpus(str(out), str(src), **kw)
    finally:
        corpus._fault = None
    return seen


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to crash a preparation mid-way")
def test_a_crash_after_any_step_resumes_to_the_same_bytes(tmp_path, enc, capsys):
    """Each step of writing is the last thing a process does before it dies (os._exit: no
    cleanup runs). What it leaves under a final name is whole, and running again finishes the
    folder byte for byte as an uninterrupted run does."""
    docs = write_corpus(tmp_path / "src")
    kw = dict(val_fraction=0.2, num_proc=1, shard_tokens=2000)
    steps = steps_of(tmp_path / "ref", tmp_path / "src", **kw)
    ref = folder_bytes(tmp_path / "ref")
    assert len(ref) >= 5 and steps.count("shard renamed") == len(ref) - 1 and steps[-1] == "meta written"
    for k in range(len(steps)):
        out = tmp_path / ("crash%d" % k)
        pid = os.fork()
        if pid == 0:  # the child: prepare, and die right after step k
            calls = []

            def die(name):
                calls.append(name)
                if len(calls) == k + 1:
                    os._exit(0)
            corpus._fault = die
            try:
                prepare_corpus(str(out), str(tmp_path / "src"), **kw)
            finally:
                os._exit(1)  # the step never came: fail
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, (k, steps[k])
        left = folder_bytes(out)
        for name, data in left.items():
            if name.endswith(".bin") or name == "meta.json":
                assert data == ref[name], (k, steps[k], name)  # nothing half-written under a final name
        assert ("meta.json" in left) == (k == len(steps) - 1)
        prepare_corpus(str(out), str(tmp_path / "src"), **kw)
        assert folder_bytes(out) == ref, (k, steps[k])
    assert len(docs) == 60
    capsys.readouterr()


def test_sigkill_at_any_moment_resumes_to_the_same_bytes(tmp_path, enc):
    """A real SIGKILL of a preparation, at random moments, again and again until it finishes."""
    src = tmp_path / "src.jsonl"
    docs = shakespeare_docs(1000, seed=2)
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    kw = dict(val_fraction=0.05, num_proc=1, shard_tokens=10_000)
    t0 = time.monotonic()
    prepare_corpus(str(tmp_path / "ref"), str(src), **kw)
    seconds = time.monotonic() - t0  # how long the writing takes here: the kills fall inside it
    ref = folder_bytes(tmp_path / "ref")
    code = ("import sys; from nanogpt.corpus import prepare_corpus; "
            "prepare_corpus(sys.argv[1], sys.argv[2], val_fraction=0.05, num_proc=1, shard_tokens=10000)")
    out = tmp_path / "out"
    rng = random.Random(0)
    kills = 0
    for attempt in range(8):
        p = subprocess.Popen([sys.executable, "-c", code, str(out), str(src)], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
        if kills < 3 and attempt < 6:
            deadline = time.monotonic() + 60
            while not any(out.glob("*.tmp")) and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)  # wait until it writes
            time.sleep(rng.uniform(0, 0.25) * seconds)
            p.send_signal(signal.SIGKILL)
        rc = p.wait(timeout=120)
        kills += rc == -signal.SIGKILL
        if rc == 0:
            break
        left = folder_bytes(out)
        for name, data in left.items():
            if name.endswith(".bin"):
                assert data == ref[name], (attempt, name)
        assert "meta.json" not in left
    assert rc == 0, p.stderr.read().decode()
    assert kills >= 3
    assert folder_bytes(out) == ref


def test_a_resume_with_other_settings_is_refused(tmp_path, enc, capsys):
    write_corpus(tmp_path / "src")
    out = tmp_path / "o"

    def stop(name):
        if name == "progress written":
            raise KeyboardInterrupt
    corpus._fault = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_corpus(str(out), str(tmp_path / "src"), num_proc=1, shard_tokens=1000)
    finally:
        corpus._fault = None
    assert (out / "progress.json").is_file() and not (out / "meta.json").exists()
    r = run_main("prepare", ["corpus", "--source=%s" % (tmp_path / "src"), "--out_dir=%s" % out, "--num_proc=1",
                             "--shard_tokens=999"], capsys)
    assert_one_line_error(r, "unfinished preparation with other settings", "--shard_tokens was 1000, now 999")
    r = run_main("prepare", ["corpus", "--source=%s" % (tmp_path / "src"), "--out_dir=%s" % out, "--num_proc=1",
                             "--shard_tokens=1000"], capsys)
    assert r.returncode == 0 and "continuing an unfinished preparation: 1 shard(s) written" in r.stdout


# --------------------------------------------------------------------------------------------
# sources


def test_zstd_source_and_a_cut_gzip_file(tmp_path, enc):
    zstandard = pytest.importorskip("zstandard")
    docs = shakespeare_docs(15, seed=3)
    data = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    m = prepare_corpus(str(tmp_path / "o"), str(tmp_path / "a.jsonl.zst"), num_proc=1, val_fraction=0.0)
    assert documents_of(split_ids(tmp_path / "o", "train"), enc) == docs and m["val_tokens"] == 0
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data)[:-30])
    with pytest.raises(PrepareError, match=r"cut\.jsonl\.zst is not a whole zstd file"):
        prepare_corpus(str(tmp_path / "o2"), str(tmp_path / "cut.jsonl.zst"), num_proc=1)
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(data)[:-30])
    with pytest.raises(PrepareError, match=r"cut\.jsonl\.gz is not a whole gzip file"):
        prepare_corpus(str(tmp_path / "o3"), str(tmp_path / "cut.jsonl.gz"), num_proc=1)
    assert not (tmp_path / "o3").exists() or not any((tmp_path / "o3").iterdir())


def test_parquet_source(tmp_path, enc):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    docs = shakespeare_docs(30, seed=3)
    (tmp_path / "src").mkdir()
    pq.write_table(pa.table({"text": docs[:15], "n": list(range(15))}), tmp_path / "src" / "a.parquet", row_group_size=4)
    pq.write_table(pa.table({"text": docs[15:], "n": list(range(15))}), tmp_path / "src" / "b.parquet", row_group_size=4)
    m = prepare_corpus(str(tmp_path / "o"), str(tmp_path / "src"), num_proc=1, val_fraction=0.0)
    assert documents_of(split_ids(tmp_path / "o", "train"), enc) == docs and m["documents"]["train"] == 30
    with pytest.raises(PrepareError, match=r"b\.parquet has no 'body' column \(columns: text, n\); pass --text_field"):
        prepare_corpus(str(tmp_path / "o2"), str(tmp_path / "src" / "b.parquet"), text_field="body", num_proc=1)


def test_hub_dataset_is_streamed(tmp_path, enc, monkeypatch):
    docs = shakespeare_docs(20, seed=4)
    asked = {}

    class Streamed:
        column_names = ["text", "url"]
        info = types.SimpleNamespace(splits={"train": types.SimpleNamespace(num_examples=len(docs))})

        def __iter__(self):
            return iter({"text": d, "url": "u"} for d in docs)

    def load_dataset(name, *config, split=None, **kw):
        asked.update(kw, name=name, config=config, split=split)
        return Streamed()
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    m = prepare_corpus(str(tmp_path / "o"), "someone/corpus", num_proc=1, val_fraction=0.1)
    assert asked == {"name": "someone/corpus", "config": (), "split": "train", "streaming": True}
    got = documents_of(split_ids(tmp_path / "o", "train"), enc) + documents_of(split_ids(tmp_path / "o", "val"), enc)
    assert sorted(got) == sorted(docs) and m["source"] == "someone/corpus"
    with pytest.raises(PrepareError, match="has no 'body' column .*pass --text_field"):
        prepare_corpus(str(tmp_path / "o2"), "someone/corpus", text_field="body", num_proc=1)
    prepare_corpus(str(tmp_path / "o3"), "someone/corpus", hf_config="sample-10BT", num_proc=1)
    assert asked["config"] == ("sample-10BT",)


def test_hub_dataset_without_datasets_package(tmp_path, enc, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(PrepareError, match=r"not a local file or folder.*pip install datasets"):
        prepare_corpus(str(tmp_path / "o"), "someone/some-dataset", num_proc=1)


def test_hub_dataset_for_real(tmp_path, enc):
    pytest.importorskip("datasets")
    pytest.skip("needs the network: streaming a Hugging Face dataset is not tested offline")


RSS_SCRIPT = """
import gzip, json, os, sys
from nanogpt import corpus
corpus.PIECE_CHARS, corpus.BATCH_CHARS = 1 << 12, 1 << 14  # small pieces: a small cap shows the bound quickly
prepare = lambda out, src: corpus.prepare_corpus(out, src, num_proc=1, shard_tokens=1 << 20, val_fraction=0.01)
prepare(sys.argv[2] + "_warm", sys.argv[1] + "_warm.jsonl.gz")  # everything loaded once
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size starts again from here
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
base = status("VmRSS:")
prepare(sys.argv[2], sys.argv[1] + ".jsonl.gz")
print(json.dumps({"base": base, "peak": status("VmHWM:")}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak resident size through /proc")
def test_memory_stays_bounded_for_a_corpus_ten_times_the_cap(tmp_path, enc):
    cap = 1 << 18  # 256 KiB more than before it started, for a corpus of 10x that much text
    src = tmp_path / "big"
    rng = random.Random(5)
    text_bytes = 0
    with gzip.open(str(src) + ".jsonl.gz", "wt", encoding="utf-8", compresslevel=1) as f:
        while text_bytes < 10 * cap:
            a = rng.randrange(len(TEXT) - 20_000)
            d = TEXT[a:a + rng.randrange(20_000)]
            f.write(json.dumps({"text": d}) + "\n")
            text_bytes += len(d.encode())
    with gzip.open(str(src) + "_warm.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": TEXT[:200_000]}) + "\n" + json.dumps({"text": TEXT[:1000]}) + "\n")
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(src), str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    grew = got["peak"] - got["base"]
    print("text %.1f MiB; resident %.1f MiB before, peak %.1f MiB: +%.2f MiB (cap %.1f MiB)"
          % (text_bytes / 2**20, got["base"] / 2**20, got["peak"] / 2**20, grew / 2**20, cap / 2**20))
    assert grew < cap
    assert load_meta(str(tmp_path / "out"))["train_tokens"] > text_bytes / 5


def test_progress_in_a_log_says_rates_and_eta(capsys):
    src = types.SimpleNamespace(total_bytes=1000, total_docs=None, bytes_read=lambda: 250)
    bar = corpus._Progress(src, 0, 0, interval=0.0)  # stderr is not a terminal here: log lines
    time.sleep(0.01)
    bar.update(40, 12_000)
    bar.close()
    line = capsys.readouterr().out.strip()
    assert line.startswith("tokenizing: 40 documents, 12,000 tokens, ") and "doc/s" in line and "tok/s" in line, line
    assert "25.0% of the bytes, ETA 0:00:0" in line, line


# --------------------------------------------------------------------------------------------
# bad input: one line each


def test_bad_shards_and_empty_corpora_get_one_line(tmp_path, enc, capsys):
    write_corpus(tmp_path / "src")
    data = tmp_path / "data"
    prepare_corpus(str(data / "c"), str(tmp_path / "src"), num_proc=1, shard_tokens=1000, val_fraction=0.2)
    meta = load_meta(str(data / "c"))
    args = ["--data_root=%s" % data, "--dataset=c", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16",
            "--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=1", "--max_iters=1", "--eval_interval=1",
            "--eval_iters=1", "--out_dir=%s" % (tmp_path / "run"), "--compile=False", "--dtype=float32"]
    shard = data / "c" / "train_000001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:10] + bytes([good[10] ^ 1]) + good[11:])  # one bit flipped: same size, other sha256
    r = run_main("train.py", args, capsys)
    assert_one_line_error(r, "train_000001.bin does not match the sha256 meta.json gives for it")
    assert Tokens(str(data / "c"), "train", meta, verify=False).n == meta["train_tokens"]  # --verify_shards=False
    shard.unlink()
    r = run_main("train.py", args, capsys)
    assert_one_line_error(r, "train_000001.bin, listed in meta.json, is missing")
    shard.write_bytes(good[:-2])
    with pytest.raises(DataError, match="holds 999 tokens but meta.json says 1000"):
        Tokens(str(data / "c"), "train", meta)
    shard.write_bytes(good)
    assert Tokens(str(data / "c"), "train", meta).n == meta["train_tokens"]
    raw = json.loads((data / "c" / "meta.json").read_text(encoding="utf-8"))
    raw["shards"]["val"][0]["sha256"] = "not hex"
    (data / "c" / "meta.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(DataError, match=r"shards\['val'\]\[0\] must be \{file: 'val_NNNNNN.bin', tokens: N, sha256: HEX\}"):
        load_meta(str(data / "c"))

    (tmp_path / "empty").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "empty" / name).write_text("")
    (tmp_path / "empty" / "c.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    r = run_main("prepare", ["corpus", "--source=%s" % (tmp_path / "empty"), "--out_dir=%s" % (tmp_path / "o"),
                             "--num_proc=1"], capsys)
    assert_one_line_error(r, "holds no text (3 documents, all empty); give a source with some")
    assert not (tmp_path / "o").exists()
    (tmp_path / "none.jsonl").write_text("\n\n")
    r = run_main("prepare", ["corpus", "--source=%s" % (tmp_path / "none.jsonl"), "--out_dir=%s" % (tmp_path / "o"),
                             "--num_proc=1"], capsys)
    assert_one_line_error(r, "holds no text (no documents)")


def test_corpus_errors(tmp_path, enc):
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n{"text": "y"}\n')
    with pytest.raises(PrepareError, match=r"bad\.jsonl line 1 has no 'text' field; pass --text_field"):
        prepare_corpus(str(tmp_path / "o"), str(tmp_path / "bad.jsonl"), num_proc=1)
    # the same error through the worker pool, and nothing left behind
    with pytest.raises(PrepareError, match="has no 'text' field"):
        prepare_corpus(str(tmp_path / "o"), str(tmp_path / "bad.jsonl"), num_proc=2)
    assert os.listdir(tmp_path / "o") == []
    (tmp_path / "broken.jsonl").write_text('{"text": "x"}\n{"text": \n')
    with pytest.raises(PrepareError, match="line 2 is not valid JSON"):
        prepare_corpus(str(tmp_path / "o"), str(tmp_path / "broken.jsonl"), num_proc=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no .txt, .jsonl, .json, .jsonl.gz, .jsonl.zst or .parquet files under"):
        prepare_corpus(str(tmp_path / "o"), str(tmp_path / "empty"), num_proc=1)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(PrepareError, match="unsupported file type"):
        prepare_corpus(str(tmp_path / "o"), str(tmp_path / "data.csv"), num_proc=1)
    with pytest.raises(PrepareError, match=r"val_fraction must be in \[0, 1\)"):
        prepare_corpus(str(tmp_path / "o"), str(tmp_path / "bad.jsonl"), val_fraction=1.0)
    shutil.rmtree(tmp_path / "o")
