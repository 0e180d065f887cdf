"""Plots of metrics.jsonl: reading (torn last line, repeats), the figure, the CLI's errors."""

import builtins
import json
import os

import pytest

from nanogpt import plot
from nanogpt.metrics import MetricsLog

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, n_iters=40, lr=1e-3, with_task=True, seed=0):
    """A run's metrics.jsonl as the training loop writes it."""
    import random
    rnd = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    log = MetricsLog(str(folder), enabled=True, resume_iter=None)
    for it in range(0, n_iters + 1):
        tokens = it * 4096
        if it % 10 == 0:
            extra = {"hellaswag/acc_norm": 0.25 + it / 1000} if with_task else {}
            log.write("eval", it, tokens, train_loss=4.0 - it / 20, val_loss=4.1 - it / 25, lr=lr, **extra)
        if it < n_iters:
            log.write("train", it, tokens, loss=4.0 - it / 20 + rnd.random() * 0.1, lr=lr * min(1, (it + 1) / 10),
                      grad_norm=None if it == 3 else 1 + rnd.random(), clip_frac=None, ms_per_iter=10.0,
                      tokens_per_s=4e5, mfu=None, memory_gib=None, future_key={"nested": 1})
    log.close()
    return str(folder)


def test_two_runs_png(tmp_path):
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "run-a")
    b = write_run(tmp_path / "run-b", n_iters=30, lr=3e-4, seed=1)
    path = plot.plot_runs([a, b])
    assert path == os.path.join(a, "metrics.png")
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert sorted(os.listdir(a)) == ["metrics.jsonl", "metrics.png"]  # no temp file left


def test_figure_contents(tmp_path):
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", with_task=False, seed=1)
    runs = {"a": plot.load_metrics(a), "b": plot.load_metrics(b)}
    fig = plot.make_figure(runs, smooth_n=3)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 6 and titles[-1] == "hellaswag/acc_norm"  # one panel for the task metric
    loss_ax = fig.axes[0]
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert labels == ["a train", "a val", "b train", "b val"]
    lines = loss_ax.get_lines()
    assert lines[0].get_color() != lines[2].get_color()  # one colour per run
    assert lines[0].get_color() == lines[1].get_color()
    losses = [r["loss"] for r in runs["a"] if r["kind"] == "train"]
    assert list(lines[0].get_ydata()) == pytest.approx(plot.smooth(losses, 3))
    assert list(lines[1].get_xdata()) == [0, 10, 20, 30, 40]
    tokens_ax = fig.axes[1]
    assert max(tokens_ax.get_lines()[1].get_xdata()) == 40 * 4096
    time_ax = fig.axes[2]
    t0 = min(r["time"] for r in runs["a"])
    want = [r["time"] - t0 for r in runs["a"] if r["kind"] == "eval"]
    assert list(time_ax.get_lines()[1].get_xdata()) == pytest.approx(want)  # seconds from the first record
    assert min(time_ax.get_lines()[0].get_xdata()) >= 0
    grad_ax = fig.axes[4]
    assert len(grad_ax.get_lines()[0].get_xdata()) == 39  # the null grad norm is left out

    fig = plot.make_figure({"b": runs["b"]})
    assert len(fig.axes) == 5  # no task metrics, no extra panel


def test_smooth():
    assert plot.smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert plot.smooth([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]
    assert plot.smooth([2.0, 4.0, 9.0], 5) == [2.0, 3.0, 5.0]


def test_load_metrics_tolerates_torn_line_and_repeats(tmp_path):
    recs = [{"kind": "train", "iter": i, "tokens": i * 10, "loss": 5.0 - i, "unknown": "x"} for i in range(3)]
    recs.append({"kind": "train", "iter": 1, "tokens": 10, "loss": 0.5})  # written again after a resume
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "train", "iter": 3, "lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    got = plot.load_metrics(str(tmp_path))
    assert [r["iter"] for r in got] == [0, 1, 2]
    assert got[1]["loss"] == 0.5


def test_missing_and_empty_metrics(tmp_path, capsys):
    run = tmp_path / "nothing-here"
    run.mkdir()
    with pytest.raises(plot.PlotError, match="nothing-here"):
        plot.load_metrics(str(run))
    with pytest.raises(SystemExit) as e:
        plot.main([str(run)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "nothing-here" in err[0]

    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit):
        plot.main([str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty" in err[0] and "nothing-here" in err[0]


def test_without_matplotlib(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "r")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named %r" % name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as e:
        plot.main([run])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "pip install matplotlib" in err[0]
    assert not os.path.exists(os.path.join(run, "metrics.png"))


def test_cli_out_and_smooth(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", seed=2)
    out = tmp_path / "both.png"
    plot.main([a, b, "--out=%s" % out, "--smooth=5"])
    assert str(out) in capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not os.path.exists(os.path.join(a, "metrics.png"))
