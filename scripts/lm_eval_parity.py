"""The lm-eval adapter against a second scorer, request by request, on local tasks cut from a text
file: lm-eval's own ``hf`` backend on an exported folder (``--hf_dir``), or eval.py's scoring with
``--definitions=lm_eval`` (for models that cannot be exported).

    python scripts/lm_eval_parity.py --out_dir=out-shakespeare-char-cpu --text=data/shakespeare_char/input.txt
    python scripts/lm_eval_parity.py --out_dir=out-gpt2 --text=data/shakespeare/input.txt --hf_dir=out-gpt2-hf

Three tasks are written into a temporary folder: a multiple-choice task (a passage, its true
continuation among three from elsewhere in the text), a rolling-perplexity task (passages as
documents) and, against the ``hf`` backend, a greedy generation task. Printed: the largest
absolute difference of the log-likelihoods, whether acc / acc_norm / acc_bytes are equal, and how
many generations are identical.
"""

import argparse
import json
import os
import random
import tempfile
from contextlib import nullcontext

import numpy as np

TASKS = {  # name -> (output_type, the rest of its YAML)
    "nano_mc": ("multiple_choice", 'doc_to_text: "{{ctx}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{endings}}"\n'
                "metric_list: [{metric: acc}, {metric: acc_norm}, {metric: acc_bytes}]\n"),
    "nano_roll": ("loglikelihood_rolling", 'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list: [{metric: bits_per_byte}]\n'),
    "nano_gen": ("generate_until", 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                 'generation_kwargs: {until: ["\\n\\n"], max_gen_toks: 32, do_sample: false}\n'
                 "metric_list: [{metric: exact_match}]\n"),
}


def write_tasks(folder: str, rows: dict) -> None:
    """Each task's YAML and its data (jsonl) in ``folder``."""
    for name, docs in rows.items():
        data = os.path.join(folder, name + ".jsonl")
        with open(data, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
        kind, rest = TASKS[name]
        with open(os.path.join(folder, name + ".yaml"), "w", encoding="utf-8") as f:
            f.write("task: %s\ndataset_path: json\ndataset_kwargs: {data_files: {test: %s}}\ntest_split: test\n"
                    "output_type: %s\n%s" % (name, json.dumps(data), kind, rest))


def harness(model: str, model_args: str, folder: str, tasks: list) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager
    import nanogpt.lm_eval_adapter  # noqa: F401  registers "nanogpt"
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=folder, include_defaults=False))


def responses(out: dict, task: str) -> list:
    """Each request's answer in document order."""
    rows = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [r[0] for s in rows for r in s["resps"]]


