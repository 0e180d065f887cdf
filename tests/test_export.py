"""Export to Hugging Face format: transformers' GPT2LMHeadModel computes the same logits, and
GPT2Tokenizer encodes like tiktoken."""

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from nanogpt import checkpoint  # noqa: E402
from nanogpt.train import TrainConfig  # noqa: E402
from nanogpt.export import main  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = "ROMEO: Wherefore art thou, Romeo?\n\n  It's 2 o'clock<|endoftext|> caf\u00e9 \u6771\u4eac!"


def tiny_model(vocab_size, bias, seed=0):
    torch.manual_seed(seed)
    gconf = GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, bias=bias, dropout=0.1)
    model = GPT(gconf)
    with torch.no_grad():  # move LayerNorms and biases off their 1/0 start so every weight matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, gconf


def save_training_checkpoint(out_dir, model, gconf, extra_args=None, **config):
    """A checkpoint as training writes it (see save_checkpoint in train.py)."""
    os.makedirs(out_dir, exist_ok=True)
    cfg = TrainConfig(**config).to_dict()
    ckpt = {"format": checkpoint.FORMAT, "model": model.state_dict(), "model_args": dict(asdict(gconf), **(extra_args or {})),
            "config": cfg, "iter_num": 10, "tokens_seen": 1000, "best_val_loss": 3.0, "world_size": 1}
    checkpoint.save(ckpt, os.path.join(out_dir, "ckpt.pt"))


def max_logit_diff(model, hf_dir, vocab_size):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    model.eval()
    x = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(x)  # (B, T, V)
        theirs = hf(x).logits  # (B, T, V)
    assert theirs.shape == ours.shape
    return (ours - theirs).abs().max().item()


def test_char_model_with_bias(tmp_path, data_root, capsys, monkeypatch):
    model, gconf = tiny_model(65, bias=True)
    save_training_checkpoint(tmp_path / "out", model, gconf, dataset="shakespeare_char", data_root=str(data_root))
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/shakespeare_char")  # --data_root's default: a folder without meta.json is passed over
    hf_dir = tmp_path / "hf"
    main(["--out_dir=%s" % (tmp_path / "out"), "--hf_dir=%s" % hf_dir])
    out = capsys.readouterr().out
    assert "vocab_chars.json" in out and "itos" in out  # the note on how to decode

    assert max_logit_diff(model, hf_dir, 65) <= 1e-5
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_layer"], cfg["n_head"], cfg["n_embd"]) == (65, 32, 2, 2, 32)
    assert cfg["resid_pdrop"] == cfg["attn_pdrop"] == cfg["embd_pdrop"] == 0.1  # the trained value
    assert cfg["bos_token_id"] is None and cfg["eos_token_id"] is None  # 50256 is no id of this vocabulary
    assert not (hf_dir / "vocab.json").exists()

    from nanogpt.data import load_meta
    meta = load_meta(str(data_root / "shakespeare_char"))
    table = json.loads((hf_dir / "vocab_chars.json").read_text(encoding="utf-8"))
    ids = [meta["stoi"][c] for c in "First Citizen:\nBefore we proceed"]
    assert "".join(table["itos"][i] for i in ids) == "First Citizen:\nBefore we proceed"
    assert table["stoi"] == meta["stoi"]


def test_padded_gpt2_vocab_without_bias(tmp_path, data_mirror):
    import tiktoken
    from safetensors import safe_open
    from transformers import GPT2Tokenizer

    model, gconf = tiny_model(50304, bias=False)  # GPT-2's 50257 padded to a multiple of 64
    save_training_checkpoint(tmp_path / "out", model, gconf, dataset="openwebtext", data_root=str(tmp_path / "none"))
    hf_dir = tmp_path / "hf"
    main(["--out_dir=%s" % (tmp_path / "out"), "--hf_dir=%s" % hf_dir, "--mirror=%s" % data_mirror])

    assert max_logit_diff(model, hf_dir, 50304) <= 1e-5
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["vocab_size"] == 50304 and cfg["bos_token_id"] == cfg["eos_token_id"] == 50256
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names  # tied: stored once, as the token embedding
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (32, 96)  # Conv1D: (in, out)
        assert f.get_tensor("transformer.h.1.mlp.c_fc.bias").abs().max() == 0  # bias=False -> zeros
        assert all(f.get_tensor(n).dtype == torch.float32 for n in names)

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(data_mirror / "tiktoken-cache"))
    enc = tiktoken.get_encoding("gpt2")
    tok = GPT2Tokenizer.from_pretrained(str(hf_dir))
    assert tok.encode(SAMPLE) == enc.encode(SAMPLE, allowed_special={"<|endoftext|>"})
    assert tok.eos_token_id == 50256
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE


