"""lm-evaluation-harness through our adapter (model "nanogpt"): on task files written here, it gives
the per-request log-likelihoods and generations of lm-eval's own ``hf`` backend on the exported
folder, and for a RoPE / ReLU² / QK-norm character model (which cannot be exported) those of eval.py
with ``--definitions=lm_eval``."""

import json
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from helpers import export, run_main  # noqa: E402
from nanogpt import checkpoint, scoring  # noqa: E402
from nanogpt.data import load_meta  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402
from nanogpt.tokenizer import vocabulary_for  # noqa: E402
from nanogpt.train import TrainConfig  # noqa: E402

BLOCK = 32
TOL = 1e-4

MC = [
    {"ctx": "The cat sat on the", "endings": ["mat.", "moon and the stars above it", "dog"], "label": 0},
    {"ctx": "To bake bread, first you ", "endings": ["knead the dough.", "fly", "mix flour, water and yeast."], "label": 2},
    {"ctx": " ".join(["A long context that is cut from the left of the window."] * 4) + " Then she",
     "endings": ["smiled.", "walked out of the room without a word.", "sat down, café au lait in hand."], "label": 1},
    {"ctx": "", "endings": ["Hello there.", "Goodbye now, naïve one.", "Yes"], "label": 2},
    {"ctx": "Which is heavier?", "endings": ["A ton of bricks", "A ton of feathers", "Neither: they weigh the same"],
     "label": 2},
]
DOCS = [
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. You are all resolved rather to "
    "die than to famish? All: Resolved. resolved. First Citizen: First, you know Caius Marcius is chief enemy to "
    "the people. All: We know't, we know't.",
    "Short one.",
    "Exactly the right length to fill a window, give or take a few words more or less than that.",
]
PROMPTS = [{"prompt": "Once upon a time", "answer": " there"}, {"prompt": "The king said to the queen:", "answer": " no"},
           {"prompt": "ROMEO:", "answer": " O"}]


def task_yaml(name, data, output_type, extra):
    return ("task: %s\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: %s\ntest_split: test\n"
            "output_type: %s\n%s" % (name, data, output_type, extra))


MC_YAML = ('doc_to_text: "{{ctx}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{endings}}"\n'
           "metric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n")
ROLL_YAML = ('doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
             "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
GEN_YAML = ('doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
            'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 8\n  do_sample: false\n'
            "metric_list:\n  - metric: exact_match\n")


def write_tasks(folder, mc, docs, prompts=None):
    """Local lm-eval tasks: nano_mc (multiple choice), nano_roll (loglikelihood_rolling) and, with
    prompts, nano_gen (generate_until); their data as jsonl beside the YAML files."""
    folder.mkdir(parents=True, exist_ok=True)
    sets = [("nano_mc", mc, "multiple_choice", MC_YAML), ("nano_roll", [{"text": t} for t in docs], "loglikelihood_rolling", ROLL_YAML)]
    if prompts:
        sets.append(("nano_gen", prompts, "generate_until", GEN_YAML))
    for name, rows, kind, extra in sets:
        data = folder / (name + ".jsonl")
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        (folder / (name + ".yaml")).write_text(task_yaml(name, data, kind, extra), encoding="utf-8")
    return str(folder)


def harness(model, model_args, folder, tasks):
    import lm_eval
    from lm_eval.tasks import TaskManager
    import nanogpt.lm_eval_adapter  # noqa: F401  registers "nanogpt"
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True, bootstrap_iters=0,
                                   task_manager=TaskManager(include_path=folder, include_defaults=False))


def responses(out, task):
    """Each request's answer, in document order: (log-likelihood, greedy) pairs, floats or strings."""
    rows = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [r[0] for s in rows for r in s["resps"]]


def save_run(out_dir, model, **config):
    os.makedirs(out_dir, exist_ok=True)
    ckpt = {"format": checkpoint.FORMAT, "model": model.state_dict(), "model_args": asdict(model.config),
            "config": TrainConfig(**config).to_dict(), "iter_num": 1}
    checkpoint.save(ckpt, os.path.join(out_dir, "ckpt.pt"))


def perturbed(config, seed, scale):
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():  # a peaked distribution: clear-cut greedy tokens and choices
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


