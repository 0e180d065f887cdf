"""Scoring a model: perplexity, bits per byte, HellaSwag-style multiple choice and LAMBADA,
used by ``eval.py`` and by training's ``eval_tasks``.

Three measurements, each a full, deterministic pass (no sampling, same numbers every run):

* **Perplexity** of a dataset split (``--dataset=NAME --split=val``, the token file that
  ``nanogpt prepare`` wrote) or of a UTF-8 text file (``--text_file=PATH``). Windows of
  ``block_size`` tokens advance by ``stride``; every token after the first is scored exactly
  once, in the first window that holds it as a prediction target beyond what earlier windows
  scored, so a stride below the window length gives tokens more context at more compute.
  Reported: the token-weighted mean loss in nats, its exponential (perplexity), and bits per byte,
  the summed loss / ln 2 / the UTF-8 bytes of the scored tokens. ``<|endoftext|>`` marks a
  document boundary, not text, and counts zero bytes; the model still pays for predicting it.
* **Zero-shot multiple choice in the HellaSwag format**: jsonl lines with ``ctx``, ``endings`` and
  ``label``. Context and ``" " + ending`` are tokenised separately and joined; an input longer
  than the window loses tokens from the left. ``acc`` picks the ending with the largest summed
  log-probability of its tokens, ``acc_norm`` the largest mean per token, ``acc_bytes`` the
  largest sum per UTF-8 byte of the ending. For orientation, GPT-2 124M on the 10,042 validation
  examples scores about acc 0.286 / acc_norm 0.296 this way; lm-evaluation-harness, with its
  per-character ``acc_norm`` and its own text clean-up, reports acc_norm about 0.311.
* **LAMBADA last-word accuracy**: jsonl lines ``{"text": ...}``. The target is the last word with
  its leading space, the context everything before that space; an example counts as correct when
  the greedy prediction at every target position is the target token. Also reported: the mean over
  examples of the target's summed loss, and its exponential (the perplexity lm-evaluation-harness
  reports for LAMBADA).

``definitions="lm_eval"`` scores as lm-evaluation-harness 0.4 does, so that its numbers come out
exactly; the default ``"nanogpt"`` keeps the definitions above, which nanoGPT-style HellaSwag
scripts use and which the figures already recorded here (and training's ``eval_tasks`` logs) were
measured with. Under ``"lm_eval"``:

* a context and its continuation are tokenised together and split where the context's own
  tokens end (a trailing space of the context moves to the continuation);
* ``acc_norm`` divides each ending's summed log-probability by its length in characters (the
  harness's ``acc_bytes``, by UTF-8 bytes, is reported under both definitions);
* perplexity is the harness's ``loglikelihood_rolling``: the first token is scored after the
  prefix token (``<|endoftext|>``; a newline for a character vocabulary), the windows of
  ``block_size`` predictions are disjoint, and the last window is filled out with earlier tokens
  as context (lm-eval's ``get_rolling_token_windows`` + ``make_disjoint_window``); bytes
  count the text of ``<|endoftext|>`` as the harness does.

Logits of padded vocabulary entries (ids the tokenizer never produces) are left out of every
softmax. ``run_tasks`` runs the file-based tasks from a training loop (``eval_tasks``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys

import numpy as np
import torch
from torch.nn import functional as F

from .errors import ConfigError, UserError

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
LAMBADA_URL = "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"
LAMBADA_SHA256 = "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"  # 5,153 lines
# task -> (address, sha256 or None when none is published, path inside a data mirror)
DOWNLOADS = {
    "hellaswag": (HELLASWAG_URL, None, "hellaswag/hellaswag_val.jsonl"),
    "lambada": (LAMBADA_URL, LAMBADA_SHA256, "lambada/lambada_test.jsonl"),
}
TASKS = ("hellaswag", "lambada", "ppl")
DEFINITIONS = ("nanogpt", "lm_eval")


# --------------------------------------------------------------------------------------------
# shared pieces


def vocab_limit(tokenizer, model) -> int | None:
    """How many leading logits are real tokens; None when all of them are."""
    n = getattr(tokenizer, "vocab_size", None)
    return n if n and n < model.config.vocab_size else None


def _real_logits(logits: torch.Tensor, limit: int | None) -> torch.Tensor:
    """float32 logits (..., V) with padded vocabulary entries at -inf."""
    logits = logits.float()
    if limit is not None:
        logits[..., limit:] = float("-inf")
    return logits


def utf8_len(tokenizer, ids, eot_bytes: bool = False) -> int:
    """UTF-8 bytes of the text that ``ids`` stand for; ``<|endoftext|>`` (and any other special
    token) counts zero, or the bytes of its text with ``eot_bytes`` (as lm-evaluation-harness
    counts a document's bytes). Every tokenizer is measured on the same bytes, so bits per byte
    compares a character vocabulary, GPT-2 BPE and a trained BPE fairly."""
    special = set() if eot_bytes else (getattr(tokenizer, "special_ids", None) or {getattr(tokenizer, "eot_token", None)})
    ids = [int(i) for i in ids if int(i) not in special]
    decode_bytes = getattr(tokenizer, "decode_bytes", None)
    if decode_bytes is not None:  # byte-level BPE: exact even where one character spans two tokens
        return len(decode_bytes(ids))
    return len(tokenizer.decode(ids).encode("utf-8"))


def prefix_token(tokenizer) -> int:
    """The token that stands before a text with no context, so that its first token is scored:
    ``<|endoftext|>`` for BPE (what lm-evaluation-harness uses for GPT-2), a newline for a
    character vocabulary that has one (else its first character)."""
    eot = getattr(tokenizer, "eot_token", None)
    if eot is not None:
        return int(eot)
    stoi = getattr(tokenizer, "stoi", None) or {}
    return int(stoi["\n"]) if "\n" in stoi else 0


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness 0.4 splits them: spaces that end
    the context move to the continuation, the two texts are tokenised together, and the
    continuation is what follows the context's own tokens. An empty context becomes the prefix
    token (see :func:`prefix_token`)."""
    if not context:
        cont = tokenizer.encode(continuation)
        first = prefix_token(tokenizer)
        return ([first], cont) if not cont or cont[0] != first else (cont[:1], cont[1:])
    kept = context.rstrip()
    continuation = context[len(kept):] + continuation
    whole = tokenizer.encode(kept + continuation)
    head = tokenizer.encode(kept)
    return head, whole[len(head):]


def _bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True, leave=False)


