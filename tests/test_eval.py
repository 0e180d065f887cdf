"""eval.py: perplexity, bits per byte, HellaSwag and LAMBADA scoring against transformers'
GPT-2 (a small random model), a character-level checkpoint, and the command line."""

import json
import math
import os
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import evaluate as eval_cmd
from nanogpt import checkpoint, evaluate, scoring
from helpers import parse
from nanogpt.errors import ConfigError, UserError
from nanogpt.evaluate import EvalConfig
from nanogpt.train import TrainConfig
from nanogpt.model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 64


# --------------------------------------------------------------------------------------------
# fixtures: a random GPT-2 in Hugging Face format, its tokenizer, text and task files


@pytest.fixture(scope="module")
def bpe(data_mirror):
    tiktoken = pytest.importorskip("tiktoken")
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))
    yield tiktoken.get_encoding("gpt2")
    mp.undo()


@pytest.fixture(scope="module")
def hf(tmp_path_factory, bpe):
    """(folder written by save_pretrained, the transformers model)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=BLOCK, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # a peaked distribution, so greedy picks and choices are clear-cut
    folder = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(folder)
    return str(folder), model


@pytest.fixture(scope="module")
def ours(hf):
    from nanogpt.tokenizer import BPETokenizer
    return GPT.from_pretrained(hf[0], dropout=0.0).eval(), BPETokenizer("gpt2")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, data_mirror):
    with open(data_mirror / "tinyshakespeare" / "input.txt", encoding="utf-8") as f:
        text = f.read()[:1500] + "Café naïve — 東京 🙂 done.\n<|endoftext|>Next 🙂🙂 document.\n"  # multi-byte characters, a document boundary
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(text, encoding="utf-8")
    return str(path), text


HELLASWAG = [
    {"ctx": "A man is sitting on a roof. he", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."]},
    {"ctx": "The cat sat on the mat and then", "label": 0,
     "endings": ["went to sleep.", "jumped over the moon and landed softly in a field of tall grass.", "ate.", "left"]},
    {"ctx": " ".join(["Long context to force truncation from the left of the window."] * 12) + " Finally she",
     "label": 1, "endings": ["smiled.", "walked out of the room without saying a word.", "sat down.", "laughed again."]},
    {"ctx": "To bake bread, first you", "label": 2, "endings": ["knead the dough.", "fly", "mix flour, water and yeast."]},
]


@pytest.fixture(scope="module")
def hellaswag_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in HELLASWAG), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def lambada_file(tmp_path_factory, hf, bpe):
    """Texts whose last word is the random model's own greedy next token (so some answers are
    right) and ordinary texts (whose answers are wrong)."""
    model = hf[1]
    lines = ["First Citizen: Before we proceed any further, hear me speak",
             "All: Speak, speak. You are all resolved rather to die than to famish"]
    prompts = ["The quick brown fox jumps over the", "She opened the door and saw", "In the morning we went to the",
               "He said that he would", "They walked along the river until", "My favourite colour is",
               "The king looked at his", "Once upon a time there was a", "We will meet again in"]
    for prompt in prompts:
        ids = bpe.encode(prompt)
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        word = bpe.decode([nxt])
        if word.startswith(" ") and word[1:].isalpha() and bpe.encode(word) == [nxt]:
            lines.append(prompt + word)
            longer = word + "xqz"  # its first token is still the greedy one, the rest is not
            if bpe.encode(longer)[0] == nxt:
                lines.append(prompt + longer)
    assert len(lines) >= 4, "too few texts ending in the model's greedy word"
    path = tmp_path_factory.mktemp("lam") / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    return str(path), lines


# --------------------------------------------------------------------------------------------
# direct computations with transformers' model


def hf_logprobs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)


def reference_nll(model, ids, window, stride):
    """Summed loss over tokens 1..n-1 and how many were scored: each window reads up to
    ``window`` tokens and scores the targets no earlier window scored."""
    n, nll, scored_upto, count = len(ids), 0.0, 0, 0
    for begin in range(0, n, stride):
        inputs = ids[begin:begin + window]
        if begin + len(inputs) > n - 1:
            inputs = ids[begin:n - 1]
        if not inputs or begin + len(inputs) <= scored_upto:
            break
        lp = hf_logprobs(model, inputs)
        for pos in range(len(inputs)):
            target = begin + pos + 1
            if target > scored_upto:
                nll -= lp[pos, ids[target]].item()
                count += 1
        scored_upto = begin + len(inputs)
    return nll, count


def reference_continuation(model, context, cont, window):
    """(summed log-probability of cont, greedy hit) with the joined sequence cut from the left."""
    seq = (context + cont)[-(window + 1):]
    lp = hf_logprobs(model, seq[:-1])
    k = min(len(cont), len(seq) - 1)
    positions = range(len(seq) - 1 - k, len(seq) - 1)
    total = sum(lp[p, seq[p + 1]].item() for p in positions)
    greedy = all(int(lp[p].argmax()) == seq[p + 1] for p in positions)
    return total, greedy


# --------------------------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("n,window,stride", [(2, 4, 4), (10, 4, 4), (11, 4, 1), (100, 16, 5), (17, 16, 16), (64, 8, 3)])
def test_windows_score_every_token_once(n, window, stride):
    seen = []
    spans = list(scoring.iter_windows(n, window, stride))
    assert len(spans) == scoring.window_count(n, window, stride)
    for i, (begin, end, first) in enumerate(spans):
        assert 0 < end - begin <= window and end <= n - 1 and begin < first <= end + 1
        seen.extend(range(first, end + 1))
        if i > 0:  # a later window gives each scored token at least window - stride tokens of context
            assert first - begin >= min(window - stride, first) or end == n - 1
    assert seen == list(range(1, n))


@pytest.mark.parametrize("n,window", [(2, 4), (5, 4), (9, 4), (10, 4), (100, 16), (33, 32)])
def test_rolling_windows_are_disjoint_with_full_context(n, window):
    """definitions=lm_eval: every token from 1 on scored once, each window reads a whole window
    when the sequence has that many tokens before its end, and the scored runs are disjoint."""
    seen = []
    spans = list(scoring.rolling_windows(n, window))
    assert len(spans) == scoring.window_count(n, window, window)
    for begin, end, first in spans:
        assert end - begin == min(window, end) and begin < first <= end and end <= n - 1
        assert end - first + 1 <= window
        seen.extend(range(first, end + 1))
    assert seen == list(range(1, n))
    pairs = scoring.rolling_pairs(list(range(100, 100 + n - 1)), 7, window)
    assert [t for _, cont in pairs for t in cont] == list(range(100, 100 + n - 1))
    assert pairs[0][0] == [7] and all(len(c) + len(k) <= window + 1 for c, k in pairs)


def test_lm_eval_perplexity_scores_the_first_token_after_eot(hf, ours, text_file, bpe):
    model, tok = ours
    ids = bpe.encode(text_file[1], allowed_special={"<|endoftext|>"})
    r = scoring.perplexity(model, np.array(ids), tok, "cpu", nullcontext(), BLOCK, BLOCK, batch_size=3, progress=False,
                           definitions="lm_eval")
    seq, nll = [bpe.eot_token] + ids, 0.0
    for done in range(0, len(ids), BLOCK):  # predict ids[done:done + BLOCK] from a full window before them
        end = min(done + BLOCK, len(ids))
        inputs = seq[max(0, end - BLOCK):end]
        lp = hf_logprobs(hf[1], inputs)
        for target in range(done, end):  # seq index target + 1, read at position target + 1 - start - 1
            nll -= lp[target - max(0, end - BLOCK), ids[target]].item()
    assert r["tokens"] == len(ids)
    assert r["loss"] * r["tokens"] == pytest.approx(nll, rel=1e-5)
    assert r["bytes"] == len(text_file[1].encode("utf-8"))  # <|endoftext|> counts as its text, as lm-eval counts it
    assert len(ids) % BLOCK and len(ids) > 2 * BLOCK  # a short last window with full context was exercised


def test_encode_pair_moves_the_space_and_splits_the_joined_tokens(ours, bpe):
    tok = ours[1]
    assert scoring.encode_pair(tok, "To bake bread, you ", "knead") == (bpe.encode("To bake bread, you"), bpe.encode(" knead"))
    assert scoring.encode_pair(tok, "", "Hello") == ([bpe.eot_token], bpe.encode("Hello"))
    context, cont = scoring.encode_pair(tok, "caf", "é au lait")  # one token may span the join
    assert context == bpe.encode("caf") and context + cont == bpe.encode("café au lait")


def test_utf8_len_counts_bytes_not_characters(ours, bpe):
    tok = ours[1]
    ids = bpe.encode("a🙂b")
    assert len(ids) > 3  # the emoji's four bytes span two tokens
    assert sum(scoring.utf8_len(tok, [i]) for i in ids) == scoring.utf8_len(tok, ids) == 6
    assert scoring.utf8_len(tok, [bpe.eot_token] + ids) == 6
    from nanogpt.tokenizer import CharTokenizer
    chars = CharTokenizer({"stoi": {"a": 0, "é": 1}, "itos": {0: "a", 1: "é"}})
    assert scoring.utf8_len(chars, [0, 1, 1]) == 5


# --------------------------------------------------------------------------------------------
# perplexity against transformers


@pytest.mark.parametrize("stride", [BLOCK, 16])
def test_perplexity_matches_transformers(hf, ours, text_file, bpe, stride):
    model, tok = ours
    ids = bpe.encode(text_file[1], allowed_special={"<|endoftext|>"})
    r = scoring.perplexity(model, np.array(ids), tok, "cpu", nullcontext(), BLOCK, stride, batch_size=3, progress=False)
    nll, count = reference_nll(hf[1], ids, BLOCK, stride)
    assert r["tokens"] == count == len(ids) - 1
    assert r["loss"] == pytest.approx(nll / count, rel=1e-4, abs=1e-4)
    assert r["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    # the boundary token stands for no text
    n_bytes = len(text_file[1].replace("<|endoftext|>", "").encode("utf-8")) - len(bpe.decode_single_token_bytes(ids[0]))
    assert r["bytes"] == n_bytes
    assert r["bpb"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)


def test_overlapping_windows_change_the_context(ours, text_file, bpe):
    model, tok = ours
    ids = np.array(bpe.encode(text_file[1], allowed_special="all"))
    a = scoring.perplexity(model, ids, tok, "cpu", nullcontext(), BLOCK, BLOCK, progress=False)
    b = scoring.perplexity(model, ids, tok, "cpu", nullcontext(), BLOCK, 8, progress=False)
    c = scoring.perplexity(model, ids, tok, "cpu", nullcontext(), BLOCK, 8, batch_size=5, progress=False)
    assert a["tokens"] == b["tokens"] and a["bytes"] == b["bytes"]
    assert abs(a["loss"] - b["loss"]) > 1e-3  # the same tokens, scored with other contexts
    assert b["loss"] == pytest.approx(c["loss"], rel=1e-6)  # batching does not change what is scored


def test_padded_vocabulary_is_left_out(ours, text_file, bpe):
    """A model with padded vocabulary rows scores like the unpadded one, whatever those rows hold."""
    model, tok = ours
    padded = GPT(GPTConfig(**dict(asdict(model.config), vocab_size=50304))).eval()
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in padded.state_dict().items():
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v[:50257] = sd[k]
                v[50257:] = torch.randn_like(v[50257:])
            else:
                v.copy_(sd[k])
    ids = np.array(bpe.encode(text_file[1], allowed_special="all"))[:200]
    a = scoring.perplexity(model, ids, tok, "cpu", nullcontext(), BLOCK, BLOCK, progress=False)
    b = scoring.perplexity(padded, ids, tok, "cpu", nullcontext(), BLOCK, BLOCK, progress=False)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


# --------------------------------------------------------------------------------------------
# HellaSwag and LAMBADA against transformers


def test_hellaswag_matches_transformers(hf, ours, hellaswag_file, bpe):
    model, tok = ours
    r = scoring.hellaswag(model, hellaswag_file, tok, "cpu", nullcontext(), BLOCK, batch_size=5, progress=False, details=True)
    assert r["n"] == len(HELLASWAG)
    acc = acc_norm = 0
    for ex, got in zip(HELLASWAG, r["examples"]):
        ctx_ids = bpe.encode(ex["ctx"])
        sums, means = [], []
        for ending in ex["endings"]:
            cont = bpe.encode(" " + ending)
            total, _ = reference_continuation(hf[1], ctx_ids, cont, BLOCK)
            sums.append(total)
            means.append(total / len(cont))
        assert got["logprob"] == pytest.approx(sums, abs=1e-4)
        assert got["mean_logprob"] == pytest.approx(means, abs=1e-4)
        acc += int(np.argmax(sums)) == ex["label"]
        acc_norm += int(np.argmax(means)) == ex["label"]
    assert len(bpe.encode(HELLASWAG[2]["ctx"])) > BLOCK  # the left truncation was exercised
    assert (r["acc"], r["acc_norm"]) == (acc / len(HELLASWAG), acc_norm / len(HELLASWAG))


def first_token_hits(model, lines, bpe):
    out = []
    for text in lines:
        context, word = text.rsplit(" ", 1)
        ids = bpe.encode(context)
        out.append(int(hf_logprobs(model, ids)[-1].argmax()) == bpe.encode(" " + word)[0])
    return out


def test_acc_sums_and_acc_norm_averages(monkeypatch, hellaswag_file, ours):
    """acc picks the largest summed log-probability, acc_norm the largest mean per token."""
    sizes = [len(e["endings"]) for e in HELLASWAG]
    n_tokens = [[1 + 5 * (j == e["label"]) for j in range(k)] for e, k in zip(HELLASWAG, sizes)]

    def fake(model, pairs, *a, **kw):  # the right ending: 6 tokens at -1.5 each; the others: 1 token at -2
        assert len(pairs) == sum(sizes)
        return [(-1.5 * n if n > 1 else -2.0, n, False) for row in n_tokens for n in row]

    monkeypatch.setattr(scoring, "score_continuations", fake)
    r = scoring.hellaswag(ours[0], hellaswag_file, ours[1], "cpu", nullcontext(), BLOCK, progress=False)
    assert (r["acc"], r["acc_norm"]) == (0.0, 1.0)


def test_acc_norm_per_character_under_lm_eval_definitions(monkeypatch, hellaswag_file, ours):
    """definitions=lm_eval divides by the ending's characters, acc_bytes by its bytes, under both."""
    sizes = [len(e["endings"]) for e in HELLASWAG]

    def fake(model, pairs, *a, **kw):  # log-probability -1 per character: every ending ties per character
        out = []
        for e in HELLASWAG:
            out.extend((-1.0 * len(x) - (0.5 if j == e["label"] else 1.0), 3, False) for j, x in enumerate(e["endings"]))
        assert len(pairs) == len(out) == sum(sizes)
        return out

    monkeypatch.setattr(scoring, "score_continuations", fake)
    r = scoring.hellaswag(ours[0], hellaswag_file, ours[1], "cpu", nullcontext(), BLOCK, progress=False,
                          definitions="lm_eval", details=True)
    assert r["acc_norm_per"] == "character"
    for ex, got in zip(HELLASWAG, r["examples"]):
        assert got["char_logprob"] == pytest.approx([lp / len(x) for lp, x in zip(got["logprob"], ex["endings"])])
    per_char = [int(np.argmax([lp / len(x) for lp, x in zip(got["logprob"], ex["endings"])]) == ex["label"])
                for ex, got in zip(HELLASWAG, r["examples"])]
    assert r["acc_norm"] == sum(per_char) / len(HELLASWAG)
    base = scoring.hellaswag(ours[0], hellaswag_file, ours[1], "cpu", nullcontext(), BLOCK, progress=False)
    assert base["acc_norm_per"] == "token" and base["acc_bytes"] == r["acc_bytes"]


