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


# ------------------------------------------------------------------------------------------
# the commands as a user runs them

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args, cwd=ROOT, timeout=120, env=None):
    """``python ARGS...`` from the repository root, its output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable] + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def assert_one_line_error(r, *needles):
    """Exit status 2 and one ``error:`` line on stderr holding every needle, no traceback."""
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


class Ran:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_main(command: str, argv, capsys) -> Ran:
    """A command's ``main(argv)`` in this process (what ``python COMMAND.py ARGV`` runs, without
    starting Python): its exit status and what it printed."""
    import importlib
    module = {"train.py": "train", "sample.py": "sample", "eval.py": "evaluate", "bench.py": "bench", "export.py": "export",
              "prepare": "prepare"}[command]
    main = importlib.import_module("nanogpt." + module).main
    capsys.readouterr()
    code = 0
    try:
        main(list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return Ran(code, out.out, out.err)