def test_from_hf_folder_round_trip(tmp_path):
    """--init_from=<a save_pretrained folder>: the export computes what the original computes."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    src = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    src.save_pretrained(tmp_path / "src")
    main(["--init_from=%s" % (tmp_path / "src"), "--hf_dir=%s" % (tmp_path / "hf"), "--tokenizer=False"])
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    out = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, 50257, (1, 32))
    with torch.no_grad():
        assert (src(x).logits - out(x).logits).abs().max().item() <= 1e-5


def test_feature_keys(tmp_path, capsys):
    """A switched-off known feature exports; a switched-on one, or an unknown key, is refused."""
    model, gconf = tiny_model(65, bias=True)
    save_training_checkpoint(tmp_path / "off", model, gconf, extra_args={"rope": False, "qk_norm": False})
    main(["--out_dir=%s" % (tmp_path / "off"), "--hf_dir=%s" % (tmp_path / "hf_off")])
    assert max_logit_diff(model, tmp_path / "hf_off", 65) <= 1e-5
    capsys.readouterr()

    for extra in ({"qk_norm": True}, {"rope": True}, {"mlp_activation": "relu2"}, {"sliding_window": 16}):
        name = next(iter(extra))
        save_training_checkpoint(tmp_path / name, model, gconf, extra_args=extra)
        with pytest.raises(SystemExit) as e:
            main(["--out_dir=%s" % (tmp_path / name), "--hf_dir=%s" % (tmp_path / ("hf_" + name))])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and name in err[0]
        assert not (tmp_path / ("hf_" + name)).exists()


def test_untied_head_round_trip(tmp_path):
    """An untied output layer exports as lm_head.weight with tie_word_embeddings false: transformers
    computes our logits, and loading that folder back gives an untied model with the same logits."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(0)
    gconf = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, bias=True, untied_head=True)
    model = GPT(gconf)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))  # far from the embeddings
    save_training_checkpoint(tmp_path / "out", model, gconf)
    main(["--out_dir=%s" % (tmp_path / "out"), "--hf_dir=%s" % (tmp_path / "hf"), "--tokenizer=False"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    assert max_logit_diff(model, tmp_path / "hf", 65) <= 1e-5
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    back = GPT.from_pretrained(str(tmp_path / "hf"), dropout=0.0)
    assert back.config.untied_head and back.lm_head.weight is not back.transformer.wte.weight
    x = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x)[0], model.eval()(x)[0], atol=1e-5, rtol=1e-5)


def test_cli_refuses_unknown_feature(tmp_path):
    """As a user runs it: one error line, exit status 2."""
    model, gconf = tiny_model(65, bias=True)
    save_training_checkpoint(tmp_path / "out", model, gconf, extra_args={"rope": True})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--out_dir=%s" % (tmp_path / "out"),
                        "--hf_dir=%s" % (tmp_path / "hf")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "rope=True" in lines[0]
    assert not (tmp_path / "hf").exists()


def test_target_folder(tmp_path, capsys, monkeypatch):
    model, gconf = tiny_model(65, bias=True)
    out_dir = tmp_path / "out"
    save_training_checkpoint(out_dir, model, gconf)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "keep.txt").write_text("mine")
    argv = ["--out_dir=%s" % out_dir, "--hf_dir=%s" % hf_dir]

    with pytest.raises(SystemExit) as e:  # non-empty: refused, untouched
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--overwrite=True" in err[0]
    assert os.listdir(hf_dir) == ["keep.txt"]

    import nanogpt.export as export_mod

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(export_mod, "write_hf_tokenizer", broken)
    monkeypatch.setattr(export_mod, "vocabulary_kind", lambda meta, v: "char")
    with pytest.raises(OSError):  # a failure half way leaves the old folder and no temp folder
        main(argv + ["--overwrite=True"])
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"] and os.listdir(hf_dir) == ["keep.txt"]
    monkeypatch.undo()

    main(argv + ["--overwrite=True"])  # replaced
    assert sorted(os.listdir(hf_dir)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["hf", "out"]

    with pytest.raises(SystemExit):  # never over the checkpoint being exported
        main(["--out_dir=%s" % out_dir, "--hf_dir=%s" % tmp_path, "--overwrite=True"])
    assert "holds the checkpoint" in capsys.readouterr().err
    assert (out_dir / "ckpt.pt").exists()