def test_lambada_matches_transformers(hf, ours, lambada_file, bpe):
    model, tok = ours
    path, lines = lambada_file
    r = scoring.lambada(model, path, tok, "cpu", nullcontext(), BLOCK, batch_size=4, progress=False, details=True)
    hits, nll = [], 0.0
    for text, (lp, k, greedy) in zip(lines, r["examples"]):
        context, word = text.rsplit(" ", 1)
        cont = bpe.encode(" " + word)
        total, ref_greedy = reference_continuation(hf[1], bpe.encode(context), cont, BLOCK)
        assert lp == pytest.approx(total, abs=1e-4) and k == len(cont) and greedy == ref_greedy
        hits.append(ref_greedy)
        nll -= total
    assert any(hits) and not all(hits)  # both outcomes occur
    assert any(k > 1 and first_hit and not ok for (_, k, ok), first_hit in zip(r["examples"], first_token_hits(hf[1], lines, bpe)))
    assert r["n"] == len(lines) and r["acc"] == sum(hits) / len(lines)
    assert r["loss"] == pytest.approx(nll / len(lines), rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll / len(lines)), rel=1e-4)
    assert scoring.lambada(model, path, tok, "cpu", nullcontext(), BLOCK, limit=2, progress=False)["n"] == 2


# --------------------------------------------------------------------------------------------
# the training-loop API


