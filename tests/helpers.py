"""Shorthands for tests: run a command's library entry point from nanoGPT-style arguments."""

import nanogpt.bench
import nanogpt.evaluate
import nanogpt.export
import nanogpt.sample
import nanogpt.train


def train(argv):
    """nanogpt.train.train on the config these arguments give (looked up at call time, so a
    test may patch the module)."""
    return nanogpt.train.train(nanogpt.train.TrainConfig.parse(argv))


def evaluate(argv):
    return nanogpt.evaluate.evaluate(nanogpt.evaluate.EvalConfig.parse(argv))


def sample(argv):
    return nanogpt.sample.sample(nanogpt.sample.SampleConfig.parse(argv))


def bench(argv):
    return nanogpt.bench.bench(nanogpt.bench.BenchConfig.parse(argv))


def export(argv):
    return nanogpt.export.export(nanogpt.export.ExportConfig.parse(argv))


def parse(cls, argv):
    """(config, the keys the arguments set)."""
    cfg = cls.parse(argv)
    return cfg, set(cfg.sources)
