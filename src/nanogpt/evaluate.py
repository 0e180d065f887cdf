"""Evaluation: ``python eval.py --out_dir=out-shakespeare-char`` or ``--init_from=gpt2 --hellaswag=PATH``.

Perplexity and bits per byte of a dataset split or a text file, zero-shot HellaSwag-format
multiple choice and LAMBADA last-word accuracy of a checkpoint or GPT-2 weights; the definitions
are in scoring.py (``--definitions=lm_eval`` gives lm-evaluation-harness's). On chat data
(`nanogpt prepare chat`) it also reports the masked loss: the assistant tokens of the held-out
conversations only, the loss SFT trains. ``--lm_eval_tasks`` runs lm-evaluation-harness's own
tasks on the same model (lm_eval_adapter.py).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from . import runtime
from .checkpoint import load_for_inference
from .config import Config, Section, check_init_from, check_path, setting
from .data import Tokens, chat_files, dataset_dir, is_chat, load_meta, prepare_hint, token_count
from .errors import ConfigError, DataError, UserError, run_command
from .runtime import RuntimeConfig
from .scoring import DEFINITIONS, DOWNLOADS, chat_loss, encode_file, hellaswag, lambada, perplexity
from .tokenizer import vocabulary_for


@dataclass
class EvalSettings(Section):
    """What eval.py scores, and on which model."""

    init_from: str = setting("resume", "'resume' (from out_dir/ckpt.pt), a GPT-2 name ('gpt2', ..., 'gpt2-xl') or a local Hugging Face folder.")
    out_dir: str = setting("out", "Folder holding ckpt.pt when init_from='resume'.")
    dataset: str = setting("", "Perplexity on data_root/dataset/{split}.bin; when nothing else is chosen, the training run's dataset.")
    data_root: str = setting("data", "Folder that holds the dataset folders (and the character vocabulary of a char-level run).")
    split: str = setting("val", "Token file of the dataset to read: 'val' or 'train'.")
    text_file: str = setting("", "Perplexity on a UTF-8 text file, tokenised with the model's tokenizer.", path="text")
    block_size: int = setting(0, "Window length for perplexity and the longest input for the tasks (0 = the model's context).", ge=0)
    stride: int = setting(0, "Step between perplexity windows (0 = the window length: no overlap); smaller gives each scored token more context.", ge=0)
    batch_size: int = setting(8, "Windows (perplexity) or scored continuations (tasks) per forward pass.", gt=0)
    max_tokens: int = setting(0, "Read only the first max_tokens tokens of the data or text (0 = all).", ge=0)
    hellaswag: str = setting("", "HellaSwag-format jsonl (ctx, endings, label) to score zero-shot, or 'download' (needs --sha256).")
    lambada: str = setting("", "LAMBADA-format jsonl (one {'text': ...} per line) for last-word accuracy, or 'download'.")
    limit: int = setting(0, "Score only the first limit examples of hellaswag and lambada (0 = all).", ge=0)
    sha256: str = setting("", "Expected sha256 of a file fetched with 'download' (required for hellaswag, which has no pinned checksum).")
    cache_dir: str = setting("", "Where downloaded task files are kept ('' = data_root/eval).", path="out")
    mirror: str = setting("", "Local folder mirroring the task files (hellaswag/hellaswag_val.jsonl, lambada/lambada_test.jsonl); default $NANOGPT_DATA_MIRROR.",
                          path="dir")
    json_out: str = setting("", "Also write the results as JSON to this file (written atomically).")
    definitions: str = setting("nanogpt", "How perplexity and the tasks are scored: 'nanogpt' (acc_norm per token; windows of block_size by stride, the first token context only) or 'lm_eval' (as lm-evaluation-harness 0.4: context and ending tokenised together, acc_norm per character; its rolling windows, the first token scored after <|endoftext|>).",
                               choices=DEFINITIONS)
    lm_eval_tasks: str = setting("", "lm-evaluation-harness tasks to run on the model, comma-separated (e.g. 'hellaswag,lambada_openai,arc_easy'); needs pip install 'nanogpt[eval]'.")
    lm_eval_limit: int = setting(0, "Run only the first lm_eval_limit examples of each lm-eval task (0 = all).", ge=0)
    lm_eval_fewshot: int = setting(-1, "Few-shot examples for the lm-eval tasks (-1 = each task's own default).", ge=-1)
    lm_eval_include: str = setting("", "A folder of extra lm-eval task YAML files (local tasks, no download).", path="dir")
    lm_eval_builtin: bool = setting(True, "Also look up lm-eval's own task definitions (False: only lm_eval_include's, which starts faster).")

    def check(self) -> None:
        check_init_from(self.init_from, ("resume",))
        if self.definitions == "lm_eval" and self.stride:
            raise ConfigError("stride applies to definitions='nanogpt' only: lm-eval's rolling windows do not overlap; "
                              "drop --stride or use --definitions=nanogpt")
        tasks = [t.strip() for t in self.lm_eval_tasks.split(",") if t.strip()]
        if len(set(tasks)) < len(tasks):
            raise ConfigError("lm_eval_tasks names a task twice: %r" % self.lm_eval_tasks)
        if not tasks and (self.lm_eval_limit or self.lm_eval_include or self.lm_eval_fewshot != -1):
            raise ConfigError("lm_eval_limit, lm_eval_fewshot and lm_eval_include need --lm_eval_tasks=TASK,...")
        if not self.lm_eval_builtin and not self.lm_eval_include:
            raise ConfigError("lm_eval_builtin=False needs --lm_eval_include=FOLDER: no task would be known")
        if self.max_tokens == 1:
            raise ConfigError("max_tokens must be 0 (all) or at least 2: the first token is context only")
        if self.block_size and self.stride > self.block_size:
            raise ConfigError("stride (%d) must not exceed block_size (%d): tokens between windows would go unscored"
                              % (self.stride, self.block_size))
        if self.dataset and self.text_file:
            raise ConfigError("set dataset or text_file, not both: one perplexity source per run")
        if not self.split or os.sep in self.split or "/" in self.split:
            raise ConfigError("split must be the name of a token file such as 'val' or 'train'; got %r" % self.split)
        for k in ("hellaswag", "lambada"):
            v = getattr(self, k)
            if v and v != "download":
                if not os.path.exists(v):
                    raise ConfigError("%s=%r: no such file; give a local jsonl file or 'download'" % (k, v))
                check_path(k, v, "text")
        if self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256.lower())):
            raise ConfigError("sha256 must be 64 hexadecimal digits; got %r" % self.sha256)
        if self.sha256 and self.hellaswag == "download" and self.lambada == "download":
            raise ConfigError("sha256 is ambiguous with both hellaswag=download and lambada=download; download one at a time")
        if self.json_out:
            if os.path.isdir(self.json_out):
                raise ConfigError("json_out=%r is a folder; give a file name" % self.json_out)
            check_path("json_out", os.path.dirname(os.path.abspath(self.json_out)), "out")


class EvalConfig(Config):
    """Every key of eval.py."""

    sections = (("eval", EvalSettings), ("runtime", RuntimeConfig))
    defaults = {"compile": False}

def same_vocabulary(meta: dict | None, tokenizer) -> bool:
    """Whether token files described by ``meta`` use ``tokenizer``'s ids."""
    if meta and "stoi" in meta:
        return dict(getattr(tokenizer, "stoi", {})) == dict(meta["stoi"])
    if meta and meta.get("tokenizer_json") is not None:
        return getattr(tokenizer, "json", None) == meta["tokenizer_json"]
    if hasattr(tokenizer, "stoi") or hasattr(tokenizer, "json"):
        return False
    name = (meta or {}).get("tokenizer") or "gpt2"
    return getattr(getattr(tokenizer, "enc", None), "name", "gpt2") == (name if name != "char" else "gpt2")


