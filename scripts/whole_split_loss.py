"""Mean loss of a checkpoint over a whole token split, every token after the first scored once
in non-overlapping windows of the model's context: the same measure for this project's
checkpoints and for a reference nanoGPT checkout's (run with that checkout's own model code).

    python scripts/whole_split_loss.py OUT_DIR data/shakespeare_char/val.bin
    python scripts/whole_split_loss.py REF_OUT_DIR data/shakespeare_char/val.bin --reference=path/to/nanoGPT
"""

import argparse
import json
import os
import sys

import numpy as np
import torch


def load(out_dir: str, reference: str | None):
    path = os.path.join(out_dir, "ckpt.pt")
    if reference is None:
        from nanogpt.checkpoint import load_model
        model, _ = load_model(path)
        return model
    sys.path.insert(0, os.path.abspath(reference))
    from model import GPT, GPTConfig  # the reference checkout's own model.py
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    return model


@torch.no_grad()
def split_loss(model, tokens: np.ndarray, block: int, batch: int = 64) -> float:
    data = torch.from_numpy(tokens.astype(np.int64))
    n = (len(data) - 1) // block  # full windows; the rest is one shorter window
    windows = [(s, block) for s in range(0, n * block, block)]
    if n * block < len(data) - 1:
        windows.append((n * block, len(data) - 1 - n * block))
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        group = windows[i:i + batch]
        for length in sorted({w for _, w in group}):  # one batch per window length
            rows = [s for s, w in group if w == length]
            x = torch.stack([data[s:s + length] for s in rows])
            y = torch.stack([data[s + 1:s + 1 + length] for s in rows])
            _, loss = model(x, y)
            total += loss.item() * x.numel()
            count += x.numel()
    return total / count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("bin")
    ap.add_argument("--reference", default=None, help="a nanoGPT checkout whose model.py wrote the checkpoint")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load(args.out_dir, args.reference).eval()
    meta = os.path.join(os.path.dirname(os.path.abspath(args.bin)), "meta.json")
    dtype = "uint16"
    if os.path.isfile(meta):  # this project's datasets say how wide their ids are
        with open(meta) as f:
            dtype = json.load(f).get("dtype", dtype)
    tokens = np.memmap(args.bin, dtype=np.dtype(dtype), mode="r")
    loss = split_loss(model, np.asarray(tokens), model.config.block_size)
    print("%.4f (%d tokens scored)" % (loss, len(tokens) - 1))


if __name__ == "__main__":
    main()
