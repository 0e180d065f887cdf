"""Tokenizers compared on tiny Shakespeare: compression (bytes per token) and the bits per byte
of the same small model trained with each, at the same steps and token budget.

    python scripts/tokenizer_report.py [--work=/tmp/tokenizer-report] [--iters=200] [--vocabs=4096,8192,16384]

The text is split once, at the newline nearest 90%: the BPE tokenizers are trained on the first
part only (``nanogpt prepare tokenizer``'s trainer), and every tokenizer encodes the same two
parts, each closed by ``<|endoftext|>``, so the val text is byte for byte the same for all of
them. Each model has the same transformer (n_layer, n_head, n_embd, block_size), the same batch
shape, steps, schedule and seed; only the embedding and head follow the vocabulary. Bits per
byte is eval.py's: the summed loss over the whole val split, in bits, over its UTF-8 bytes.
Tiny Shakespeare comes from the data mirror ($NANOGPT_DATA_MIRROR/tinyshakespeare/input.txt) or
``--text``. Prints a markdown table.
"""

import argparse
import os
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/tokenizer-report")
    ap.add_argument("--text", default="", help="the corpus (default: tiny Shakespeare in the data mirror)")
    ap.add_argument("--vocabs", default="4096,8192,16384")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--char", action="store_true", help="add a character-level row")
    args = ap.parse_args()

    from nanogpt.bpe import train_tokenizer
    from nanogpt.data import write_meta
    from nanogpt.evaluate import EvalConfig, evaluate
    from nanogpt.prepare import token_dtype
    from nanogpt.tokenizer import corpus_tokenizer
    from nanogpt.train import TrainConfig, train

    path = args.text or os.path.join(os.environ.get("NANOGPT_DATA_MIRROR", "../shared/data"), "tinyshakespeare", "input.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    cut = text.rfind("\n", 0, int(0.9 * len(text))) + 1
    parts = {"train": text[:cut], "val": text[cut:]}
    os.makedirs(args.work, exist_ok=True)
    train_txt = os.path.join(args.work, "train.txt")
    with open(train_txt, "w", encoding="utf-8") as f:
        f.write(parts["train"])
    nbytes = {k: len(v.encode("utf-8")) for k, v in parts.items()}

    specs = []
    for v in [int(x) for x in args.vocabs.split(",") if x]:
        folder = os.path.join(args.work, "tok-%d" % v)
        t0 = time.time()
        train_tokenizer(train_txt, v, folder, min_frequency=1, progress=False)  # 1: a small corpus still fills 16k
        print("trained %s in %.1f s" % (folder, time.time() - t0), flush=True)
        specs.append(("bpe-%dk" % (v // 1024), folder))
    specs.append(("gpt2", "gpt2"))
    if args.char:
        specs.append(("char", "char"))

    rows = []
    data_root = os.path.join(args.work, "data")
    for name, spec in specs:
        tok = corpus_tokenizer(spec, lambda: list(parts.values()))
        folder = os.path.join(data_root, name)
        os.makedirs(folder, exist_ok=True)
        dtype = token_dtype(tok.vocab_size)
        counts = {}
        for split, part in parts.items():
            ids = np.array(tok.encode_ordinary(part) + [tok.eot_token], dtype=dtype)
            ids.tofile(os.path.join(folder, split + ".bin"))
            counts[split] = len(ids) - 1
        write_meta(folder, {**tok.meta(), "dtype": dtype.name, "train_tokens": counts["train"] + 1,
                            "val_tokens": counts["val"] + 1, "max_token_id": tok.vocab_size - 1})
        out = os.path.join(args.work, "out-" + name)
        t0 = time.time()
        train(TrainConfig.parse([
            "--device=cpu", "--compile=False", "--threads=1", "--dataset=%s" % name, "--data_root=%s" % data_root,
            "--out_dir=%s" % out, "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8",
            "--gradient_accumulation_steps=1", "--max_iters=%d" % args.iters, "--lr_decay_iters=%d" % args.iters,
            "--warmup_iters=%d" % min(20, args.iters), "--learning_rate=2e-3", "--min_lr=2e-4", "--beta2=0.99", "--dropout=0.0",
            "--eval_interval=%d" % args.iters, "--eval_iters=5", "--log_interval=50", "--seed=1337",
            "--always_save_checkpoint=True"]))
        seconds = time.time() - t0
        r = evaluate(EvalConfig.parse(["--out_dir=%s" % out, "--device=cpu", "--data_root=%s" % data_root,
                                       "--batch_size=32"]))["perplexity"]
        rows.append((name, tok.vocab_size, nbytes["val"] / counts["val"], nbytes["train"] / counts["train"],
                     args.iters * 8 * 64, r["loss"], r["bpb"], seconds))
        print("done %s: vocab %d, %.3f val bytes/token, val %.4f nats/token, %.4f bits/byte, %.0f s" % (
            name, tok.vocab_size, rows[-1][2], r["loss"], r["bpb"], seconds), flush=True)

    print()
    print("| tokenizer | vocab | val bytes/token | train bytes/token | train tokens seen | val nats/token | val bits/byte | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, v, bpt_val, bpt_train, seen, loss, bpb, s in rows:
        print("| %s | %d | %.3f | %.3f | %s | %.4f | %.4f | %.0f |" % (name, v, bpt_val, bpt_train, f"{seen:,}", loss, bpb, s))


if __name__ == "__main__":
    main()