def _check_ids(ids: np.ndarray, model, where: str) -> None:
    top = int(ids.max()) if ids.size else 0
    if top >= model.config.vocab_size:
        raise UserError("%s holds token id %d but the model's vocabulary has %d entries; evaluate it with the model "
                        "(and tokenizer) it was prepared for" % (where, top, model.config.vocab_size))


# --------------------------------------------------------------------------------------------
# perplexity


def iter_windows(n_tokens: int, window: int, stride: int):
    """(begin, end, first) per window over ``n_tokens`` tokens: the model reads tokens
    [begin, end) and predicts tokens begin+1 .. end, of which those from index ``first`` on are
    scored in this window. Together the windows score every token from index 1 on exactly once."""
    done, begin = 0, 0  # tokens 1 .. done are scored
    while done < n_tokens - 1:
        end = min(begin + window, n_tokens - 1)
        yield begin, end, done + 1
        done, begin = end, begin + stride


def window_count(n_tokens: int, window: int, stride: int) -> int:
    return 1 + max(0, -(-(n_tokens - 1 - window) // stride))


def rolling_windows(n_tokens: int, window: int):
    """Windows in the form of :func:`iter_windows` as lm-evaluation-harness's
    ``loglikelihood_rolling`` makes them, for a sequence whose token 0 is the prefix token: the
    windows predict disjoint runs of ``window`` tokens, and the last one reads a whole window of
    earlier tokens however few it has left to predict."""
    done = 0  # tokens 1 .. done are scored
    while done < n_tokens - 1:
        end = min(done + window, n_tokens - 1)
        yield max(0, end - window), end, done + 1
        done = end


def rolling_pairs(ids: list[int], prefix: int, window: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) per rolling window of one document ``ids``: the continuations,
    joined, are the whole document (see :func:`rolling_windows`)."""
    seq = [prefix] + list(ids)
    return [(seq[begin:first], seq[first:end + 1]) for begin, end, first in rolling_windows(len(seq), window)]


@torch.no_grad()
def perplexity(model, tokens, tokenizer, device: str, ctx, window: int, stride: int, batch_size: int = 8,
               max_windows: int = 0, progress: bool = True, where: str = "the text", definitions: str = "nanogpt") -> dict:
    """Mean loss (nats per token), perplexity and bits per byte of ``tokens`` (a 1-D array, a
    memory map is fine), scored in windows of ``window`` tokens that advance by ``stride``; with
    ``definitions="lm_eval"``, in lm-evaluation-harness's rolling windows (``stride`` unused),
    the first token scored too."""
    if definitions not in DEFINITIONS:
        raise ConfigError("definitions must be one of %s; got %r" % (", ".join(DEFINITIONS), definitions))
    harness = definitions == "lm_eval"
    if harness:  # the prefix token stands before the text, so token 0 of the text is scored too
        tokens = np.concatenate([np.array([prefix_token(tokenizer)], dtype=np.int64), np.asarray(tokens, dtype=np.int64)])
        stride = window
    n = len(tokens)
    if n < 2:
        raise UserError("%s has %d token(s); perplexity needs at least 2 (the first is context only)" % (where, n))
    if not 0 < stride <= window <= model.config.block_size:
        raise ConfigError("need 0 < stride (%d) <= block_size (%d) <= the model's context (%d)"
                          % (stride, window, model.config.block_size))
    limit = vocab_limit(tokenizer, model)
    total = window_count(n, window, stride)
    if max_windows:
        total = min(total, max_windows)
    spans = itertools.islice(rolling_windows(n, window) if harness else iter_windows(n, window, stride), total)
    nll, scored, nbytes = 0.0, 0, 0
    with _bar(total, "perplexity", "window", progress) as bar:
        while True:
            batch = list(itertools.islice(spans, batch_size))
            if not batch:
                break
            T = max(end - begin for begin, end, _ in batch)
            x = np.zeros((len(batch), T), dtype=np.int64)  # (B, T) right-padded; causal attention never sees the padding
            y = np.full((len(batch), T), -1, dtype=np.int64)  # (B, T) -1 = not scored here
            for i, (begin, end, first) in enumerate(batch):
                chunk = np.asarray(tokens[begin:end + 1], dtype=np.int64)  # inputs and their targets
                s = first - 1 - begin  # first scored position of this window
                x[i, :end - begin] = chunk[:-1]
                y[i, s:end - begin] = chunk[s + 1:]
                nbytes += utf8_len(tokenizer, chunk[s + 1:].tolist(), eot_bytes=harness)
            _check_ids(np.concatenate([x.ravel(), y[y >= 0]]), model, where)
            xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            with ctx:
                logits, _ = model(xt)  # (B, T, V)
            logits = _real_logits(logits, limit)
            losses = F.cross_entropy(logits.view(-1, logits.size(-1)), yt.view(-1), ignore_index=-1, reduction="none")
            nll += losses.double().sum().item()  # summed in float64: a float32 sum of thousands drifts by 1e-4
            scored += int((y >= 0).sum())
            bar.update(len(batch))
    loss = nll / scored
    return {"loss": loss, "ppl": math.exp(loss), "bpb": nll / math.log(2) / nbytes if nbytes else None,
            "tokens": scored, "bytes": nbytes}


# --------------------------------------------------------------------------------------------
# scoring continuations (HellaSwag, LAMBADA)


@torch.no_grad()
def score_continuations(model, pairs, device: str, ctx, window: int, batch_size: int = 8,
                        limit: int | None = None, progress: bool = False, desc: str = "scoring") -> list:
    """For each (context ids, continuation ids): (summed log-probability of the continuation's
    tokens, how many were scored, whether greedy decoding predicts every one of them). Inputs
    longer than ``window`` lose tokens from the left; a continuation longer than the window is
    scored on its last ``window`` tokens."""
    out = []
    with _bar(len(pairs), desc, "row", progress) as bar:
        for start in range(0, len(pairs), batch_size):
            rows = []
            for context, cont in pairs[start:start + batch_size]:
                seq = (list(context) + list(cont))[-(window + 1):]
                rows.append((seq, min(len(cont), len(seq) - 1)))
            T = max(len(seq) for seq, _ in rows) - 1
            x = torch.zeros(len(rows), T, dtype=torch.long)  # (B, T) right-padded
            y = torch.full((len(rows), T), -1, dtype=torch.long)  # (B, T) -1 = not scored
            for i, (seq, k) in enumerate(rows):
                L = len(seq) - 1
                x[i, :L] = torch.tensor(seq[:-1])
                y[i, L - k:L] = torch.tensor(seq[L - k + 1:])
            x, y = x.to(device), y.to(device)
            with ctx:
                logits, _ = model(x)  # (B, T, V)
            mask = y >= 0
            picked = _real_logits(logits[mask], limit)  # (N, V), row by row
            target = y[mask]  # (N,)
            logp = picked.log_softmax(dim=-1).gather(1, target[:, None])[:, 0]  # (N,)
            greedy = picked.argmax(dim=-1) == target  # (N,)
            counts = mask.sum(dim=1).tolist()
            for lp, g, k in zip(logp.cpu().double().split(counts), greedy.cpu().split(counts), counts):
                out.append((lp.sum().item(), k, bool(g.all())))
            bar.update(len(rows))
    return out


def _read_jsonl(path: str, limit: int, task: str) -> list[tuple[int, dict]]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise UserError("%s line %d is not valid JSON (%s); is it a %s jsonl file?" % (path, lineno, e.msg, task)) from None
                if limit and len(rows) >= limit:
                    break
    except UnicodeDecodeError:
        raise UserError("%s is not UTF-8 text; expected a %s jsonl file" % (path, task)) from None
    if not rows:
        raise UserError("%s holds no examples" % path)
    return rows


def _encode(tokenizer, text: str, path: str, example: int) -> list[int]:
    try:
        return tokenizer.encode(text)
    except UserError as e:  # a character outside a character vocabulary
        raise UserError("%s example %d: %s" % (path, example, e)) from None


def read_hellaswag(path: str, limit: int = 0) -> list[tuple[str, list[str], int]]:
    """(ctx, endings, label) of each line of a HellaSwag-format jsonl file."""
    out = []
    for lineno, row in _read_jsonl(path, limit, "HellaSwag"):
        ctx, endings, label = (row.get(k) for k in ("ctx", "endings", "label")) if isinstance(row, dict) else (None,) * 3
        try:
            label = int(label)
        except (TypeError, ValueError):
            label = None
        if not isinstance(ctx, str) or not isinstance(endings, list) or not endings or \
                not all(isinstance(e, str) for e in endings) or label is None or not 0 <= label < len(endings):
            raise UserError("%s line %d: expected {\"ctx\": str, \"endings\": [str, ...], \"label\": index of the "
                            "right ending}" % (path, lineno))
        out.append((ctx, endings, label))
    return out


def read_lambada(path: str, limit: int = 0) -> list[tuple[str, str]]:
    """(context, target) of each line of a LAMBADA-format jsonl file: the target is the last
    word with its leading space, the context everything before that space."""
    out = []
    for lineno, row in _read_jsonl(path, limit, "LAMBADA"):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise UserError("%s line %d: expected {\"text\": str}" % (path, lineno))
        context, _, word = text.rstrip().rpartition(" ")
        if not context.strip() or not word:
            raise UserError("%s line %d: the text needs words before its last word" % (path, lineno))
        out.append((context, " " + word))
    return out


def _pair(tokenizer, context: str, continuation: str, path: str, example: int, harness: bool):
    if harness:
        try:
            return encode_pair(tokenizer, context, continuation)
        except UserError as e:  # a character outside a character vocabulary
            raise UserError("%s example %d: %s" % (path, example, e)) from None
    return _encode(tokenizer, context, path, example), _encode(tokenizer, continuation, path, example)


def hellaswag(model, path: str, tokenizer, device: str, ctx, window: int, batch_size: int = 8, limit: int = 0,
              progress: bool = True, details: bool = False, definitions: str = "nanogpt") -> dict:
    """acc, acc_norm, acc_bytes and n on a HellaSwag-format file (``definitions``: see the
    module's notes); ``details`` adds each example's log-probabilities per ending: summed, and
    divided by its tokens, its characters and its bytes."""
    if definitions not in DEFINITIONS:
        raise ConfigError("definitions must be one of %s; got %r" % (", ".join(DEFINITIONS), definitions))
    harness = definitions == "lm_eval"
    examples = read_hellaswag(path, limit)
    pairs, sizes = [], []
    for i, (text, endings, _) in enumerate(examples):
        if not _encode(tokenizer, text, path, i + 1):
            raise UserError("%s example %d: ctx is empty after tokenisation" % (path, i + 1))
        sizes.append(len(endings))
        pairs.extend(_pair(tokenizer, text, " " + e, path, i + 1, harness) for e in endings)
    scores = score_continuations(model, pairs, device, ctx, window, batch_size, vocab_limit(tokenizer, model),
                                 progress, "hellaswag")
    acc = acc_norm = acc_bytes = 0
    per_example = []
    it = iter(scores)
    for (_, endings, label), k in zip(examples, sizes):
        rows = [next(it) for _ in range(k)]
        total = [lp for lp, _, _ in rows]
        mean = [lp / max(n, 1) for lp, n, _ in rows]  # per token
        per_char = [lp / max(len(e), 1) for lp, e in zip(total, endings)]  # lm-evaluation-harness's acc_norm
        per_byte = [lp / max(len(e.encode("utf-8")), 1) for lp, e in zip(total, endings)]  # its acc_bytes
        acc += _argmax(total) == label
        acc_norm += _argmax(per_char if harness else mean) == label
        acc_bytes += _argmax(per_byte) == label
        per_example.append({"logprob": total, "mean_logprob": mean, "char_logprob": per_char, "byte_logprob": per_byte,
                            "label": label})
    n = len(examples)
    out = {"acc": acc / n, "acc_norm": acc_norm / n, "acc_bytes": acc_bytes / n, "n": n,
           "acc_norm_per": "character" if harness else "token"}
    if details:
        out["examples"] = per_example
    return out


def _argmax(values: list[float]) -> int:
    """The index of the largest value, the first one on a tie (as numpy.argmax)."""
    return max(range(len(values)), key=values.__getitem__)


def lambada(model, path: str, tokenizer, device: str, ctx, window: int, batch_size: int = 8, limit: int = 0,
            progress: bool = True, details: bool = False, definitions: str = "nanogpt") -> dict:
    """acc, the mean summed loss of the target word (nats), its perplexity and n on a
    LAMBADA-format file; ``details`` adds each example's (log-probability, tokens, correct)."""
    if definitions not in DEFINITIONS:
        raise ConfigError("definitions must be one of %s; got %r" % (", ".join(DEFINITIONS), definitions))
    examples = read_lambada(path, limit)
    pairs = [_pair(tokenizer, c, t, path, i + 1, definitions == "lm_eval") for i, (c, t) in enumerate(examples)]
    scores = score_continuations(model, pairs, device, ctx, window, batch_size, vocab_limit(tokenizer, model),
                                 progress, "lambada")
    n = len(scores)
    loss = -sum(lp for lp, _, _ in scores) / n
    out = {"acc": sum(g for _, _, g in scores) / n, "loss": loss, "ppl": math.exp(loss), "n": n}
    if details:
        out["examples"] = scores
    return out


# --------------------------------------------------------------------------------------------
# from a training loop


def parse_tasks(spec: str) -> dict[str, str]:
    """``"hellaswag=PATH,lambada=PATH,ppl=PATH"`` -> {task: path}; every file must exist."""
    tasks: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, eq, path = item.partition("=")
        name, path = name.strip(), path.strip()
        if not eq or not path:
            raise ConfigError("eval_tasks: %r must look like TASK=PATH, e.g. hellaswag=data/eval/hellaswag_val.jsonl" % item)
        if name not in TASKS:
            raise ConfigError("eval_tasks: unknown task %r; known tasks: %s" % (name, ", ".join(TASKS)))
        if name in tasks:
            raise ConfigError("eval_tasks: task %r is given twice" % name)
        if not os.path.isfile(path):
            hint = " (`python eval.py --%s=download ...` caches one under data/eval)" % name if name in DOWNLOADS else ""
            raise ConfigError("eval_tasks: %s file %r does not exist; give a local file%s" % (name, path, hint))
        tasks[name] = path
    return tasks


def run_tasks(model, tasks: dict, tokenizer, device: str, ctx, limit: int = 0, batch_size: int = 8,
              progress: bool = False) -> dict[str, float]:
    """Run ``parse_tasks``' tasks on ``model`` at its full context; flat metric names such as
    ``hellaswag/acc_norm``, ``lambada/acc``, ``ppl/bpb``. ``limit`` caps the examples per task
    (for ``ppl``, the windows). The model is left in the train/eval mode it came in."""
    was_training = model.training
    model.eval()
    window = model.config.block_size
    out: dict[str, float] = {}
    try:
        for name, path in tasks.items():
            if name == "hellaswag":
                r = hellaswag(model, path, tokenizer, device, ctx, window, batch_size, limit, progress)
                out.update({"hellaswag/acc": r["acc"], "hellaswag/acc_norm": r["acc_norm"]})
            elif name == "lambada":
                r = lambada(model, path, tokenizer, device, ctx, window, batch_size, limit, progress)
                out.update({"lambada/acc": r["acc"], "lambada/ppl": r["ppl"]})
            elif name == "ppl":
                tokens = np.asarray(encode_file(tokenizer, path, 0), dtype=np.int64)
                r = perplexity(model, tokens, tokenizer, device, ctx, window, window, batch_size, limit, progress, path)
                out.update({"ppl/loss": r["loss"], "ppl/ppl": r["ppl"]})
                if r["bpb"] is not None:
                    out["ppl/bpb"] = r["bpb"]
            else:
                raise ConfigError("eval_tasks: unknown task %r; known tasks: %s" % (name, ", ".join(TASKS)))
    finally:
        model.train(was_training)
    return out


def encode_file(tokenizer, path: str, max_tokens: int) -> list[int]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError("%s is not UTF-8 text (byte %d); convert it first" % (path, e.start)) from None
    try:
        ids = tokenizer.encode(text)
    except UserError as e:
        raise UserError("%s: %s" % (path, e)) from None
    return ids[:max_tokens] if max_tokens else ids


# --------------------------------------------------------------------------------------------
# chat data: the loss on assistant tokens


@torch.no_grad()
def chat_loss(model, tokens, mask, starts, tokenizer, device: str, ctx, window: int, stride: int, batch_size: int = 8,
              progress: bool = True, where: str = "the conversations") -> dict:
    """Mean loss (nats per token) and perplexity of the learned tokens (mask 1: assistant replies)
    of chat data: ``tokens`` and ``mask`` side by side, ``starts`` the offset of each
    conversation. Each conversation is scored on its own, from its first token, in windows of
    ``window`` tokens that advance by ``stride`` as in :func:`perplexity`; every learned token
    after a conversation's first is scored exactly once."""
    if not 0 < stride <= window <= model.config.block_size:
        raise ConfigError("need 0 < stride (%d) <= block_size (%d) <= the model's context (%d)"
                          % (stride, window, model.config.block_size))
    limit = vocab_limit(tokenizer, model)
    bounds = [int(s) for s in starts] + [len(tokens)]
    convs = [(a, b) for a, b in zip(bounds, bounds[1:]) if b - a >= 2]
    spans = [(a + begin, a + end, a + first) for a, b in convs for begin, end, first in iter_windows(b - a, window, stride)]
    nll, scored = 0.0, 0
    with _bar(len(spans), "chat loss", "window", progress) as bar:
        for i in range(0, len(spans), batch_size):
            batch = spans[i:i + batch_size]
            T = max(end - begin for begin, end, _ in batch)
            x = np.zeros((len(batch), T), dtype=np.int64)  # (B, T) right-padded
            y = np.full((len(batch), T), -1, dtype=np.int64)  # (B, T) -1 = not scored
            for j, (begin, end, first) in enumerate(batch):
                chunk = np.asarray(tokens[begin:end + 1], dtype=np.int64)
                learned = np.asarray(mask[begin + 1:end + 1]) == 1  # the targets' mask
                s = first - 1 - begin
                x[j, :end - begin] = chunk[:-1]
                y[j, s:end - begin] = np.where(learned[s:], chunk[s + 1:], -1)
            _check_ids(np.concatenate([x.ravel(), y[y >= 0]]), model, where)
            xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
            with ctx:
                logits, _ = model(xt)  # (B, T, V)
            logits = _real_logits(logits, limit)
            nll += F.cross_entropy(logits.view(-1, logits.size(-1)), yt.view(-1), ignore_index=-1, reduction="sum").item()
            scored += int((y >= 0).sum())
            bar.update(len(batch))
    if not scored:
        raise UserError("%s hold no assistant tokens to score" % where)
    loss = nll / scored
    return {"loss": loss, "ppl": math.exp(loss), "tokens": scored, "conversations": len(convs)}
