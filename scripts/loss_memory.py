"""Memory and time of one training forward + backward, with the full logits or in chunks
(``loss_chunk``), and optionally the same step of a reference nanoGPT checkout's model.

Each variant runs in a fresh process. Reported: the rise in peak memory during the first step
over the memory held just before it (on the CPU the resident set: Linux's peak counter is reset
before the step; on CUDA ``max_memory_allocated``), and the time of the step (the median of
``--steps`` after that first one). CPU and CUDA only.

    python scripts/loss_memory.py --device=cpu --reference=path/to/nanoGPT
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no %s" % field)


def reset_rss_peak() -> int:
    """Reset Linux's peak resident set to the current one (clear_refs 5) and return it in bytes;
    where that is not possible, the peak so far (the rise measured from it can only be lower)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_peak_bytes() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, RuntimeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(args) -> dict:
    torch.manual_seed(0)
    shape = dict(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                 n_embd=args.n_embd, dropout=0.0, bias=False)
    if args.variant == "reference":
        sys.path.insert(0, os.path.abspath(args.reference))
        from model import GPT as RefGPT, GPTConfig as RefConfig  # the reference checkout's model.py
        model = RefGPT(RefConfig(**shape))
    else:
        from nanogpt.model import GPT, GPTConfig
        model = GPT(GPTConfig(**shape))
        model.loss_chunk = int(args.variant.split("=")[1]) if args.variant.startswith("chunk=") else 0
    model.to(args.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(args.vocab_size, (args.batch_size, args.block_size), generator=gen).to(args.device)
    y = torch.randint(args.vocab_size, (args.batch_size, args.block_size), generator=gen).to(args.device)
    cuda = args.device.startswith("cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with amp:
            _, loss = model(x, y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = reset_rss_peak()
    loss = step()
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_peak_bytes()) - before
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"variant": args.variant, "loss": loss, "peak_rise_gib": peak / 2**30, "ms": 1000 * statistics.median(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference", default=None, help="a nanoGPT checkout to time as well")
    ap.add_argument("--chunks", default="1024,4096", help="loss_chunk values to try, comma separated")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--block_size", type=int, default=1024)
    ap.add_argument("--vocab_size", type=int, default=50304)
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--n_head", type=int, default=12)
    ap.add_argument("--n_embd", type=int, default=768)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # set in the child processes
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    variants = (["reference"] if args.reference else []) + ["full"] + ["chunk=%s" % c for c in args.chunks.split(",") if c]
    print("torch %s, %s, batch %d x %d, vocab %d, %d layers x %d wide; logits in float32 would be %.2f GiB"
          % (torch.__version__, args.device, args.batch_size, args.block_size, args.vocab_size, args.n_layer, args.n_embd,
             args.batch_size * args.block_size * args.vocab_size * 4 / 2**30))
    print("| variant | loss | peak memory rise in the step | ms per forward + backward |")
    print("| --- | --- | --- | --- |")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        sys.exit("--device must be cpu or cuda: peak memory is measured only there")
    for v in variants:
        r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant=%s" % v], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit("variant %s failed:\n%s" % (v, r.stderr[-2000:]))
        out = json.loads(r.stdout.strip().splitlines()[-1])
        print("| %s | %.4f | %.2f GiB | %.0f |" % (v, out["loss"], out["peak_rise_gib"], out["ms"]), flush=True)


if __name__ == "__main__":
    main()
