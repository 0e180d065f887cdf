"""Sampling: ``python sample.py --out_dir=out-shakespeare-char`` or ``--init_from=gpt2-xl``."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch

from . import runtime
from .checkpoint import load_for_inference
from .config import Config, Section, check_init_from, check_path, setting
from .errors import ConfigError, run_command
from .generate import generate
from .runtime import RuntimeConfig
from .tokenizer import vocabulary_for


@dataclass
class SampleSettings(Section):
    """What sample.py generates, and from which model."""

    init_from: str = setting("resume", "'resume' (from out_dir/ckpt.pt), a GPT-2 name ('gpt2', ..., 'gpt2-xl') or a local Hugging Face folder.")
    out_dir: str = setting("out", "Folder holding ckpt.pt when init_from='resume'.")
    start: str = setting("\n", "Prompt text, or 'FILE:path' to read the prompt from a file.")
    num_samples: int = setting(10, "Number of samples to draw.", gt=0)
    max_new_tokens: int = setting(500, "Tokens generated per sample.", gt=0)
    temperature: float = setting(0.8, "Softmax temperature; 0 means greedy decoding.", ge=0, note="0 = greedy")
    top_k: int = setting(200, "Keep only the k most likely tokens (0 disables).", ge=0, note="0 disables it")
    top_p: float = setting(1.0, "Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 disables).",
                           gt=0, le=1)
    kv_cache: bool = setting(True, "Use the key/value cache (False re-runs the whole prefix for every token).")
    data_root: str = setting("data", "Where dataset folders (with meta.json) are looked up for the character vocabulary.")

    def check(self) -> None:
        check_init_from(self.init_from, ("resume",))
        if self.start.startswith("FILE:"):
            path = self.start[5:]
            if not os.path.exists(path):
                raise ConfigError("start=%r: file %r does not exist" % (self.start, path))
            check_path("start", path, "text")


class SampleConfig(Config):
    """Every key of sample.py."""

    sections = (("sample", SampleSettings), ("runtime", RuntimeConfig))
    defaults = {"compile": False}


def read_start(start: str) -> str:
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            return f.read()
    return start


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def sample(cfg: SampleConfig) -> list[str]:
    """Draw ``num_samples`` continuations of the prompt; prints and returns them."""
    cfg.validate()
    prompt = read_start(cfg.start)
    rt = runtime.setup(cfg.runtime, log=None)
    model, train_config = load_for_inference(cfg.init_from, cfg.out_dir)
    model.eval().to(rt.device)
    ctx = rt.autocast()
    if rt.device_type == "cuda" and rt.dtype != "float32":
        # inference needs no float32 master weights: cast once instead of at every step under autocast
        model.to(runtime.PTDTYPE[rt.dtype])
        ctx = contextlib.nullcontext()
    vocab = vocabulary_for(train_config, cfg.data_root, model.config.vocab_size)
    if cfg.compile:
        why = runtime.compile_blocker(rt.device_type)
        if why:
            _err("compile: disabled (%s); running eagerly" % why)
        else:  # the prompt pass has varying lengths (dynamic shapes); the one-token step has fixed ones
            model.forward = torch.compile(model.forward, dynamic=True)
            model.decode_step = torch.compile(model.decode_step, dynamic=False)

    ids = vocab.tokenizer.encode(prompt)  # a character outside a char vocabulary is a one-line TokenizerError
    if not ids:
        raise ConfigError("start is empty after tokenisation; give at least one token of prompt")
    x = torch.tensor(ids, dtype=torch.long, device=rt.device)[None, ...]  # (1, T)
    rt.threads.settle(_err)
    outputs = []
    t0 = time.time()
    with torch.no_grad(), ctx:
        for _ in range(cfg.num_samples):
            y = generate(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                         top_p=cfg.top_p, use_cache=cfg.kv_cache, vocab_limit=vocab.limit)
            text = vocab.tokenizer.decode(y[0].tolist())
            outputs.append(text)
            print(text)
            print("---------------", flush=True)
    rt.synchronize()
    dt = time.time() - t0
    _err("%d samples x %d tokens in %.2f s (%.0f tokens/s, %s)"
         % (cfg.num_samples, cfg.max_new_tokens, dt, cfg.num_samples * cfg.max_new_tokens / dt, vocab.name))
    return outputs


def main(argv: list[str] | None = None) -> None:
    run_command(lambda args: sample(SampleConfig.parse(args)), argv)


if __name__ == "__main__":
    main()
