"""Tokens per second of generation for a model shape (default GPT-2 124M, random weights):
re-running the whole prefix for each token, the key/value cache run eagerly, and the cache
with its one-token step replayed as a CUDA graph (the default on CUDA). With --reference, the
same shape built from a nanoGPT checkout's model.py is timed first, with its own generate.

    python scripts/sampling_speed.py [--new=1024] [--batch=1,8] [--dtype=bfloat16] [--device=cuda] [--reference=PATH]
"""

import contextlib
import functools
import os
import sys
import time

import torch

from nanogpt import runtime
from nanogpt.generate import generate as ours
from nanogpt.model import GPT, GPTConfig


def main(argv):
    opts = {"new": "1024", "batch": "1,8", "dtype": "bfloat16", "device": "cuda", "n_layer": "12", "n_head": "12",
            "n_embd": "768", "reference": ""}
    for a in argv:
        k, v = a.lstrip("-").split("=")
        opts[k] = v
    device = opts["device"]
    dt = getattr(torch, opts["dtype"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=int(opts["n_layer"]), n_head=int(opts["n_head"]), n_embd=int(opts["n_embd"]),
                          vocab_size=50257, block_size=1024)).to(device).eval()
    if device.startswith("cuda"):  # as sample.py does: weights in the sampling dtype, no autocast
        model.to(dt)
        ctx = contextlib.nullcontext()
    else:
        ctx = torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32)
    new = int(opts["new"])
    print("torch %s, %s, %s, %d new tokens after a 1-token prompt" % (
        torch.__version__, torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", opts["dtype"], new))
    print("\n| batch | path | tokens/s (all sequences) | ms per step | speed-up over the first row |")
    print("| --- | --- | --- | --- | --- |")
    shape = dict(n_layer=int(opts["n_layer"]), n_head=int(opts["n_head"]), n_embd=int(opts["n_embd"]), vocab_size=50257,
                 block_size=1024)
    ref = None
    if opts["reference"]:
        sys.path.insert(0, os.path.abspath(opts["reference"]))
        from model import GPT as RefGPT, GPTConfig as RefConfig  # the reference checkout's own model.py
        ref = RefGPT(RefConfig(**shape, bias=True, dropout=0.0)).to(device).eval()
        if device.startswith("cuda"):
            ref.to(dt)
    def seconds(generate, idx, **kw):
        """Wall time of generating ``new`` tokens after a 16-token warm-up call."""
        with torch.no_grad(), ctx:
            generate(idx, 16, temperature=1.0, top_k=200, **kw)
            runtime.synchronize(device.split(":")[0])
            t0 = time.perf_counter()
            generate(idx, new, temperature=1.0, top_k=200, **kw)
            runtime.synchronize(device.split(":")[0])
            return time.perf_counter() - t0

    rows = [("no cache", dict(use_cache=False)), ("cache, eager", dict(cuda_graph=False))]
    if device.startswith("cuda"):
        rows += [("cache, CUDA graph", dict()), ("cache, compiled step in a CUDA graph", dict())]
    for batch in [int(b) for b in opts["batch"].split(",")]:
        idx = torch.zeros(batch, 1, dtype=torch.long, device=device)
        base = None
        timed = [("reference (no cache)", ref.generate, {})] if ref is not None else []
        mine = functools.partial(ours, model)
        timed += [(name, mine, kw) for name, kw in rows]
        for name, generate, kw in timed:
            if generate is mine:
                step = GPT.decode_step.__get__(model)
                model.decode_step = torch.compile(step, dynamic=False) if "compiled" in name else step
            sec = seconds(generate, idx, **kw)
            tps = batch * new / sec
            base = base or tps
            print("| %d | %s | %.1f | %.2f | %.1fx |" % (batch, name, tps, 1000 * sec / new, tps / base), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
