"""llama.cpp against our model, side by side, on one prompt: logits, greedy text and tokens/s.

    python export.py --out_dir=OUT --gguf=model.gguf --gguf_type=f16
    python scripts/gguf_vs_llama_cpp.py --out_dir=OUT --gguf=model.gguf [--prompt=TEXT] [--tokens=N] [--threads=T]

Our side is nanogpt.generate (greedy, with the KV cache) in float32 on the CPU; llama.cpp's is
llama-cpp-python's Llama.generate with temperature 0, both with the same thread count. Each speed
is the best of --repeats runs of --tokens new tokens after the prompt. Needs llama-cpp-python
(scripts/install_llama_cpp.sh).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from nanogpt.checkpoint import load_for_inference  # noqa: E402
from nanogpt.generate import generate  # noqa: E402
from nanogpt.tokenizer import vocabulary_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out_dir", required=True, help="folder with the checkpoint the GGUF file was exported from")
    ap.add_argument("--gguf", required=True, help="the exported GGUF file")
    ap.add_argument("--data_root", default="data", help="where the dataset's meta.json is looked up first")
    ap.add_argument("--prompt", default="ROMEO:\n")
    ap.add_argument("--tokens", type=int, default=0, help="new tokens (default: fill the context)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from llama_cpp import Llama

    torch.set_num_threads(args.threads)
    model, train_config = load_for_inference("resume", args.out_dir)
    model.eval()
    vocab = vocabulary_for(train_config, args.data_root, model.config.vocab_size)
    ids = vocab.tokenizer.encode(args.prompt)
    n = args.tokens or model.config.block_size - len(ids)
    llm = Llama(model_path=args.gguf, n_ctx=model.config.block_size, n_batch=model.config.block_size, n_threads=args.threads,
                n_threads_batch=args.threads, logits_all=True, verbose=False)
    assert llm.tokenize(args.prompt.encode(), add_bos=False, special=True) == ids, "llama.cpp tokenizes the prompt otherwise"

    # logits on prompt + our continuation, every position
    with torch.no_grad():
        ours_ids = generate(model, torch.tensor([ids]), n, temperature=0.0, vocab_limit=vocab.limit)[0].tolist()
        ours_logits = model(torch.tensor([ours_ids[:-1]]))[0][0].numpy()
    llm.reset()
    llm.eval(ours_ids[:-1])
    theirs_logits = np.array(llm.scores[:len(ours_ids) - 1])
    diff = float(np.abs(ours_logits - theirs_logits).max())
    scale = float(np.abs(ours_logits).max())

    def ours_run():
        with torch.no_grad():
            return generate(model, torch.tensor([ids]), n, temperature=0.0, vocab_limit=vocab.limit)[0].tolist()[len(ids):]

    fast = Llama(model_path=args.gguf, n_ctx=model.config.block_size, n_batch=model.config.block_size, n_threads=args.threads,
                 n_threads_batch=args.threads, verbose=False)  # logits of the last position only, as generation needs

    def theirs_run():
        out = []
        for tok in fast.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out

    speeds, texts = {}, {}
    for name, run in (("ours", ours_run), ("llama.cpp", theirs_run)):
        best = None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            got = run()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        speeds[name], texts[name] = n / best, got
    print("model: %s (%s), prompt %r (%d tokens), %d new tokens, %d threads, torch %s"
          % (args.gguf, os.path.basename(args.out_dir), args.prompt, len(ids), n, args.threads, torch.__version__))
    print("max |logit difference| over %d positions: %.3g (largest logit %.3g)" % (len(ours_ids) - 1, diff, scale))
    same = texts["ours"] == texts["llama.cpp"]
    print("greedy text equal: %s" % same)
    if not same:
        for name in texts:
            print("  %s: %r" % (name, vocab.tokenizer.decode(texts[name])))
    else:
        print("  %r" % vocab.tokenizer.decode(texts["ours"]))
    print("| | tokens/s |\n|---|---|")
    for name in speeds:
        print("| %s | %.0f |" % (name, speeds[name]))


if __name__ == "__main__":
    main()
