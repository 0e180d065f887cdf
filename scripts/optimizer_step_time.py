"""Time ``optimizer.step()`` alone on a model shape (default GPT-2 XL) with random gradients, on
CUDA: fused AdamW against StripedAdamW one parameter at a time, multi-tensor (foreach), and with
its matrices through the Triton kernels (fused=True, when triton is installed).

    python scripts/optimizer_step_time.py [--n_layer=48 --n_head=25 --n_embd=1600] [--steps=20]

Prints ms per step (median of --steps after 3 warm-up steps) and the extra memory each step
allocates above the weights, gradients and state, in Markdown.
"""

import statistics
import sys

import torch

from nanogpt.model import GPT, GPTConfig
from nanogpt.optim import StripedAdamW, param_groups


def main(argv):
    kw = dict(n_layer=48, n_head=25, n_embd=1600, vocab_size=50257, block_size=1024, bias=True)
    steps = 20
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__)
            return
        k, v = a.lstrip("-").split("=")
        if k == "steps":
            steps = int(v)
        else:
            kw[k] = int(v)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(GPTConfig(**kw))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    groups = param_groups(model, 0.1)
    variants = [
        ("AdamW (fused)", lambda: torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)),
        ("StripedAdamW, one parameter at a time", lambda: StripedAdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=False)),
        ("StripedAdamW, multi-tensor", lambda: StripedAdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=True)),
    ]
    try:
        import triton  # noqa: F401
        variants.append(("StripedAdamW, Triton matrices (fused=True)",
                         lambda: StripedAdamW(groups, lr=1e-4, betas=(0.9, 0.95), foreach=True, fused=True)))
    except ImportError:
        print("triton is not installed: no row for the fused step")
    print("model: %.0fM parameters, torch %s, %s" % (sum(p.numel() for p in model.parameters()) / 1e6,
                                                     torch.__version__, torch.cuda.get_device_name()))
    print("\n| optimizer | step (ms, median) | extra memory during the step (GiB) |")
    print("| --- | --- | --- |")
    for name, make in variants:
        opt = make()
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            opt.step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        print("| %s | %.1f | %.2f |" % (name, statistics.median(times), extra), flush=True)
        del opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
