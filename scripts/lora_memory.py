"""LoRA against full finetuning, side by side: peak RSS, optimizer state and tokens/s of the
training step, and the bytes GPT-2 XL needs with LoRA + StripedAdamW.

    python scripts/lora_memory.py                      # GPT-2 124M shape, batch 2 x 128, CPU, float32
    python scripts/lora_memory.py --block_size=256     # extra --key=value go to every bench.py run
    python scripts/lora_memory.py --xl_step=True       # also measure one GPT-2 XL LoRA step (slow on a CPU)

Each variant runs bench.py (random weights, random tokens) in a fresh process, whose peak
resident memory the operating system reports when it ends (``wait4``), so peaks do not mix.
The GPT-2 XL figures are computed from the shapes of a model built on the meta device (no
weights): the frozen weights, the adapters, their gradients and StripedAdamW's state, exactly;
activations are not in that sum. ``--xl_step=True`` measures a real step at block 1024, batch 1
with activation checkpointing. The tables are printed in Markdown at the end.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

SHAPE = ["--n_layer=12", "--n_head=12", "--n_embd=768", "--vocab_size=50257", "--bias=True"]
COMMON = ["--device=cpu", "--dtype=float32", "--compile=False", "--real_data=False", "--batch_size=2", "--block_size=128",
          "--warmup_steps=1", "--steps=2", "--learning_rate=1e-4"]
LORA = ["--lora_rank=8", "--lora_targets=attn"]
VARIANTS = [
    ("full, AdamW", ["--optimizer=adamw"]),
    ("full, StripedAdamW", ["--optimizer=striped_adamw"]),
    ("LoRA r=8 attn, AdamW", LORA + ["--optimizer=adamw"]),
    ("LoRA r=8 attn, StripedAdamW + activation checkpointing", LORA + ["--optimizer=striped_adamw",
                                                                    "--activation_checkpointing=True"]),
]
XL = ["--n_layer=48", "--n_head=25", "--n_embd=1600", "--vocab_size=50257", "--bias=True"]
GIB = 2 ** 30


def run_bench(args: list[str]) -> tuple[dict | None, int, str]:
    """(bench.py's JSON or None, the child's peak RSS in bytes, its last line)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "bench.py"] + args + ["--json_out=%s" % out]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    last = text.strip().splitlines()[-1] if text.strip() else ""
    res = None
    if p.returncode == 0:
        with open(out) as f:
            res = json.load(f)
    os.remove(out)
    return res, usage.ru_maxrss * 1024, last  # ru_maxrss is in KiB on Linux


def xl_bytes(rank: int = 8, targets: str = "attn") -> dict:
    """Bytes of a GPT-2 XL LoRA finetune with StripedAdamW, from the shapes alone."""
    import torch
    from nanogpt import lora
    from nanogpt.model import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024, bias=True))
    lora.apply(model, rank, 16.0, 0.0, targets, {"kind": "random"})
    frozen = [p for p in model.parameters() if not p.requires_grad]
    adapters = [p for p in model.parameters() if p.requires_grad]
    n_frozen, n_adapt = sum(p.numel() for p in frozen), sum(p.numel() for p in adapters)
    # StripedAdamW: a float32 first moment per entry, plus one float32 per row and per column of each matrix
    state = sum(4 * (p.numel() + p.shape[0] + p.shape[1]) for p in adapters)
    return {"frozen_params": n_frozen, "adapter_params": n_adapt, "frozen_fp32": 4 * n_frozen, "frozen_bf16": 2 * n_frozen,
            "adapters": 4 * n_adapt, "grads": 4 * n_adapt, "state": state,
            "full_adamw": 16 * (n_frozen + n_adapt)}  # full finetune: weights, gradients, two moments


def main(extra: list[str]) -> None:
    import torch
    xl_step = "--xl_step=True" in extra
    extra = [e for e in extra if not e.startswith("--xl_step")]
    keys = {e.split("=")[0] for e in extra}
    shape = [a for a in SHAPE if a.split("=")[0] not in keys]
    common = [a for a in COMMON if a.split("=")[0] not in keys]
    rows = []
    for name, args in VARIANTS:
        res, rss, last = run_bench(shape + common + args + extra)
        rows.append((name, res, rss, last))
        print(name, "|", last, "| peak RSS %.2f GiB" % (rss / GIB), flush=True)
    print("\ntorch %s, %d CPU threads available, %s" % (torch.__version__, os.cpu_count(), " ".join(shape + common + extra)))
    print("\n| finetune | tokens/s | optimizer state (MiB) | peak RSS (GiB) |")
    print("| --- | --- | --- | --- |")
    for name, res, rss, last in rows:
        if res is None:
            print("| %s | failed: %s | | |" % (name, last))
        else:
            print("| %s | %.0f | %.2f | %.2f |" % (name, res["tokens_per_s"], res["optimizer_state_gib"] * 1024, rss / GIB))

    b = xl_bytes()
    print("\nGPT-2 XL, LoRA rank 8 on attn, StripedAdamW (computed from the shapes, activations not included):")
    print("| part | bytes | GiB |")
    print("| --- | --- | --- |")
    total32 = b["frozen_fp32"] + b["adapters"] + b["grads"] + b["state"]
    total16 = b["frozen_bf16"] + b["adapters"] + b["grads"] + b["state"]
    for part, v in (("frozen weights, float32 (%s parameters)" % f"{b['frozen_params']:,}", b["frozen_fp32"]),
                    ("adapters, float32 (%s parameters)" % f"{b['adapter_params']:,}", b["adapters"]),
                    ("adapter gradients", b["grads"]), ("StripedAdamW state", b["state"]),
                    ("total with float32 weights", total32), ("total with the frozen weights in bfloat16", total16),
                    ("full finetune with AdamW: weights, gradients, two moments", b["full_adamw"])):
        print("| %s | %s | %.2f |" % (part, f"{v:,}", v / GIB))
    if xl_step:
        args = XL + ["--device=cpu", "--dtype=float32", "--compile=False", "--real_data=False", "--batch_size=1",
                     "--block_size=1024", "--warmup_steps=0", "--steps=1", "--optimizer=striped_adamw",
                     "--activation_checkpointing=True", "--grad_clip=0.0"] + LORA
        res, rss, last = run_bench(args)
        print("\nGPT-2 XL LoRA step, measured: %s; peak RSS %.2f GiB" % (last, rss / GIB))


if __name__ == "__main__":
    main(sys.argv[1:])
