"""checkpoint_format='safetensors' (weights readable with no pickle machinery) and checkpoints
that reference nanoGPT's sample.py reads."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, sample, train
from nanogpt import checkpoint
from nanogpt.errors import CheckpointError
from test_checkpoint import tiny

NANOGPT_KEYS = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias"}


def test_safetensors_checkpoint_resumes_bit_exactly_and_loads_without_pickle(data_root, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    common = ["--max_iters=8", "--eval_interval=4", "--dropout=0.1"]
    straight = train(tiny(data_root, tmp_path / "a", *common))
    first = train(tiny(data_root, tmp_path / "b", *common, "--max_iters=4", "--checkpoint_format=safetensors"))
    second = train(tiny(data_root, tmp_path / "b", *common, "--init_from=resume", "--checkpoint_format=safetensors",
                        "--keep_last_k=1"))
    assert first["history"] + second["history"] == straight["history"]
    names = sorted(os.listdir(tmp_path / "b"))
    files = [n for n in names if n.endswith(".safetensors")]
    assert len(files) == 1, names  # the first save's file was removed once nothing named it
    head = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert head["model"] == {} and head["model_file"] == files[0]  # ckpt.pt holds no tensor
    plain = safetensors.load_file(str(tmp_path / "b" / files[0]))  # no torch.load, no pickle
    want = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    assert "lm_head.weight" not in plain  # the tied head is stored once
    for k, v in plain.items():
        assert torch.equal(v, want[k]), k
    got = checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))["model"]
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    a = sample(["--out_dir=%s" % (tmp_path / "a"), "--data_root=%s" % data_root, "--device=cpu", "--num_samples=1",
                "--max_new_tokens=12", "--top_k=1", "--start=ROMEO:"])
    b = sample(["--out_dir=%s" % (tmp_path / "b"), "--data_root=%s" % data_root, "--device=cpu", "--num_samples=1",
                "--max_new_tokens=12", "--top_k=1", "--start=ROMEO:"])
    assert a == b
    os.remove(tmp_path / "b" / files[0])
    with pytest.raises(CheckpointError, match="which is missing"):
        checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))


def test_gpt2_shaped_checkpoints_carry_nanogpts_model_args_only(data_root, tmp_path):
    train(tiny(data_root, tmp_path / "plain", "--max_iters=2", "--eval_interval=2", "--bias=True"))
    train(tiny(data_root, tmp_path / "rope", "--max_iters=2", "--eval_interval=2", "--rope=True"))
    plain = torch.load(tmp_path / "plain" / "ckpt.pt", weights_only=True)
    assert set(plain["model_args"]) == NANOGPT_KEYS
    rope = torch.load(tmp_path / "rope" / "ckpt.pt", weights_only=True)
    assert set(rope["model_args"]) == NANOGPT_KEYS | {"rope"}  # a feature is written only when it is on
    # the GPT-2 weight names, nothing more (nanoGPT loads them with strict=True)
    layer = {"ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
             "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"}
    want = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
            "lm_head.weight"} | {"transformer.h.0." + k for k in layer}
    assert set(plain["model"]) == want


@pytest.mark.skipif(not os.environ.get("NANOGPT_REFERENCE"), reason="set NANOGPT_REFERENCE to a karpathy/nanoGPT checkout")
def test_reference_nanogpt_samples_our_checkpoint(data_root, data_mirror, tmp_path):
    """nanoGPT's own sample.py, unchanged, on a checkpoint trained here (BPE data: its sample.py
    reads meta.pkl for character tables, which this project writes as meta.json)."""
    ref = os.environ["NANOGPT_REFERENCE"]
    out = tmp_path / "run"
    train(tiny(data_root, out, "--max_iters=2", "--eval_interval=2", "--vocab_size=50304"))
    r = subprocess.run([sys.executable, "sample.py", "--out_dir=%s" % out, "--device=cpu", "--compile=False",
                        "--num_samples=1", "--max_new_tokens=8", "--dtype=float32", "--start=Hello"],
                       cwd=ref, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, TIKTOKEN_CACHE_DIR=str(data_mirror / "tiktoken-cache")))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Hello" in r.stdout