def vocabulary_label(meta: dict | None) -> str:
    if meta and "stoi" in meta:
        return "a character vocabulary"
    if meta and meta.get("tokenizer_json") is not None:
        return "a trained BPE of %s tokens (sha256 %s...)" % (meta.get("vocab_size"), str(meta.get("tokenizer_sha256", ""))[:12])
    return "BPE %r" % ((meta or {}).get("tokenizer") or "gpt2")


def split_tokens(dataset: str, roots, split: str, tokenizer, max_tokens: int):
    """The token file ``<root>/<dataset>/<split>.bin`` of the first root that has the dataset, as
    a read-only memory map, and its path."""
    roots = [r for r in roots if r]
    folder = next((dataset_dir(r, dataset) for r in roots if os.path.isdir(dataset_dir(r, dataset))), None)
    if folder is None:
        raise DataError("dataset %r not found under %s; %s" % (dataset, " or ".join(map(repr, roots)), prepare_hint(dataset)))
    meta = load_meta(folder)
    if not same_vocabulary(meta, tokenizer):
        kind = vocabulary_label(meta)
        mine = ("a character vocabulary" if hasattr(tokenizer, "stoi") else
                "a trained BPE of %d tokens" % tokenizer.vocab_size if hasattr(tokenizer, "json") else "GPT-2 BPE")
        raise DataError("dataset %r is tokenised with %s but the model reads %s; evaluate a model trained on it, "
                        "or use --text_file" % (dataset, kind, mine))
    if (meta or {}).get("shards") is not None:  # a sharded split: read through Tokens, a slice at a time
        data = Tokens(folder, split, meta, dataset)
        if data.n < 2:
            raise DataError("%s holds fewer than 2 tokens; %s" % (data.path, prepare_hint(dataset)))
        return (data[:max_tokens] if max_tokens else data), data.path
    path = os.path.join(folder, "%s.bin" % split)
    if not os.path.isfile(path):
        raise DataError("dataset %r has no %s.bin (looked for %s); %s" % (dataset, split, path, prepare_hint(dataset)))
    dtype = (meta or {}).get("dtype", "uint16")
    if token_count(path, dtype, meta, split) < 2:
        raise DataError("%s holds fewer than 2 tokens; %s" % (path, prepare_hint(dataset)))
    data = np.memmap(path, dtype=dtype, mode="r")
    return (data[:max_tokens] if max_tokens else data), path