def test_run_tasks_keeps_the_mode_and_is_deterministic(ours, hellaswag_file, lambada_file, text_file):
    model, tok = ours
    tasks = scoring.parse_tasks("hellaswag=%s, lambada=%s,ppl=%s" % (hellaswag_file, lambada_file[0], text_file[0]))
    assert list(tasks) == ["hellaswag", "lambada", "ppl"]
    model.train()
    try:
        first = scoring.run_tasks(model, tasks, tok, "cpu", nullcontext())
        assert model.training
        model.eval()
        second = scoring.run_tasks(model, tasks, tok, "cpu", nullcontext())
        assert not model.training
    finally:
        model.eval()
    assert set(first) == {"hellaswag/acc", "hellaswag/acc_norm", "lambada/acc", "lambada/ppl", "ppl/loss", "ppl/ppl", "ppl/bpb"}
    assert first == second  # bit for bit
    direct = scoring.hellaswag(model, hellaswag_file, tok, "cpu", nullcontext(), BLOCK, progress=False)
    assert first["hellaswag/acc_norm"] == direct["acc_norm"]
    limited = scoring.run_tasks(model, {"ppl": text_file[0]}, tok, "cpu", nullcontext(), limit=2)
    assert limited["ppl/loss"] != first["ppl/loss"]  # two windows, not the whole text


