"""lm-evaluation-harness on any model this project reads: the model class ``NanoGPTLM``,
registered with the harness as ``"nanogpt"``.

    pip install 'nanogpt[eval]'
    nanogpt eval --out_dir=out-shakespeare-char-cpu --lm_eval_tasks=arc_easy --lm_eval_limit=100

or from Python (importing this module registers the model name):

    import lm_eval, nanogpt.lm_eval_adapter
    lm_eval.simple_evaluate(model="nanogpt", model_args="out_dir=out-gpt2-run", tasks=["hellaswag"])

The model comes from a checkpoint (``out_dir``, with ``init_from=resume``, the default), GPT-2
weights (``init_from=gpt2`` ... ``gpt2-xl``) or a local Hugging Face folder
(``init_from=PATH``; lm-eval's ``pretrained=`` means the same). It runs our own GPT, so the
features GPT2LMHeadModel lacks (``rope``, ``qk_norm``, ``relu2``, an untied head) and character
vocabularies work as in training. Other model_args: ``data_root`` (where the dataset's meta.json
is looked up), ``device``, ``dtype``, ``batch_size``, ``max_length`` (default: the model's
context) and ``threads`` (CPU threads; 0, the default, uses the cores other processes leave
idle, as every command does).

The three request kinds are scored as lm-eval's own ``hf`` backend scores them, so that the same
weights give the same numbers through either (see tests/test_lm_eval.py):

* ``loglikelihood``: context and continuation are tokenised together and split where the
  context's tokens end (lm-eval's ``TemplateLM``); an input longer than the context loses tokens
  from the left; an empty context becomes the prefix token.
* ``loglikelihood_rolling``: the document in lm-eval's rolling windows (disjoint, the first token
  scored after the prefix token, the last window filled out with earlier tokens as context).
* ``generate_until``: the context keeps its last ``max_length - max_gen_toks`` tokens (or the
  whole context when the model is shorter than that), then generation with the key/value cache
  of generate.py, greedy unless ``do_sample``; it stops at the first stop string (and at
  ``<|endoftext|>`` for BPE), which is cut off, or after ``max_gen_toks`` tokens (256 by default).

The prefix token is ``<|endoftext|>`` for BPE; a character vocabulary has none, and a newline
stands in for it. Logits of padded vocabulary entries (ids the tokenizer never produces) are
left out of every softmax, as in eval.py; lm-eval's ``hf`` backend on an exported folder with a
padded vocabulary keeps them, which moves log-likelihoods by the probability the model gives
those ids (``mask_padding=False`` keeps them too, to compare with it). Requests are sorted by length and scored ``batch_size`` at a time.
"""

from __future__ import annotations

import json
import sys

import torch

from .errors import ConfigError, UserError, first_line


class LmEvalMissing(UserError, ImportError):
    """lm-evaluation-harness is not installed."""


MISSING = "lm-evaluation-harness is not installed: pip install 'nanogpt[eval]' (or pip install lm_eval)"

try:
    import lm_eval.models  # noqa: F401  the harness's own model names first (it fills an empty registry lazily)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:
    raise LmEvalMissing(MISSING) from None

from . import runtime  # noqa: E402
from .checkpoint import load_for_inference  # noqa: E402
from .generate import generate  # noqa: E402
from .scoring import prefix_token, rolling_pairs, score_continuations  # noqa: E402
from .tokenizer import EOT_TEXT, vocabulary_for  # noqa: E402

NAME = "nanogpt"
MAX_GEN_TOKS = 256  # lm-eval's default for generate_until


def _int(key: str, value, default: int) -> int:
    if value in (None, ""):
        return default
    if value == "auto":  # lm-eval's automatic batch size: this class keeps a fixed one
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError("lm-eval model_args: %s must be an integer; got %r" % (key, value)) from None