def cut_tasks(text: str, n: int, seed: int = 0):
    """(multiple-choice docs, rolling documents, generation prompts) from the last tenth of the text."""
    rng = random.Random(seed)
    text = text[int(0.9 * len(text)):]
    mc, docs, prompts = [], [], []
    for i in range(n):
        s = rng.randrange(0, len(text) - 1200)
        ctx, true = text[s:s + 160], text[s + 160:s + 160 + rng.randrange(20, 60)]
        others = [text[o:o + rng.randrange(20, 60)] for o in (rng.randrange(0, len(text) - 100) for _ in range(3))]
        endings = others[:]
        label = rng.randrange(4)
        endings.insert(label, true)
        mc.append({"ctx": ctx.rstrip(" "), "endings": [e.strip() or "." for e in endings], "label": label})
        docs.append(text[s:s + 1000])
        prompts.append({"prompt": text[s:s + 120], "answer": ""})
    return mc, docs, prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--data_root", default="data")
    ap.add_argument("--text", required=True, help="a UTF-8 text file to cut the tasks from")
    ap.add_argument("--hf_dir", default="", help="the exported folder: compare with lm-eval's hf backend")
    ap.add_argument("--n", type=int, default=50, help="documents per task")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--mask_padding", default="True", choices=("True", "False"),
                    help="the adapter's mask_padding (False scores padded vocabulary rows, as the hf backend)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for both scorers (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    from nanogpt import scoring
    from nanogpt.checkpoint import load_for_inference
    from nanogpt.tokenizer import vocabulary_for

    with open(args.text, encoding="utf-8") as f:
        mc, docs, prompts = cut_tasks(f.read(), args.n)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"nano_mc": mc, "nano_roll": [{"text": d} for d in docs]}
        if args.hf_dir:
            rows["nano_gen"] = prompts
        write_tasks(tmp, rows)
        folder, tasks = tmp, list(rows)
        ours = harness("nanogpt", "out_dir=%s,data_root=%s,device=cpu,batch_size=%d,threads=%d,mask_padding=%s" % (
            args.out_dir, args.data_root, args.batch_size, args.threads, args.mask_padding), folder, tasks)
        if args.hf_dir:
            other = "lm-eval hf backend on %s" % args.hf_dir
            theirs = harness("hf", "pretrained=%s,device=cpu,batch_size=%d,dtype=float32" % (args.hf_dir, args.batch_size),
                             folder, tasks)
            mc_theirs = [lp for lp, _ in responses(theirs, "nano_mc")]
            roll_theirs = responses(theirs, "nano_roll")
            bpb_theirs = theirs["results"]["nano_roll"]["bits_per_byte,none"]
            acc_theirs = tuple(theirs["results"]["nano_mc"][k + ",none"] for k in ("acc", "acc_norm", "acc_bytes"))
        else:  # eval.py's own scoring, lm-eval's definitions
            other = "eval.py --definitions=lm_eval"
            model, train_config = load_for_inference("resume", args.out_dir)
            model.eval()
            vocab = vocabulary_for(train_config, args.data_root, model.config.vocab_size)
            hs = os.path.join(tmp, "hs.jsonl")
            with open(hs, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(d) + "\n" for d in mc)
            r = scoring.hellaswag(model, hs, vocab.tokenizer, "cpu", nullcontext(), model.config.block_size,
                                  args.batch_size, progress=False, details=True, definitions="lm_eval")
            mc_theirs = [lp for e in r["examples"] for lp in e["logprob"]]
            acc_theirs = (r["acc"], r["acc_norm"], r["acc_bytes"])
            roll_theirs = []
            for d in docs:
                ids = np.array(vocab.tokenizer.encode(d))
                p = scoring.perplexity(model, ids, vocab.tokenizer, "cpu", nullcontext(), model.config.block_size,
                                       model.config.block_size, args.batch_size, progress=False, definitions="lm_eval")
                roll_theirs.append(-p["loss"] * p["tokens"])
            bpb_theirs = -sum(roll_theirs) / np.log(2) / sum(len(d.encode("utf-8")) for d in docs)
            base = scoring.hellaswag(model, hs, vocab.tokenizer, "cpu", nullcontext(), model.config.block_size,
                                     args.batch_size, progress=False, definitions="nanogpt")
            print("eval.py default definitions on the same task: acc %.4f | acc_norm (per token) %.4f | acc_bytes %.4f"
                  % (base["acc"], base["acc_norm"], base["acc_bytes"]))
        mc_ours = [lp for lp, _ in responses(ours, "nano_mc")]
        roll_ours = responses(ours, "nano_roll")
        acc_ours = tuple(ours["results"]["nano_mc"][k + ",none"] for k in ("acc", "acc_norm", "acc_bytes"))
        print("adapter (mask_padding=%s) vs %s, %d docs per task" % (args.mask_padding, other, args.n))
        print("| task | requests | max abs diff of log-likelihood | metrics (adapter / other) |")
        print("| --- | --- | --- | --- |")
        print("| multiple choice | %d | %.3g | acc/acc_norm/acc_bytes %s / %s: %s |" % (
            len(mc_ours), np.max(np.abs(np.array(mc_ours) - mc_theirs)), "/".join("%.2f" % a for a in acc_ours),
            "/".join("%.2f" % a for a in acc_theirs), "equal" if acc_ours == acc_theirs else "DIFFERENT"))
        print("| loglikelihood_rolling | %d | %.3g | bits_per_byte %.5f / %.5f |" % (
            len(roll_ours), np.max(np.abs(np.array(roll_ours) - roll_theirs)),
            ours["results"]["nano_roll"]["bits_per_byte,none"], bpb_theirs))
        if args.hf_dir:
            a, b = responses(ours, "nano_gen"), responses(theirs, "nano_gen")
            print("| generate_until (greedy) | %d | - | %d of %d texts identical |" % (len(a), sum(x == y for x, y in zip(a, b)), len(a)))


if __name__ == "__main__":
    main()
