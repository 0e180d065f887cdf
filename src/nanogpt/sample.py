"""Sampling: ``python sample.py --out_dir=out-shakespeare-char`` or ``--init_from=gpt2-xl``."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

from . import checkpoint, runtime
from .config import ConfigError, SampleConfig, UserError, load_config, run_cli
from .model import GPT

GPT2_BPE_VOCAB = 50257  # tokens of GPT-2 BPE


def load_model(init_from: str, out_dir: str) -> tuple[GPT, dict | None]:
    """A model for inference and the dataset name it was trained on (None for GPT-2 weights)."""
    if init_from == "resume":
        model, ckpt = checkpoint.load_model(os.path.join(out_dir, "ckpt.pt"))
        return model, ckpt.get("config") or {}
    try:
        return GPT.from_pretrained(init_from, dropout=0.0), None
    except (OSError, ValueError, ImportError) as e:
        raise UserError("cannot load %s: %s" % (init_from, e)) from None


def tokenizer_for(train_config: dict | None, data_root: str, model_vocab: int | None = None):
    """The character vocabulary of the training data when it has one, else GPT-2 BPE. A model
    with fewer entries than GPT-2 BPE cannot use it: without its meta.json that is an error
    naming --data_root, raised before BPE files are looked for."""
    from .prepare import load_meta
    from .tokenizer import load_tokenizer
    meta = None
    if train_config and train_config.get("dataset"):
        for root in (data_root, train_config.get("data_root")):  # --data_root first, then training's
            folder = os.path.join(root or "", train_config["dataset"])
            if root and os.path.isdir(folder):
                meta = load_meta(folder)
                if meta:  # a folder without meta.json (say, a fresh clone's data/) is not the dataset
                    break
    if meta is None and model_vocab is not None and model_vocab < GPT2_BPE_VOCAB:
        dataset = (train_config or {}).get("dataset") or "the dataset"
        raise UserError("the model has %d vocabulary entries, too few for GPT-2 BPE, and the meta.json of %s was not "
                        "found; pass --data_root=FOLDER holding %s/" % (model_vocab, dataset, dataset))
    return load_tokenizer(meta), (meta or {}).get("vocab_size")


def read_start(start: str) -> str:
    if start.startswith("FILE:"):
        path = start[5:]
        if not os.path.isfile(path):
            raise ConfigError("start=%r: file %r does not exist" % (start, path))
        with open(path, encoding="utf-8") as f:
            return f.read()
    return start


def main(argv: list[str] | None = None) -> None:
    run_cli(sample, argv)


def sample(argv: list[str]) -> list[str]:
    cfg, _ = load_config(SampleConfig, argv)
    cfg.validate()
    prompt = read_start(cfg.start)
    device, device_type, dtype = runtime.setup(cfg.device, cfg.dtype, cfg.seed)

    model, train_config = load_model(cfg.init_from, cfg.out_dir)
    model.eval().to(device)
    ctx = runtime.autocast(device_type, dtype)
    if device_type == "cuda" and dtype != "float32":
        # inference needs no float32 master weights: cast once instead of at every step under autocast
        model.to(getattr(torch, dtype))
        ctx = contextlib.nullcontext()
    tok, vocab_limit = tokenizer_for(train_config, cfg.data_root, model.config.vocab_size)
    if cfg.compile:
        why = runtime.compile_blocker(device_type)
        if why:
            print("compile: disabled (%s); running eagerly" % why, file=sys.stderr)
        else:  # the prompt pass has varying lengths (dynamic shapes); the one-token step has fixed ones
            model.forward = torch.compile(model.forward, dynamic=True)
            model.decode_step = torch.compile(model.decode_step, dynamic=False)

    ids = tok.encode(prompt)  # a character outside a char vocabulary is a one-line TokenizerError
    if not ids:
        raise ConfigError("start is empty after tokenisation; give at least one token of prompt")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]  # (1, T)
    outputs = []
    t0 = time.time()
    with torch.no_grad(), ctx:
        for _ in range(cfg.num_samples):
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                    top_p=cfg.top_p, use_cache=cfg.kv_cache, vocab_limit=vocab_limit)
            text = tok.decode(y[0].tolist())
            outputs.append(text)
            print(text)
            print("---------------")
    runtime.synchronize(device_type)
    dt = time.time() - t0
    vocab = "characters of %s" % train_config["dataset"] if hasattr(tok, "stoi") else "GPT-2 BPE"
    print("%d samples x %d tokens in %.2f s (%.0f tokens/s, %s)"
          % (cfg.num_samples, cfg.max_new_tokens, dt, cfg.num_samples * cfg.max_new_tokens / dt, vocab), file=sys.stderr)
    return outputs


if __name__ == "__main__":
    main()
