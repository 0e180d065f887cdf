"""Plot train/val loss from train.py's printed logs: one curve per log file.

    python scripts/plot_train_logs.py out.png adamw.log striped_adamw.log
"""

import re
import sys


def parse(path):
    train, val = [], []
    with open(path) as f:
        for line in f:
            m = re.match(r"iter (\d+): loss ([0-9.]+)", line)
            if m:
                train.append((int(m.group(1)), float(m.group(2))))
            m = re.match(r"step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)", line)
            if m:
                val.append((int(m.group(1)), float(m.group(3))))
    return train, val


def main(out, *logs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib")
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for path in logs:
        name = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        train, val = parse(path)
        ax[0].plot(*zip(*train), label=name, lw=1)
        ax[1].plot(*zip(*val), marker="o", ms=3, label=name)
    for a, title in zip(ax, ("train loss (logged micro-batch)", "val loss (evaluation)")):
        a.set_xlabel("iteration")
        a.set_title(title)
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote %s" % out)


if __name__ == "__main__":
    main(*sys.argv[1:])
