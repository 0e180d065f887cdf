"""Does batch_mode='documents' (and doc_attention) help val loss at equal tokens?

Tiny Shakespeare from the data mirror, cut into documents at blank lines (each speech, with
its speaker's line, is one document), tokenised with GPT-2 BPE by ``nanogpt prepare corpus``
(10% of the speeches held out as val.bin, an <|endoftext|> after each). The ids that occur are
then renumbered densely (about 11.5k of GPT-2's 50,257), so a small model's output layer is
cheap enough for a CPU; the tokenisation is GPT-2's.

Each arm trains the same model for the same steps (so the same tokens: documents rows have no
padding) with train.py, per seed; then every checkpoint is scored two ways on val.bin:

- **windows**: the mean loss over fixed random windows of block_size tokens (what train.py
  reports with batch_mode='windows'); each model with the attention it trained with;
- **per document**: every val speech scored alone from its <|endoftext|>, its end included
  (the first block_size tokens of longer ones), token-weighted.

    python scripts/doc_batches_report.py --seeds=1,2,3 --max_iters=250

Prints a markdown table (mean and spread over seeds) and writes every figure to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from nanogpt import checkpoint  # noqa: E402
from nanogpt.data import BatchLoader, load_meta, write_meta  # noqa: E402
from nanogpt.doc_batches import DocumentLoader  # noqa: E402
from nanogpt.prepare import prepare_corpus  # noqa: E402
from nanogpt.train import TrainConfig, train  # noqa: E402

ARMS = {"windows": ["--batch_mode=windows"], "documents": ["--batch_mode=documents"],
        "documents + doc_attention": ["--batch_mode=documents", "--doc_attention=True"]}


def prepare(root: str, mirror: str) -> dict:
    """data/speeches: GPT-2 BPE of the speeches, ids renumbered densely."""
    out = os.path.join(root, "speeches")
    if os.path.isfile(os.path.join(out, "meta.json")):
        return load_meta(out)
    with open(os.path.join(mirror, "tinyshakespeare", "input.txt"), encoding="utf-8") as f:
        speeches = [s.strip() for s in f.read().split("\n\n") if s.strip()]
    raw = os.path.join(root, "speeches_gpt2")
    os.makedirs(raw, exist_ok=True)
    source = os.path.join(raw, "speeches.jsonl")
    with open(source, "w", encoding="utf-8") as f:
        for s in speeches:
            f.write(json.dumps({"text": s}) + "\n")
    meta = prepare_corpus(raw, source, val_fraction=0.1, num_proc=1, mirror=mirror)
    splits = {s: np.fromfile(os.path.join(raw, s + ".bin"), dtype=meta["dtype"]) for s in ("train", "val")}
    used = np.unique(np.concatenate(list(splits.values())))
    new_id = np.zeros(int(used.max()) + 1, dtype=np.int64)
    new_id[used] = np.arange(len(used))
    os.makedirs(out, exist_ok=True)
    for s, ids in splits.items():
        new_id[ids].astype(np.uint16).tofile(os.path.join(out, s + ".bin"))
    dense = {"vocab_size": int(len(used)), "dtype": "uint16", "eot_token": int(new_id[meta["eot_token"]]),
             "train_tokens": int(len(splits["train"])), "val_tokens": int(len(splits["val"])),
             "documents": meta["documents"], "source": "tinyshakespeare speeches, GPT-2 BPE renumbered densely"}
    write_meta(out, dense)
    return load_meta(out)


def val_documents(root: str, meta: dict, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per val document: inputs [eot, tokens...], targets [tokens..., eot], cut at
    ``block`` positions, padded with ignored targets."""
    ids = np.fromfile(os.path.join(root, "speeches", "val.bin"), dtype=np.uint16).astype(np.int64)
    eot = meta["eot_token"]
    ends = np.flatnonzero(ids == eot)
    starts = np.concatenate(([0], ends[:-1] + 1))
    xs, ys = [], []
    for a, b in zip(starts, ends):
        if b <= a:
            continue
        seq = np.concatenate(([eot], ids[a:b], [eot]))
        x, y = seq[:-1][:block], seq[1:][:block]
        pad = block - len(x)
        xs.append(np.concatenate((x, np.full(pad, 1))))
        ys.append(np.concatenate((y, np.full(pad, -1))))
    return torch.tensor(np.array(xs)), torch.tensor(np.array(ys))