@pytest.mark.parametrize("spec,needle", [("hellaswag", "TASK=PATH"), ("mmlu=x.jsonl", "unknown task 'mmlu'"),
                                         ("lambada=/no/such/file.jsonl", "does not exist")])
def test_parse_tasks_errors_name_the_key(spec, needle):
    with pytest.raises(ConfigError) as e:
        scoring.parse_tasks(spec)
    assert str(e.value).startswith("eval_tasks") and needle in str(e.value)
    assert scoring.parse_tasks("") == {}


def test_bad_task_files_are_one_line(tmp_path, ours):
    model, tok = ours
    bad = tmp_path / "bad.jsonl"
    for content, needle in (('{"ctx": "a", "endings": ["b"], "label": 3}\n', "line 1"), ("{nope\n", "not valid JSON"), ("\n", "no examples")):
        bad.write_text(content)
        with pytest.raises(UserError) as e:
            scoring.hellaswag(model, str(bad), tok, "cpu", nullcontext(), BLOCK, progress=False)
        assert needle in str(e.value) and "\n" not in str(e.value)
    bad.write_text('{"text": "oneword"}\n')
    with pytest.raises(UserError, match="words before its last word"):
        scoring.lambada(model, str(bad), tok, "cpu", nullcontext(), BLOCK, progress=False)