# --------------------------------------------------------------------------------------------
# a GPT-2-shaped model: the adapter on its checkpoint against lm-eval's hf backend on its export


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory, data_mirror):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # lm-eval's hf backend imports it
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    root = tmp_path_factory.mktemp("lm_eval_gpt2")
    model = perturbed(GPTConfig(block_size=BLOCK, vocab_size=50257, n_layer=2, n_head=2, n_embd=32), 0, 0.2)
    save_run(str(root / "out"), model)
    export(["--out_dir=%s" % (root / "out"), "--hf_dir=%s" % (root / "hf"), "--mirror=%s" % data_mirror])
    folder = write_tasks(root / "tasks", MC, DOCS, PROMPTS)
    tasks = ["nano_mc", "nano_roll", "nano_gen"]
    ours = harness("nanogpt", "out_dir=%s,device=cpu,batch_size=4" % (root / "out"), folder, tasks)
    theirs = harness("hf", "pretrained=%s,device=cpu,batch_size=4,dtype=float32" % (root / "hf"), folder, tasks)
    yield ours, theirs, root, model
    mp.undo()


def test_loglikelihoods_match_lm_evals_hf_backend(gpt2_runs):
    ours, theirs, _, _ = gpt2_runs
    for task in ("nano_mc", "nano_roll"):
        a, b = responses(ours, task), responses(theirs, task)
        assert len(a) == len(b) == (sum(len(d["endings"]) for d in MC) if task == "nano_mc" else len(DOCS))
        if task == "nano_mc":
            assert [g for _, g in a] == [g for _, g in b]
            a, b = [lp for lp, _ in a], [lp for lp, _ in b]
        assert np.max(np.abs(np.array(a) - np.array(b))) < TOL, (task, a, b)
    for key in ("acc,none", "acc_norm,none", "acc_bytes,none"):
        assert ours["results"]["nano_mc"][key] == theirs["results"]["nano_mc"][key]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["nano_roll"][key] == pytest.approx(theirs["results"]["nano_roll"][key], rel=1e-5)


def test_greedy_generation_matches_lm_evals_hf_backend(gpt2_runs):
    ours, theirs, _, _ = gpt2_runs
    a, b = responses(ours, "nano_gen"), responses(theirs, "nano_gen")
    assert a == b and len(a) == len(PROMPTS)
    assert any(a), "every generation is empty: the stop strings cut them all at once"


def test_the_acc_norm_variants_are_lm_evals(gpt2_runs):
    """acc_norm divides by characters, acc_bytes by UTF-8 bytes (of the ending without the space)."""
    ours = gpt2_runs[0]
    lls = [lp for lp, _ in responses(ours, "nano_mc")]
    it = iter(lls)
    norm = by_bytes = 0
    for doc in MC:
        row = np.array([next(it) for _ in doc["endings"]])
        norm += int(np.argmax(row / [len(e) for e in doc["endings"]]) == doc["label"])
        by_bytes += int(np.argmax(row / [len(e.encode()) for e in doc["endings"]]) == doc["label"])
    assert ours["results"]["nano_mc"]["acc_norm,none"] == norm / len(MC)
    assert ours["results"]["nano_mc"]["acc_bytes,none"] == by_bytes / len(MC)


def test_eval_cli_runs_the_harness(gpt2_runs, capsys):
    ours, _, root, _ = gpt2_runs
    out = root / "eval.json"
    r = run_main("eval.py", ["--out_dir=%s" % (root / "out"), "--device=cpu", "--lm_eval_tasks=nano_mc,nano_roll",
                             "--lm_eval_include=%s" % (root / "tasks"), "--lm_eval_builtin=False", "--json_out=%s" % out],
                 capsys)
    assert r.returncode == 0, r.stderr
    got = json.loads(out.read_text())["lm_eval"]
    assert got["nano_mc"]["acc_norm"] == ours["results"]["nano_mc"]["acc_norm,none"]
    assert got["nano_roll"]["bits_per_byte"] == pytest.approx(ours["results"]["nano_roll"]["bits_per_byte,none"], rel=1e-6)
    assert "lm_eval    nano_mc (5 examples): acc " in r.stdout


