"""Each training-speed lever's effect, side by side with the reference, in one process tree.

    python scripts/bench_levers.py --reference=path/to/nanoGPT [--rows=baseline,loss_chunk,fp8,...] [--steps=20]

Runs ``python bench.py`` once per row (GPT-2 124M, batch 12 x 1024, random tokens, bf16,
compile on unless a row says otherwise), and the reference's own ``bench.py`` before the first row
and after the last, so drift over the run shows. Prints a markdown table: ms/iter, tokens/s, MFU
(of the card's data-sheet peak), peak memory, and the last step's loss. ``--json`` keeps it all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROWS = {  # label: extra bench.py arguments
    "baseline": [],
    "loss_chunk": ["--loss_chunk=2048"],
    "fp8": ["--fp8=True"],
    "fp8+loss_chunk": ["--fp8=True", "--loss_chunk=2048"],
    "max-autotune": ["--compile_mode=max-autotune-no-cudagraphs"],
    "batch16": ["--batch_size=16"],
    "batch24": ["--batch_size=24"],
    "batch24+loss_chunk": ["--batch_size=24", "--loss_chunk=2048"],
    "eager": ["--compile=False"],
}
REF_LINE = re.compile(r"time per iteration: ([0-9.]+)ms")


def ours(label: str, extra: list[str], steps: int, tmp: str, common: list[str]) -> dict:
    out = os.path.join(tmp, "%s.json" % label)
    argv = [sys.executable, "bench.py", "--real_data=False", "--steps=%d" % steps, "--json_out=%s" % out] + common + extra
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        return {"label": label, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    with open(out) as f:
        r = json.load(f)
    return {"label": label, "args": " ".join(extra), "ms": r["ms_per_iter"], "tok_s": r["tokens_per_s"],
            "mfu": r.get("mfu"), "mem_gib": r["peak_memory_gib"], "loss": r["loss"],
            "tokens_per_iter": r["config"]["batch_size"] * r["config"]["block_size"]}


def reference(path: str, label: str) -> dict:
    """The reference prints its time per iteration after its burn-in and after its timed steps;
    the last line is the timed one."""
    p = subprocess.run([sys.executable, "bench.py", "--real_data=False"], cwd=path, capture_output=True, text=True)
    times = [float(m.group(1)) for m in REF_LINE.finditer(p.stdout)]
    if p.returncode != 0 or not times:
        return {"label": label, "error": (p.stderr or p.stdout).strip().splitlines()[-1:]}
    ms = times[-1]
    return {"label": label, "args": "(its bench.py)", "ms": ms, "tok_s": 12 * 1024 / ms * 1000, "mfu": None,
            "mem_gib": None, "loss": None, "tokens_per_iter": 12 * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default="", help="a nanoGPT checkout (its bench.py is timed first and last)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: %s" % ", ".join(ROWS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", default="", help="also write the rows here")
    ap.add_argument("--common", default="", help="bench.py arguments added to every row of ours, e.g. '--device=cpu --n_layer=2'")
    a = ap.parse_args()
    labels = a.rows.split(",")
    unknown = [x for x in labels if x not in ROWS]
    if unknown:
        sys.exit("unknown rows %s; pick from %s" % (unknown, ", ".join(ROWS)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.reference:
            rows.append(reference(a.reference, "reference (first)"))
            print(rows[-1], flush=True)
        for label in labels:
            rows.append(ours(label, ROWS[label], a.steps, tmp, a.common.split()))
            print(rows[-1], flush=True)
        if a.reference:
            rows.append(reference(a.reference, "reference (last)"))
            print(rows[-1], flush=True)
    ref = [r["tok_s"] for r in rows if r["label"].startswith("reference") and "error" not in r]
    base = sum(ref) / len(ref) if ref else None
    print("\n| row | arguments | ms/iter | tokens/s | over the reference | MFU | peak memory | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print("| %s | | failed: %s | | | | | |" % (r["label"], " ".join(r["error"])))
            continue
        print("| %s | `%s` | %.2f | %s | %s | %s | %s | %s |" % (
            r["label"], r["args"], r["ms"], f"{r['tok_s']:,.0f}", "%.2fx" % (r["tok_s"] / base) if base else "",
            "%.1f%%" % (100 * r["mfu"]) if r["mfu"] else "", "%.1f GiB" % r["mem_gib"] if r["mem_gib"] else "",
            "%.3f" % r["loss"] if r["loss"] is not None else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