@register_model(NAME)
class NanoGPTLM(TemplateLM):
    """lm-eval's model interface over our GPT; see the module's notes for model_args."""

    backend = "causal"

    def __init__(self, init_from: str = "resume", out_dir: str = "out", pretrained: str | None = None,
                 data_root: str = "data", device: str | None = None, dtype: str = "auto", batch_size=8,
                 max_batch_size=None, max_length=0, threads=0, mask_padding: bool = True, model=None, vocab=None,
                 autocast=None, progress: bool = True, **unknown):
        super().__init__()
        if unknown:
            raise ConfigError("lm-eval model_args: unknown key %r for model %r (known: init_from, pretrained, out_dir, "
                              "data_root, device, dtype, batch_size, max_length, threads, mask_padding)" % (sorted(unknown)[0], NAME))
        if model is None:
            device = runtime.resolve_device(device or "auto")
            cpu_threads = runtime.CpuThreads(_int("threads", threads, 0), device.split(":")[0])
            cpu_threads.start()  # the threads rule of every command: the cores other processes leave idle
            model, train_config = load_for_inference(pretrained or init_from, out_dir)
            model.eval().to(device)
            vocab = vocabulary_for(train_config, data_root, model.config.vocab_size)
            dtype = runtime.resolve_dtype(dtype, device.split(":")[0])
            autocast = runtime.autocast(device.split(":")[0], dtype)
            cpu_threads.settle(lambda m: print(m, file=sys.stderr))
        elif vocab is None:
            raise ConfigError("NanoGPTLM(model=...) needs the model's vocabulary too (vocab=tokenizer.vocabulary_for(...))")
        self.model, self.vocab, self.tok = model, vocab, vocab.tokenizer
        if not isinstance(mask_padding, bool):
            raise ConfigError("lm-eval model_args: mask_padding must be True or False; got %r" % (mask_padding,))
        self.limit = vocab.limit if mask_padding else None  # how many leading logits are real tokens
        self._device = torch.device(device or next(model.parameters()).device)
        self.autocast = autocast if autocast is not None else runtime.autocast(self._device.type, "float32")
        self.batch_size = max(1, _int("batch_size", batch_size, 8))
        context = model.config.block_size
        self._max_length = min(_int("max_length", max_length, 0) or context, context)
        self.progress = progress

    # ----------------------------------------------------------------------------------------
    # what the harness asks of a model

    @property
    def eot_token_id(self) -> int:
        return prefix_token(self.tok)

    @property
    def prefix_token_id(self) -> int:
        return prefix_token(self.tok)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.vocab.name.replace(" ", "_")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, ids, **kwargs) -> str:
        return self.tok.decode(ids)

    def _score(self, pairs: list[tuple[list[int], list[int]]], desc: str) -> list[tuple[float, bool]]:
        """(summed log-probability, greedy) of each (context, continuation), scored longest first
        so that each batch holds inputs of about the same length."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        scored = score_continuations(self.model, [pairs[i] for i in order], str(self._device), self.autocast,
                                     self._max_length, self.batch_size, self.limit, self.progress, desc)
        out: list = [None] * len(pairs)
        for i, (lp, _, greedy) in zip(order, scored):
            out[i] = (lp, greedy)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = self._score([(list(c), list(k)) for _, c, k in requests], "loglikelihood")
        for (strings, _, _), answer in zip(requests, out):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            windows = rolling_pairs(self.tok_encode(text), self.prefix_token_id, self._max_length)
            pairs.extend(windows)
            owner.extend([n] * len(windows))
        totals = [0.0] * len(requests)
        for n, (lp, _) in zip(owner, self._score(pairs, "loglikelihood_rolling")):
            totals[n] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same generation settings and prompt length (no padding:
        our attention has no mask for it), each generated with the key/value cache."""
        groups: dict = {}
        for n, (context, gen_kwargs) in enumerate(req.args for req in requests):
            settings = self._gen_settings(gen_kwargs)
            keep = self._max_length - settings["max_gen_toks"]
            ids = self.tok_encode(context)
            ids = ids[-keep:] if keep > 0 else ids[-self._max_length:]
            if not ids:
                ids = [self.prefix_token_id]
            key = (json.dumps(settings, sort_keys=True), len(ids))
            groups.setdefault(key, []).append((n, ids))
        out: list = [None] * len(requests)
        from tqdm import tqdm
        with tqdm(total=len(requests), desc="generate_until", disable=not self.progress or disable_tqdm,
                  leave=False) as bar:
            for (settings, _), items in groups.items():
                settings = json.loads(settings)
                for start in range(0, len(items), self.batch_size):
                    batch = items[start:start + self.batch_size]
                    texts = self._generate([ids for _, ids in batch], settings)
                    for (n, _), text in zip(batch, texts):
                        out[n] = text
                        self.cache_hook.add_partial("generate_until", requests[n].args, text)
                    bar.update(len(batch))
        return out

    # ----------------------------------------------------------------------------------------
    # generation

    def _gen_settings(self, gen_kwargs: dict) -> dict:
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(u, str) for u in until):
            raise ConfigError("generate_until: 'until' must be a string or a list of strings; got %r" % (until,))
        if getattr(self.tok, "eot_token", None) is not None and EOT_TEXT not in until:
            until.append(EOT_TEXT)
        max_gen = next((kw.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if k in kw), MAX_GEN_TOKS)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kw.pop("do_sample", temperature > 0))
        top_k = int(kw.pop("top_k", 0) or 0)
        top_p = kw.pop("top_p", None)
        kw.pop("max_length", None)
        if kw:
            print("lm-eval: generation settings %s are not used by %s" % (", ".join(sorted(kw)), NAME), file=sys.stderr)
        return {"until": until, "max_gen_toks": int(max_gen), "temperature": temperature if do_sample else 0.0,
                "top_k": top_k, "top_p": None if top_p is None else float(top_p)}

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], settings: dict) -> list[str]:
        """Continue prompts of one length together; each text cut at its first stop string."""
        until, T = settings["until"], len(prompts[0])
        idx = torch.tensor(prompts, dtype=torch.long, device=self._device)  # (B, T)

        def stopped(rows) -> list[str | None]:
            texts = [self.tok_decode(r[T:].tolist()) for r in rows]
            return [t if any(u and u in t for u in until) else None for t in texts]

        def all_stopped(seq) -> bool:
            return bool(until) and all(t is not None for t in stopped(seq))

        with self.autocast:
            seq = generate(self.model, idx, settings["max_gen_toks"], temperature=settings["temperature"],
                           top_k=settings["top_k"] or None, top_p=settings["top_p"], vocab_limit=self.limit,
                           stop=all_stopped if until else None)
        out = []
        for row in seq:
            text = self.tok_decode(row[T:].tolist())
            for u in until:
                if u:
                    text = text.split(u)[0]
            out.append(text)
        return out


