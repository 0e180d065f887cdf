"""Tokens/s of ``prepare corpus`` with num_proc = 1, 2 and all cores, against a single-process
``tiktoken`` ``encode_ordinary_batch`` loop over the same documents (the bound), and the peak
resident memory a preparation adds.

    python scripts/corpus_speed.py --mb=20            # a jsonl corpus of 20 MB of text
    python scripts/corpus_speed.py --mb=200 --rss     # also: peak RSS over the start, default settings

The corpus is passages of tiny Shakespeare (data/shakespeare_char/input.txt) of random lengths,
one JSON line each. Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))

from nanogpt.corpus import prepare_corpus  # noqa: E402
from nanogpt.tokenizer import get_gpt2_encoding  # noqa: E402

RSS = """
import json, sys
from nanogpt.corpus import prepare_corpus
from nanogpt.tokenizer import corpus_tokenizer
corpus_tokenizer("gpt2").encode_ordinary("warm up")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
base = status("VmRSS:")
prepare_corpus(sys.argv[2], sys.argv[1], num_proc=1)
print(json.dumps({"base": base, "peak": status("VmHWM:")}))
"""


def make_corpus(path: str, mb: float, seed: int = 0) -> list[str]:
    text = open(os.path.join(ROOT, "data", "shakespeare_char", "input.txt"), encoding="utf-8").read()
    rng = random.Random(seed)
    docs, size = [], 0
    while size < mb * 1e6:
        a = rng.randrange(len(text) - 6000)
        d = text[a:a + rng.randint(200, 6000)]
        docs.append(d)
        size += len(d.encode())
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="MB of text in the corpus")
    ap.add_argument("--rss", action="store_true", help="also measure peak resident memory (Linux)")
    ap.add_argument("--rss_only", action="store_true", help="measure the peak resident memory alone")
    ap.add_argument("--work", default="", help="folder for the corpus and outputs (default: a temporary one)")
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="corpus_speed_")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "corpus.jsonl")
    docs = make_corpus(src, a.mb)
    if not a.rss_only:
        speed(docs, src, work, a.mb)
    if a.rss or a.rss_only:
        rss(src, work, a.mb)


def speed(docs: list, src: str, work: str, mb: float) -> None:
    enc = get_gpt2_encoding()
    rows = []

    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(docs), 1024):
        n += sum(len(ids) + 1 for ids in enc.encode_ordinary_batch(docs[i:i + 1024]))
    dt = time.perf_counter() - t0
    rows.append(("tiktoken encode_ordinary_batch loop (1 process, its own threads): the bound", n, dt))

    t0 = time.perf_counter()
    n = sum(len(enc.encode_ordinary(d)) + 1 for d in docs)
    rows.append(("tiktoken encode_ordinary loop (1 thread)", n, time.perf_counter() - t0))

    cores = os.cpu_count() or 1
    for num_proc in sorted({1, 2, cores}):
        out = os.path.join(work, "out%d" % num_proc)
        t0 = time.perf_counter()
        meta = prepare_corpus(out, src, num_proc=num_proc)
        dt = time.perf_counter() - t0
        rows.append(("prepare corpus, num_proc=%d" % num_proc, meta["train_tokens"] + meta["val_tokens"], dt))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print("\n%s documents, %.1f MB of text, %d CPU cores, load average %.1f at the end\n" % (f"{len(docs):,}", mb, cores, load))
    print("| run | tokens | seconds | tokens/s | vs the bound |")
    print("|---|---:|---:|---:|---:|")
    bound = rows[0][1] / rows[0][2]
    for name, tokens, dt in rows:
        print("| %s | %s | %.2f | %s | %.2f |" % (name, f"{tokens:,}", dt, f"{tokens / dt:,.0f}", tokens / dt / bound))


def rss(src: str, work: str, mb: float) -> None:
    r = subprocess.run([sys.executable, "-c", RSS, src, os.path.join(work, "rss")], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))
    if r.returncode:
        sys.exit(r.stderr)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    print("\npeak resident memory, num_proc=1, default settings: %.1f MiB at the start, %.1f MiB peak (+%.1f MiB) "
          "for %.1f MB of text" % (got["base"] / 2**20, got["peak"] / 2**20, (got["peak"] - got["base"]) / 2**20, mb))


if __name__ == "__main__":
    main()