@torch.no_grad()
def score(model, batches) -> float:
    """Token-weighted mean loss over (x, y) batches (targets of -1 ignored)."""
    total, count = 0.0, 0
    for x, y in batches:
        logits, _ = model(x, y)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-1,
                                                 reduction="sum")
        total += float(loss)
        count += int((y >= 0).sum())
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--max_iters", type=int, default=250)
    ap.add_argument("--work", default="", help="folder for the data and checkpoints (default: a temporary one)")
    ap.add_argument("--mirror", default=os.environ.get("NANOGPT_DATA_MIRROR", "../shared/data"))
    ap.add_argument("--windows_batches", type=int, default=40, help="val windows batches (of batch_size rows)")
    ap.add_argument("--json", default="")
    ap.add_argument("--extra", default="", help="more train.py arguments, space-separated")
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="doc_batches_")
    root = os.path.join(work, "data")
    meta = prepare(root, a.mirror)
    model_args = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8", "--dropout=0.0",
                  "--gradient_accumulation_steps=1", "--learning_rate=2e-3", "--min_lr=2e-4", "--warmup_iters=30",
                  "--weight_decay=0.1", "--bias=False"]
    common = ["--device=cpu", "--compile=False", "--dataset=speeches", "--data_root=%s" % root, "--max_iters=%d" % a.max_iters,
              "--lr_decay_iters=%d" % a.max_iters, "--eval_interval=%d" % a.max_iters, "--eval_iters=2", "--log_interval=%d" % a.max_iters,
              "--always_save_checkpoint=True", *model_args, *a.extra.split()]
    cfg = TrainConfig.parse(common)
    block, batch = cfg.block_size, cfg.batch_size
    docs_x, docs_y = val_documents(root, meta, block)
    doc_batches = [(docs_x[i:i + 64], docs_y[i:i + 64]) for i in range(0, len(docs_x), 64)]
    val = BatchLoader(os.path.join(root, "speeches"), "val", batch, block, "cpu", 1234)
    window_batches = [val.next() for _ in range(a.windows_batches)]
    packer = DocumentLoader(os.path.join(root, "speeches"), "train", batch, block, "cpu", 0, eot=meta["eot_token"],
                            buffer=cfg.doc_buffer)
    for _ in range(100):
        packer.next()
    kept = 100 * batch * (block + 1)
    print("documents mode drops %.1f%% of the document tokens it takes up (cropping), at doc_buffer=%d"
          % (100 * packer.generator.cropped / (packer.generator.cropped + kept), cfg.doc_buffer))
    print("data: %d train / %d val tokens, %d val documents, vocabulary %d (renumbered), eot %d; %d steps x %d tokens"
          % (meta["train_tokens"], meta["val_tokens"], len(docs_x), meta["vocab_size"], meta["eot_token"], a.max_iters,
             block * batch), flush=True)
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for arm, extra in ARMS.items():
            out = os.path.join(work, "out", "%s-%d" % (arm.replace(" + ", "+"), seed))
            t0 = time.time()
            s = train(TrainConfig.parse(common + extra + ["--seed=%d" % seed, "--out_dir=%s" % out, "--overwrite=True"]))
            model, _ = checkpoint.load_model(os.path.join(out, "ckpt.pt"))
            model.eval()
            if "--doc_attention=True" in extra:
                model.doc_attention = (meta["eot_token"], "dense")
            row = {"arm": arm, "seed": seed, "seconds": round(time.time() - t0, 1), "tokens": s["tokens_seen"],
                   "windows_val": score(model, window_batches), "document_val": score(model, doc_batches),
                   "last_train_loss": s["last_train_loss"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "train_args": common, "rows": rows}, f, indent=1)
    print("\n| batches | val loss, windows | val loss, per document | runs |\n| --- | --- | --- | --- |")
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        cell = lambda k: "%.4f ± %.4f" % (np.mean([r[k] for r in mine]), np.std([r[k] for r in mine]))  # noqa: E731
        print("| %s | %s | %s | %d seeds: %s |" % (arm, cell("windows_val"), cell("document_val"), len(mine),
                                                   ", ".join("%.4f" % r["document_val"] for r in mine)))


if __name__ == "__main__":
    main()