def run_tasks(lm: NanoGPTLM, tasks: list[str], limit: int = 0, num_fewshot: int | None = None,
              include_path: str = "", builtin: bool = True, log_samples: bool = False, seed: int = 1234) -> dict:
    """Run lm-eval's tasks (by name; ``include_path`` adds a folder of task YAML files, and
    ``builtin=False`` leaves lm-eval's own out) on ``lm``; lm-eval's result dict ("results", and
    "samples" with ``log_samples``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=include_path or None, include_defaults=builtin)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = ("lm-eval's tasks" if builtin else "") + (" or " if builtin and include_path else "") + \
            ("the task files in %s" % include_path if include_path else "")
        raise ConfigError("lm_eval_tasks: unknown task %r, not among %s" % (missing[0], where))
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit or None,
                                       task_manager=manager, log_samples=log_samples, random_seed=seed,
                                       numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                       bootstrap_iters=0)
    except UserError:
        raise
    except Exception as e:  # most often a task's data set that cannot be fetched here
        if not _from_data_loading(e):
            raise
        raise UserError("lm-eval could not load the data of %s (%s: %s); offline, point it at local files with a task "
                        "YAML in --lm_eval_include=FOLDER" % (", ".join(tasks), type(e).__name__, first_line(e, 160))) from None


def _from_data_loading(e: BaseException) -> bool:
    """Whether an error comes from fetching or reading a data set (datasets, the Hub, the network)."""
    if isinstance(e, (ConnectionError, TimeoutError, FileNotFoundError)):
        return True
    return type(e).__module__.split(".")[0] in ("datasets", "huggingface_hub", "requests", "urllib3", "fsspec")


def summary(out: dict | None) -> tuple[dict, list[str]]:
    """({task: {metric: value}}, one printed line per task) from lm-eval's result dict."""
    table: dict = {}
    lines = []
    for task, metrics in ((out or {}).get("results") or {}).items():
        row = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            row[name if filt == "none" else "%s,%s" % (name, filt)] = float(value)
        table[task] = row
        n = ((out.get("n-samples") or {}).get(task) or {}).get("effective")
        shown = " | ".join("%s %.4f" % kv for kv in row.items())
        lines.append("lm_eval    %s%s: %s" % (task, " (%d examples)" % n if n else "", shown or "no metrics"))
    return table, lines