def test_config_validation():
    for argv, key in ((["--stride=65", "--block_size=64"], "stride"), (["--batch_size=0"], "batch_size"),
                      (["--max_tokens=1"], "max_tokens"), (["--hellaswag=/no/such.jsonl"], "hellaswag"),
                      (["--sha256=xyz"], "sha256"), (["--dataset=a", "--text_file=%s" % __file__], "text_file"),
                      (["--split=../val"], "split")):
        cfg, _ = parse(EvalConfig, argv)
        with pytest.raises(ConfigError, match=key):
            cfg.validate()


def test_download_needs_a_checksum_or_a_good_copy(tmp_path, monkeypatch):
    cfg = EvalConfig(hellaswag="download", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--sha256"):
        evaluate.task_file("hellaswag", "download", cfg)
    # a mirror copy is checked against the pinned checksum: a wrong file is refused, not used
    mirror = tmp_path / "mirror"
    (mirror / "lambada").mkdir(parents=True)
    (mirror / "lambada" / "lambada_test.jsonl").write_text('{"text": "not the real file"}\n')
    cfg = EvalConfig(lambada="download", cache_dir=str(tmp_path / "cache"), mirror=str(mirror))
    with pytest.raises(UserError, match="expected %s" % scoring.LAMBADA_SHA256):
        evaluate.task_file("lambada", "download", cfg)
    assert not (tmp_path / "cache" / "lambada_test.jsonl").exists()
    # with the user's checksum the same mechanism accepts a file
    import hashlib
    body = (mirror / "lambada" / "lambada_test.jsonl").read_bytes()
    cfg.sha256 = hashlib.sha256(body).hexdigest()
    assert open(evaluate.task_file("lambada", "download", cfg), "rb").read() == body


# --------------------------------------------------------------------------------------------
# a character-level training checkpoint, evaluated on its dataset's val split


def test_char_checkpoint_on_val_split(data_root, tmp_path):
    from nanogpt.data import load_meta
    meta = load_meta(str(data_root / "shakespeare_char"))
    torch.manual_seed(1)
    gconf = GPTConfig(block_size=32, vocab_size=meta["vocab_size"], n_layer=1, n_head=2, n_embd=32, dropout=0.0)
    model = GPT(gconf).eval()
    tconf = TrainConfig(dataset="shakespeare_char", data_root=str(data_root), out_dir=str(tmp_path))
    checkpoint.save({"format": checkpoint.FORMAT, "model": model.state_dict(), "model_args": asdict(gconf),
                     "config": tconf.to_dict(), "iter_num": 0, "tokens_seen": 0}, str(tmp_path / "ckpt.pt"))
    # no dataset named: the training run's dataset, val split
    r = eval_cmd(["--out_dir=%s" % tmp_path, "--data_root=%s" % data_root, "--device=cpu", "--max_tokens=1000",
                           "--batch_size=7", "--json_out=%s" % (tmp_path / "r.json")])
    p = r["perplexity"]
    assert p["source"].endswith(os.path.join("shakespeare_char", "val.bin")) and p["tokens"] == 999
    val = np.fromfile(data_root / "shakespeare_char" / "val.bin", dtype=meta["dtype"])[:1000].astype(np.int64)
    nll = 0.0
    with torch.no_grad():
        for begin in range(0, 999, 32):
            x = torch.from_numpy(val[begin:min(begin + 32, 999)])[None]
            y = torch.from_numpy(val[begin + 1:min(begin + 33, 1000)])[None]
            nll += F.cross_entropy(model(x)[0][0], y[0], reduction="sum").item()
    assert p["loss"] == pytest.approx(nll / 999, rel=1e-5)
    text = "".join(meta["itos"][int(i)] for i in val[1:])
    assert p["bytes"] == len(text.encode("utf-8"))
    assert p["bpb"] == pytest.approx(nll / math.log(2) / p["bytes"], rel=1e-5)
    assert json.loads((tmp_path / "r.json").read_text())["perplexity"]["loss"] == p["loss"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    # the train split can be chosen
    r2 = eval_cmd(["--out_dir=%s" % tmp_path, "--data_root=%s" % data_root, "--device=cpu", "--split=train",
                            "--dataset=shakespeare_char", "--max_tokens=200", "--block_size=16", "--stride=4"])
    assert r2["perplexity"]["source"].endswith("train.bin") and r2["perplexity"]["tokens"] == 199
    # without the character table the tokenizer would be GPT-2 BPE: refused, pointing at data_root
    other = tmp_path / "elsewhere"
    other.mkdir()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["config"]["data_root"] = str(other)
    checkpoint.save(ckpt, str(tmp_path / "ckpt.pt"))
    with pytest.raises(UserError, match="--data_root"):
        eval_cmd(["--out_dir=%s" % tmp_path, "--data_root=%s" % other, "--device=cpu", "--text_file=%s" % __file__])


def test_training_loop_runs_the_tasks(data_root, tmp_path):
    """eval_tasks in a short training run: the logged ppl/loss is what eval.py measures on the
    checkpoint saved at that evaluation."""
    from nanogpt import metrics
    from helpers import train
    with open(os.path.join(ROOT, "data", "shakespeare_char", "input.txt"), encoding="utf-8") as f:
        text = f.read()[:2000]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    (tmp_path / "l.jsonl").write_text(json.dumps({"text": text[:300]}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    train(["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
           "--gradient_accumulation_steps=1", "--eval_iters=2", "--warmup_iters=1", "--dataset=shakespeare_char",
           "--data_root=%s" % data_root, "--out_dir=%s" % out, "--max_iters=2", "--lr_decay_iters=2", "--eval_interval=2",
           "--eval_tasks=ppl=%s,lambada=%s" % (tmp_path / "t.txt", tmp_path / "l.jsonl")])
    evals = [r for r in metrics.read(str(out / "metrics.jsonl")) if r.get("kind") == "eval"]
    assert evals and all({"ppl/loss", "ppl/bpb", "lambada/acc", "lambada/ppl"} <= set(r) for r in evals)
    r = eval_cmd(["--out_dir=%s" % out, "--device=cpu", "--text_file=%s" % (tmp_path / "t.txt")])
    assert r["perplexity"]["loss"] == pytest.approx(evals[-1]["ppl/loss"], rel=1e-5)
    assert r["perplexity"]["bpb"] == pytest.approx(evals[-1]["ppl/bpb"], rel=1e-5)


def test_a_bpe_model_refuses_character_data(hf, data_root):
    with pytest.raises(UserError, match="character vocabulary"):
        eval_cmd(["--init_from=%s" % hf[0], "--device=cpu", "--dataset=shakespeare_char", "--data_root=%s" % data_root])


# --------------------------------------------------------------------------------------------
# the command line as users run it


def run_eval(args, env):
    return subprocess.run([sys.executable, "eval.py", "--device=cpu"] + args, cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=180)


def test_cli_matches_the_api(tmp_path, hf, ours, text_file, hellaswag_file, lambada_file, data_mirror):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", TIKTOKEN_CACHE_DIR=str(data_mirror / "tiktoken-cache"))
    out = tmp_path / "results.json"
    r = run_eval(["--init_from=%s" % hf[0], "--text_file=%s" % text_file[0], "--stride=16", "--hellaswag=%s" % hellaswag_file,
                  "--lambada=%s" % lambada_file[0], "--json_out=%s" % out], env)
    assert r.returncode == 0, r.stderr
    for word in ("perplexity", "bits/byte", "hellaswag", "acc_norm", "lambada"):
        assert word in r.stdout
    got = json.loads(out.read_text())
    model, tok = ours
    ids = np.array(tok.encode(text_file[1]))
    direct = scoring.perplexity(model, ids, tok, "cpu", nullcontext(), BLOCK, 16, progress=False)
    assert got["perplexity"]["loss"] == pytest.approx(direct["loss"], rel=1e-6)
    assert got["perplexity"]["bpb"] == pytest.approx(direct["bpb"], rel=1e-6)
    assert got["hellaswag"]["n"] == len(HELLASWAG) and got["lambada"]["n"] == len(lambada_file[1])
    hs = scoring.hellaswag(model, hellaswag_file, tok, "cpu", nullcontext(), BLOCK, progress=False)
    assert (got["hellaswag"]["acc"], got["hellaswag"]["acc_norm"]) == (hs["acc"], hs["acc_norm"])

    bad = run_eval(["--init_from=%s" % hf[0], "--hellaswag=download", "--cache_dir=%s" % tmp_path], env)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: hellaswag=download needs --sha256="), bad.stderr
