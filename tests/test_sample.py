"""sample.py with GPT-2 BPE from a local Hugging Face folder, against transformers."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRROR = os.path.join(os.path.dirname(ROOT), "shared", "data")


@pytest.fixture(scope="module")
def gpt2_bpe_env():
    cache = os.path.join(MIRROR, "tiktoken-cache")
    if not os.path.isdir(cache) and not os.environ.get("TIKTOKEN_CACHE_DIR"):
        pytest.skip("no GPT-2 BPE files here (../shared/data/tiktoken-cache)")
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    env.setdefault("TIKTOKEN_CACHE_DIR", cache)
    return env


def test_sample_greedy_matches_hugging_face(tmp_path, gpt2_bpe_env, monkeypatch):
    transformers = pytest.importorskip("transformers")
    tiktoken = pytest.importorskip("tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", gpt2_bpe_env["TIKTOKEN_CACHE_DIR"])
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # a peaked distribution: greedy picks are unambiguous
    hf.save_pretrained(tmp_path / "hf")
    enc = tiktoken.get_encoding("gpt2")
    prompt = "Hello, my name is"
    ids = torch.tensor([enc.encode(prompt)])
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    expected = enc.decode(ref[0].tolist())

    r = subprocess.run([sys.executable, "sample.py", "--init_from=%s" % (tmp_path / "hf"), "--device=cpu",
                        "--start=%s" % prompt, "--num_samples=1", "--max_new_tokens=12", "--temperature=0"],
                       cwd=ROOT, capture_output=True, text=True, encoding="utf-8", env=gpt2_bpe_env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n---------------\n")[0] == expected


def test_a_dataset_folder_without_meta_is_skipped(data_root, tmp_path):
    """A fresh clone's data/shakespeare_char holds input.txt only: the vocabulary must come from
    the training run's prepared folder, not fall back to GPT-2 BPE."""
    from nanogpt.tokenizer import vocabulary_for
    (tmp_path / "shakespeare_char").mkdir()
    v = vocabulary_for({"dataset": "shakespeare_char", "data_root": str(data_root)}, str(tmp_path), 65)
    tok, vocab = v.tokenizer, v.meta["vocab_size"]
    assert v.kind == "char" and v.limit is None and vocab == 65 and tok.decode(tok.encode("Hello")) == "Hello" and len(tok.encode("Hello")) == 5


def test_a_character_model_without_its_vocabulary_names_data_root(tmp_path, monkeypatch):
    """No meta.json anywhere: a 65-entry model cannot fall back to GPT-2 BPE, and the error says
    so before any BPE file is looked for (offline, that lookup would fail with a network error)."""
    from nanogpt import tokenizer
    from nanogpt.errors import UserError
    from nanogpt.tokenizer import vocabulary_for

    def no_bpe(*a, **k):
        raise AssertionError("GPT-2 BPE was looked for")
    monkeypatch.setattr(tokenizer, "load_tokenizer", no_bpe)
    with pytest.raises(UserError, match=r"65 vocabulary entries.*--data_root=FOLDER holding shakespeare_char/"):
        vocabulary_for({"dataset": "shakespeare_char", "data_root": str(tmp_path / "gone")}, str(tmp_path), 65)