def task_file(task: str, value: str, cfg: EvalConfig) -> str:
    """The local path of a task file: ``value`` itself, or for ``download`` the checked copy in
    the cache folder (fetched from the mirror or the public address when missing)."""
    if value != "download":
        return value
    from .download import fetch
    url, sha256, relpath = DOWNLOADS[task]
    sha256 = cfg.sha256.lower() or sha256
    if not sha256:
        raise ConfigError("%s=download needs --sha256=<sha256 of %s>: no published checksum is pinned for that file; "
                          "or fetch it yourself and pass --%s=PATH" % (task, os.path.basename(url), task))
    dest = os.path.join(cfg.cache_dir or os.path.join(cfg.data_root, "eval"), os.path.basename(url))
    return fetch(url, dest, sha256, relpath, cfg.mirror or None)


def _write_json(path: str, obj: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = "%s.tmp%d" % (path, os.getpid())
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------
# command line


def evaluate(cfg: EvalConfig) -> dict:
    """Score the model ``cfg`` names; prints a summary and returns the results."""
    cfg.validate()
    # task files first: a missing checksum or a failed download should not wait for the model
    files = {task: task_file(task, getattr(cfg, task), cfg) for task in DOWNLOADS if getattr(cfg, task)}
    lm_tasks = [t.strip() for t in cfg.lm_eval_tasks.split(",") if t.strip()]
    if lm_tasks:
        from . import lm_eval_adapter  # noqa: F401  before loading the model: one line when lm-eval is missing
    rt = runtime.setup(cfg.runtime, log=None)
    model, train_config = load_for_inference(cfg.init_from, cfg.out_dir)
    model.eval().to(rt.device)
    ctx = rt.autocast()  # float32 weights, low-precision matmuls: as in training's evaluation
    vocab = vocabulary_for(train_config, cfg.data_root, model.config.vocab_size)
    tok = vocab.tokenizer
    context = model.config.block_size
    window = cfg.block_size or context
    if window > context:
        raise ConfigError("block_size (%d) exceeds the model's context of %d tokens" % (window, context))
    stride = cfg.stride or window
    if stride > window:
        raise ConfigError("stride (%d) must not exceed the window of %d tokens" % (stride, window))
    dataset = cfg.dataset
    if not (dataset or cfg.text_file or cfg.hellaswag or cfg.lambada or lm_tasks):
        if not (train_config and train_config.get("dataset")):
            raise ConfigError("nothing to evaluate: set --dataset=NAME, --text_file=PATH, --hellaswag=PATH|download, "
                              "--lambada=PATH|download or --lm_eval_tasks=TASK,...")
        dataset = train_config["dataset"]
    rt.threads.settle(lambda m: print(m, file=sys.stderr))
    scorer = model
    if cfg.compile:
        why = runtime.compile_blocker(rt.device_type)
        if why:
            print("compile: disabled (%s); running eagerly" % why, file=sys.stderr)
        else:
            scorer = torch.compile(model, dynamic=True)  # the batches have varying lengths
    name = "%s (%s)" % (cfg.init_from, cfg.out_dir) if cfg.init_from == "resume" else cfg.init_from
    results: dict = {"model": name, "parameters": model.num_params(non_embedding=False), "device": rt.device,
                     "dtype": rt.dtype, "block_size": window}
    lines = ["model      %s, %.2fM parameters, %s %s" % (name, results["parameters"] / 1e6, rt.device, rt.dtype)]
    if dataset or cfg.text_file:
        if dataset:
            roots = (cfg.data_root, (train_config or {}).get("data_root"))
            tokens, source = split_tokens(dataset, roots, cfg.split, tok, cfg.max_tokens)
        else:
            tokens, source = np.asarray(encode_file(tok, cfg.text_file, cfg.max_tokens), dtype=np.int64), cfg.text_file
        harness = cfg.definitions == "lm_eval"
        r = perplexity(scorer, tokens, tok, rt.device, ctx, window, stride, cfg.batch_size, where=source,
                       definitions=cfg.definitions)
        results["perplexity"] = dict(r, source=source, window=window, stride=window if harness else stride,
                                     definitions=cfg.definitions)
        how = "lm-eval rolling windows of %d" % window if harness else "window %d, stride %d" % (window, stride)
        lines.append("perplexity %s: %s tokens scored (%s)" % (source, f"{r['tokens']:,}", how))
        bpb = "%.4f" % r["bpb"] if r["bpb"] is not None else "n/a"
        lines.append("           loss %.4f nats/token | perplexity %.3f | %s bits/byte" % (r["loss"], r["ppl"], bpb))
        meta = load_meta(os.path.dirname(source)) if dataset else None
        if is_chat(meta):  # conversations: the loss SFT trains, on the assistant tokens only
            mask_path, starts = chat_files(os.path.dirname(source), cfg.split, token_count(source, meta["dtype"]))
            mask = np.memmap(mask_path, dtype=np.uint8, mode="r")
            r = chat_loss(scorer, tokens, mask, starts[starts < len(tokens) - 1], tok, rt.device, ctx, window, stride,
                          cfg.batch_size, where=source)
            results["chat"] = dict(r, source=source, window=window, stride=stride)
            lines.append("chat       %s: %s assistant tokens of %s %sconversations scored (mask 1 only)"
                         % (source, f"{r['tokens']:,}", f"{r['conversations']:,}", "held-out " if cfg.split == "val" else ""))
            lines.append("           loss %.4f nats/token | perplexity %.3f" % (r["loss"], r["ppl"]))
    if cfg.hellaswag:
        r = hellaswag(scorer, files["hellaswag"], tok, rt.device, ctx, window, cfg.batch_size, cfg.limit,
                      definitions=cfg.definitions)
        results["hellaswag"] = dict(r, source=files["hellaswag"], definitions=cfg.definitions)
        lines.append("hellaswag  %s examples: acc %.4f | acc_norm %.4f (log-prob per %s) | acc_bytes %.4f"
                     % (f"{r['n']:,}", r["acc"], r["acc_norm"], r["acc_norm_per"], r["acc_bytes"]))
    if cfg.lambada:
        r = lambada(scorer, files["lambada"], tok, rt.device, ctx, window, cfg.batch_size, cfg.limit,
                    definitions=cfg.definitions)
        results["lambada"] = dict(r, source=files["lambada"], definitions=cfg.definitions)
        lines.append("lambada    %s examples: acc %.4f | target loss %.4f | perplexity %.3f" % (f"{r['n']:,}", r["acc"], r["loss"], r["ppl"]))
    if lm_tasks:
        from .lm_eval_adapter import NanoGPTLM, run_tasks, summary
        print("lm_eval    running %s through lm-evaluation-harness" % ", ".join(lm_tasks), file=sys.stderr)
        lm = NanoGPTLM(model=model, vocab=vocab, device=rt.device, autocast=ctx, batch_size=cfg.batch_size,
                       max_length=window)
        out = run_tasks(lm, lm_tasks, cfg.lm_eval_limit, None if cfg.lm_eval_fewshot < 0 else cfg.lm_eval_fewshot,
                        cfg.lm_eval_include, cfg.lm_eval_builtin, seed=cfg.seed)
        results["lm_eval"], text = summary(out)
        lines.extend(text)
    check_finite_results(results, name)
    print("\n".join(lines))
    sys.stdout.flush()
    if cfg.json_out:
        _write_json(cfg.json_out, results)
    return results


def check_finite_results(results: dict, name: str) -> None:
    """A nan/inf score is a broken model or input, never a result: refuse to print or write it."""
    for task, r in results.items():
        if isinstance(r, dict):
            for k, v in r.items():
                if isinstance(v, float) and not math.isfinite(v) and k in ("loss", "ppl", "bpb"):
                    raise UserError("%s gives %s %s = %s on %s: the model's outputs are not finite there; nothing was "
                                    "written" % (name, task, k, v, r.get("source", task)))


def main(argv: list[str] | None = None) -> None:
    run_command(lambda args: evaluate(EvalConfig.parse(args)), argv)


if __name__ == "__main__":
    main()