def test_eval_py_with_lm_eval_definitions_agrees(gpt2_runs, tmp_path):
    """eval.py's own HellaSwag and perplexity, --definitions=lm_eval, on the same model and data."""
    ours, _, _, model = gpt2_runs
    vocab = vocabulary_for(None, "data", model.config.vocab_size)
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in MC if d["ctx"]), encoding="utf-8")
    r = scoring.hellaswag(model, str(path), vocab.tokenizer, "cpu", nullcontext(), BLOCK, 3, progress=False, details=True,
                          definitions="lm_eval")
    mine = [lp for e in r["examples"] for lp in e["logprob"]]
    lls = [lp for lp, _ in responses(ours, "nano_mc")]
    theirs = [lp for d, start in zip(MC, np.cumsum([0] + [len(d["endings"]) for d in MC])) if d["ctx"]
              for lp in lls[start:start + len(d["endings"])]]
    assert np.max(np.abs(np.array(mine) - np.array(theirs))) < TOL
    for doc, ll in zip(DOCS, responses(ours, "nano_roll")):
        ids = np.array(vocab.tokenizer.encode(doc))
        p = scoring.perplexity(model, ids, vocab.tokenizer, "cpu", nullcontext(), BLOCK, BLOCK, 2, progress=False,
                               definitions="lm_eval")
        assert p["tokens"] == len(ids) and p["bytes"] == len(doc.encode())
        assert -p["loss"] * p["tokens"] == pytest.approx(ll, abs=TOL)


# --------------------------------------------------------------------------------------------
# the CPU recipe's features on a character vocabulary: no export, so against eval.py

CHAR_MC = [
    {"ctx": "ROMEO: What light through yonder", "endings": ["window breaks?", "door comes?", "sky"], "label": 0},
    {"ctx": "JULIET: O Romeo, Romeo! wherefore art thou ", "endings": ["Romeo?", "here", "gone, and far away from me"],
     "label": 0},
    {"ctx": "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n", "endings": ["Speak, speak.", "No.", "Away!"],
     "label": 0},
]
CHAR_DOCS = ["First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n",
             "KING:\nWhat say you?"]


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("lm_eval_rope")
    vocab_size = len(load_meta(str(data_root / "shakespeare_char"))["itos"])
    config = GPTConfig(block_size=BLOCK, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, rope=True, qk_norm=True,
                       mlp_activation="relu2", bias=False)
    model = perturbed(config, 1, 0.1)
    save_run(str(root / "out"), model, dataset="shakespeare_char", data_root=str(data_root))
    folder = write_tasks(root / "tasks", CHAR_MC, CHAR_DOCS)
    out = harness("nanogpt", "out_dir=%s,data_root=%s,device=cpu,batch_size=3" % (root / "out", data_root), folder,
                  ["nano_mc", "nano_roll"])
    return out, model, vocabulary_for({"dataset": "shakespeare_char"}, str(data_root), vocab_size), root


def test_rope_char_model_equals_eval_py(rope_run, tmp_path):
    out, model, vocab, root = rope_run
    assert vocab.kind == "char"
    path = tmp_path / "hs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in CHAR_MC), encoding="utf-8")
    r = scoring.hellaswag(model, str(path), vocab.tokenizer, "cpu", nullcontext(), BLOCK, 4, progress=False, details=True,
                          definitions="lm_eval")
    mine = [lp for e in r["examples"] for lp in e["logprob"]]
    theirs = [lp for lp, _ in responses(out, "nano_mc")]
    assert np.max(np.abs(np.array(mine) - np.array(theirs))) < TOL
    assert (r["acc"], r["acc_norm"], r["acc_bytes"]) == tuple(out["results"]["nano_mc"][k + ",none"]
                                                              for k in ("acc", "acc_norm", "acc_bytes"))
    text = tmp_path / "doc.txt"
    text.write_text(CHAR_DOCS[0], encoding="utf-8")
    ids = np.array(vocab.tokenizer.encode(CHAR_DOCS[0]))
    p = scoring.perplexity(model, ids, vocab.tokenizer, "cpu", nullcontext(), BLOCK, BLOCK, 2, progress=False,
                           definitions="lm_eval")
    assert -p["loss"] * p["tokens"] == pytest.approx(responses(out, "nano_roll")[0], abs=TOL)


