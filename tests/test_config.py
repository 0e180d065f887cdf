"""Config files, --key=value overrides and validation."""

import glob
import os

import pytest

from helpers import parse
from nanogpt.bench import BenchConfig
from nanogpt.config import markdown_table
from nanogpt.errors import ConfigError
from nanogpt.sample import SampleConfig
from nanogpt.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_nanogpts():
    c = TrainConfig()
    assert (c.batch_size, c.block_size, c.gradient_accumulation_steps) == (12, 1024, 40)
    assert (c.n_layer, c.n_head, c.n_embd, c.dropout, c.bias) == (12, 12, 768, 0.0, False)
    assert (c.learning_rate, c.max_iters, c.weight_decay, c.beta1, c.beta2, c.grad_clip) == (6e-4, 600000, 0.1, 0.9, 0.95, 1.0)
    assert (c.warmup_iters, c.lr_decay_iters, c.min_lr) == (2000, 600000, 6e-5)
    assert (c.eval_interval, c.eval_iters, c.log_interval, c.init_from, c.optimizer) == (2000, 200, 1, "scratch", "adamw")
    (c).validate()


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))))
def test_every_shipped_config_loads_and_validates(path):
    cfg, explicit = parse(TrainConfig, [path])
    assert explicit
    if cfg.init_from not in ("scratch", "resume"):
        assert cfg.init_from.startswith("gpt2")
    (cfg).validate()


def test_shakespeare_char_values():
    cfg, _ = parse(TrainConfig, [os.path.join(ROOT, "config", "train_shakespeare_char.py")])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.batch_size) == (6, 6, 384, 256, 64)
    assert (cfg.dropout, cfg.learning_rate, cfg.max_iters, cfg.beta2, cfg.warmup_iters) == (0.2, 1e-3, 5000, 0.99, 100)


def test_overrides_parse_as_literals():
    cfg, explicit = parse(TrainConfig, ["--batch_size=32", "--compile=False", "--learning_rate=3e-4",
                                              "--init_from=gpt2", "--dropout=0", "--wandb_run_name=42"])
    assert cfg.batch_size == 32 and cfg.compile is False and cfg.learning_rate == 3e-4
    assert cfg.init_from == "gpt2" and cfg.wandb_run_name == "42"
    assert cfg.dropout == 0.0 and isinstance(cfg.dropout, float)  # int widens to float
    assert explicit == {"batch_size", "compile", "learning_rate", "init_from", "dropout", "wandb_run_name"}


def test_later_arguments_win(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("import math\nbatch_size = 3\nn_layer = int(math.sqrt(16))\n")
    cfg, _ = parse(TrainConfig, [str(f), "--batch_size=5"])
    assert cfg.batch_size == 5 and cfg.n_layer == 4


@pytest.mark.parametrize("args,match", [
    (["--batch_sise=3"], "unknown config key 'batch_sise'.*did you mean 'batch_size'"),
    (["--batch_size=3.5"], "'batch_size' expects int, got float"),
    (["--compile=1"], "'compile' expects bool"),
    (["--learning_rate=True"], "'learning_rate' expects float"),
    (["--batch_size"], "must look like --key=value"),
    (["no/such/config.py"], "config file 'no/such/config.py' not found"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ConfigError, match=match):
        parse(TrainConfig, args)


def test_unknown_key_in_config_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("n_layers = 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'n_layers' in config file"):
        parse(TrainConfig, [str(f)])


def test_broken_config_file(tmp_path):
    f = tmp_path / "c.py"
    f.write_text("batch_size = = 3\n")
    with pytest.raises(ConfigError, match="failed to run"):
        parse(TrainConfig, [str(f)])


@pytest.mark.parametrize("kw,world,match", [
    (dict(warmup_iters=500, lr_decay_iters=100), 1, "warmup_iters"),
    (dict(gradient_accumulation_steps=5), 2, "gradient_accumulation_steps"),
    (dict(n_embd=100, n_head=3), 1, "n_embd"),
    (dict(dtype="fp8"), 1, "dtype"),
    (dict(optimizer="sgd"), 1, "optimizer"),
    (dict(dropout=1.0), 1, "dropout"),
    (dict(min_lr=1.0), 1, "min_lr"),
    (dict(init_from="gpt3"), 1, "init_from"),
    (dict(batch_size=0), 1, "batch_size"),
])
def test_impossible_combinations(kw, world, match):
    cfg = TrainConfig(**kw)
    with pytest.raises(ConfigError, match=match):
        cfg.validate(world_size=world)


def test_sample_and_bench_validation():
    with pytest.raises(ConfigError, match="top_p"):
        parse(SampleConfig, ["--top_p=0"])[0].validate()
    with pytest.raises(ConfigError, match="n_embd"):
        parse(BenchConfig, ["--n_embd=10", "--n_head=3"])[0].validate()
    cfg, _ = parse(SampleConfig, ["--start=FILE:prompt.txt", "--temperature=0"])
    assert cfg.start == "FILE:prompt.txt" and cfg.temperature == 0.0


def test_readme_documents_every_key():
    table = markdown_table(TrainConfig)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert table in readme, "README's key table is stale: regenerate it with `python -m nanogpt.docs`"
