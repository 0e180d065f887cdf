"""Peak GPU memory and optimizer state of one training step, per optimizer and memory lever.

    python scripts/optimizer_memory.py                 # GPT-2 XL shape, batch 1 x 1024, bf16
    python scripts/optimizer_memory.py --n_layer=12 --n_head=12 --n_embd=768   # GPT-2 124M shape

Each variant runs bench.py in a fresh process (so peaks do not mix) and the table is printed at
the end, in Markdown. Extra --key=value arguments go to every bench.py run.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = ["--n_layer=48", "--n_head=25", "--n_embd=1600", "--vocab_size=50257", "--bias=True"]
COMMON = ["--batch_size=1", "--block_size=1024", "--dtype=bfloat16", "--compile=False", "--real_data=False",
          "--warmup_steps=2", "--steps=3", "--learning_rate=3e-5"]
VARIANTS = [
    ("AdamW (fused)", ["--optimizer=adamw"]),
    ("StripedAdamW", ["--optimizer=striped_adamw"]),
    ("Adafactor (torch, no momentum)", ["--optimizer=adafactor"]),
    ("StripedAdamW + step in backward", ["--optimizer=striped_adamw", "--optimizer_in_backward=True"]),
    ("StripedAdamW + bf16 momentum", ["--optimizer=striped_adamw", "--optimizer_state_dtype=bfloat16"]),
    ("StripedAdamW + activation checkpointing", ["--optimizer=striped_adamw", "--activation_checkpointing=True"]),
    ("StripedAdamW + all three levers", ["--optimizer=striped_adamw", "--optimizer_in_backward=True",
                                         "--optimizer_state_dtype=bfloat16", "--activation_checkpointing=True"]),
    ("LoRA r=8 attn, StripedAdamW + activation checkpointing", ["--lora_rank=8", "--lora_targets=attn", "--optimizer=striped_adamw",
                                                                "--activation_checkpointing=True"]),
]


def main(extra):
    shape = [a for a in SHAPE if a.split("=")[0] not in {e.split("=")[0] for e in extra}]
    rows = []
    for name, args in VARIANTS:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, "bench.py"] + shape + COMMON + args + extra + ["--json_out=%s" % out]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            rows.append((name, None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"))
            continue
        with open(out) as f:
            rows.append((name, json.load(f), ""))
        os.remove(out)
        print(name, "|", r.stdout.strip().splitlines()[-1], flush=True)
    print("\n| optimizer and levers | peak allocated (GiB) | optimizer state (GiB) | ms/iter |")
    print("| --- | --- | --- | --- |")
    for name, res, err in rows:
        if res is None:
            print("| %s | failed: %s | | |" % (name, err))
        else:
            print("| %s | %.2f | %.2f | %.0f |" % (name, res["peak_memory_gib"], res["optimizer_state_gib"], res["ms_per_iter"]))


if __name__ == "__main__":
    main(sys.argv[1:])