def test_rope_model_through_the_command(rope_run, data_root, tmp_path, capsys):
    out, _, _, root = rope_run
    js = tmp_path / "r.json"
    r = run_main("eval.py", ["--out_dir=%s" % (root / "out"), "--data_root=%s" % data_root, "--device=cpu",
                             "--lm_eval_tasks=nano_mc", "--lm_eval_include=%s" % (root / "tasks"),
                             "--lm_eval_builtin=False", "--json_out=%s" % js], capsys)
    assert r.returncode == 0, r.stderr
    assert json.loads(js.read_text())["lm_eval"]["nano_mc"]["acc"] == out["results"]["nano_mc"]["acc,none"]


# --------------------------------------------------------------------------------------------
# errors a user meets


def test_missing_lm_eval_is_one_line(rope_run, monkeypatch, capsys):
    _, _, _, root = rope_run
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails
    monkeypatch.delitem(sys.modules, "nanogpt.lm_eval_adapter", raising=False)
    monkeypatch.delattr("nanogpt.lm_eval_adapter", raising=False)
    r = run_main("eval.py", ["--out_dir=%s" % (root / "out"), "--lm_eval_tasks=hellaswag"], capsys)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: lm-evaluation-harness is not installed: pip install 'nanogpt[eval]' (or pip install lm_eval)"


@pytest.mark.parametrize("args, needle", [
    (["--lm_eval_tasks=nano_mc,nano_mc"], "names a task twice"),
    (["--lm_eval_limit=5"], "need --lm_eval_tasks"),
    (["--lm_eval_tasks=x", "--lm_eval_builtin=False"], "needs --lm_eval_include"),
    (["--definitions=lm_eval", "--stride=8"], "stride applies to definitions='nanogpt' only"),
    (["--definitions=harness"], "definitions"),
])
def test_bad_keys_are_one_line(args, needle, capsys):
    r = run_main("eval.py", ["--out_dir=nowhere"] + args, capsys)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_unknown_local_task_is_one_line(rope_run, data_root, capsys):
    _, _, _, root = rope_run
    r = run_main("eval.py", ["--out_dir=%s" % (root / "out"), "--data_root=%s" % data_root, "--device=cpu",
                             "--lm_eval_tasks=nano_nothing", "--lm_eval_include=%s" % (root / "tasks"),
                             "--lm_eval_builtin=False"], capsys)
    assert r.returncode == 2 and "unknown task 'nano_nothing'" in r.stderr, r.stderr


@pytest.mark.parametrize("n,window", [(1, 4), (3, 4), (4, 4), (9, 4), (100, 16), (31, 32), (65, 32)])
def test_rolling_pairs_are_lm_evals_windows(n, window):
    """scoring.rolling_pairs gives the (context, continuation) pairs of lm-eval's own
    get_rolling_token_windows + make_disjoint_window."""
    from lm_eval import utils
    ids = list(range(100, 100 + n))
    theirs = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(ids, 7, window, 1)]
    assert scoring.rolling_pairs(ids, 7, window) == [(list(a), list(b)) for a, b in theirs]


def test_padded_rows_are_masked_unless_asked(gpt2_runs):
    """mask_padding=True (default) scores a padded model as its unpadded self; False keeps the
    padded rows in the softmax, as lm-eval's hf backend does on the exported folder."""
    from nanogpt.lm_eval_adapter import NanoGPTLM
    model = gpt2_runs[3]
    padded = GPT(GPTConfig(**dict(asdict(model.config), vocab_size=50304))).eval()
    with torch.no_grad():
        for k, v in padded.state_dict().items():
            src = model.state_dict()[k]
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v[:50257], v[50257:] = src, 3.0 * torch.randn_like(v[50257:])
            else:
                v.copy_(src)
    vocab = vocabulary_for(None, "data", 50304)
    pairs = [([50256], [464, 3797, 3332, 319]), ([464, 3797], [3332, 319, 262, 2603, 13])]
    plain = NanoGPTLM(model=model, vocab=vocabulary_for(None, "data", 50257), progress=False)._score(pairs, "x")
    masked = NanoGPTLM(model=padded, vocab=vocab, progress=False)._score(pairs, "x")
    kept = NanoGPTLM(model=padded, vocab=vocab, mask_padding=False, progress=False)._score(pairs, "x")
    assert [lp for lp, _ in masked] == pytest.approx([lp for lp, _ in plain], abs=1e-5)
    assert all(k < m - 1e-3 for (k, _), (m, _) in zip(kept, masked))
