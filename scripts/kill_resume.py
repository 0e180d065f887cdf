"""Kill a real training run with SIGKILL at random moments and count how many resumes work.

    python scripts/kill_resume.py --kills=100 [--seed=0] [--out_dir=/tmp/kill-run] [--data_root=data]

A small character model trains on data_root/shakespeare_char and saves at every iteration (so
a good share of the kills land inside a save). Each round starts the run (a resume once a
checkpoint exists), kills it a random moment after it starts training (every fifth round at any
moment of its start-up), and reads the folder as a resume reads it: the checkpoint must load
with its own optimizer state. Each next round is itself the resume; a last one trains two more
iterations and must leave no temporary or orphaned file. The last line reads
"N kills: R resumes worked, F failed".
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def options(argv: list[str]) -> dict:
    opts = {"kills": "100", "seed": "0", "out_dir": "/tmp/kill-run", "data_root": os.path.join(ROOT, "data")}
    for a in argv:
        if a in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        key, eq, value = a.lstrip("-").partition("=")
        if not eq or key not in opts:
            sys.exit("usage: python scripts/kill_resume.py [--%s]" % "=... --".join(opts) + "=...")
        opts[key] = value
    return opts


def command(out_dir: str, data_root: str, resume: bool) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--device=cpu", "--compile=False", "--n_layer=4", "--n_head=4",
            "--n_embd=256", "--block_size=64", "--batch_size=4", "--gradient_accumulation_steps=1", "--eval_interval=1",
            "--eval_iters=1", "--log_interval=1", "--max_iters=1000000", "--lr_decay_iters=1000000", "--warmup_iters=10",
            "--dataset=shakespeare_char", "--data_root=%s" % data_root, "--out_dir=%s" % out_dir, "--keep_last_k=2",
            "--init_from=%s" % ("resume" if resume else "scratch")]


def inspect(out: str, seen: set) -> tuple[bool, str, int]:
    """After a kill: (the checkpoint loads with its matching optimizer state, where the kill
    landed, its iteration), read as a resume would read it, before anything is cleaned up.
    A temp or unnamed file not in ``seen`` (left by an earlier kill) shows a save was cut short."""
    from nanogpt import checkpoint
    names = os.listdir(out) if os.path.isdir(out) else []
    if "ckpt.pt" not in names:
        return True, "before the first save", -1
    path = os.path.join(out, "ckpt.pt")
    try:
        ckpt = checkpoint.load(path)
        state = checkpoint.load_train_state(path, ckpt)
        ok = state["iter_num"] == ckpt["iter_num"]
    except Exception as e:  # what a resume would have refused
        return False, "unreadable: %s" % e, -1
    named = {ckpt["optim_file"]}
    for n in names:
        if n.startswith("ckpt_"):
            named.add(checkpoint.load(os.path.join(out, n))["optim_file"])
    mid_save = [n for n in names if (".tmp" in n or (".optim." in n and n not in named)) and n not in seen]
    seen.update(mid_save)
    return ok, "inside a save (%s left)" % ", ".join(mid_save) if mid_save else "between saves", ckpt["iter_num"]


def main(argv: list[str]) -> None:
    opts = options(argv)
    out, data_root, kills = opts["out_dir"], opts["data_root"], int(opts["kills"])
    sys.path.insert(0, os.path.join(ROOT, "src"))
    rng = random.Random(int(opts["seed"]))
    shutil.rmtree(out, ignore_errors=True)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    verdicts, in_save = [], 0  # per kill: did the resume after it work?
    seen: set = set()
    readable = True
    for k in range(kills):
        resume = os.path.exists(os.path.join(out, "ckpt.pt"))
        log = open(os.path.join(parent, "kill_resume.log"), "w")
        p = subprocess.Popen(command(out, data_root, resume), stdout=log, stderr=subprocess.STDOUT, text=True)
        started = time.time()
        deadline = started + 30
        while time.time() < deadline and p.poll() is None:  # wait until it trains (or, for a few, not at all)
            if k % 5 == 4 or "iter " in open(log.name).read():
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        running = p.poll() is None
        if running:
            p.send_signal(signal.SIGKILL)
        p.wait()
        log.close()
        text = open(log.name).read()
        started_ok = running and "error:" not in text and "Traceback" not in text
        if k:  # this start was the resume after the previous kill
            verdicts.append(readable and started_ok)
            if not started_ok:
                print("  the resume after kill %d FAILED: %s" % (k, (text.strip().splitlines() or ["(no output)"])[-1]))
        readable, where, it = inspect(out, seen)
        in_save += where.startswith("inside")
        print("kill %d at %.2f s, %s, checkpoint at iter %d%s" % (k + 1, time.time() - started, where, it,
              "" if readable else ": UNREADABLE"), flush=True)
    verdicts.append(readable and _final_resume(out, data_root))  # the resume after the last kill trains and cleans up
    worked = sum(verdicts)
    print("%d of the kills landed inside a save" % in_save)
    print("%d kills: %d resumes worked, %d failed" % (kills, worked, kills - worked))
    sys.exit(0 if worked == kills else 1)


def _final_resume(out: str, data_root: str) -> bool:
    """A resume that trains two more iterations; afterwards no temp or orphaned file is left."""
    from nanogpt import checkpoint
    if not os.path.exists(os.path.join(out, "ckpt.pt")):
        print("final: no checkpoint was ever written")
        return False
    it = checkpoint.load(os.path.join(out, "ckpt.pt"))["iter_num"]
    cmd = command(out, data_root, True)
    cmd = [c for c in cmd if not c.startswith("--max_iters=")] + ["--max_iters=%d" % (it + 2)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    names = os.listdir(out)
    left = [n for n in names if ".tmp" in n]
    named = {checkpoint.load(os.path.join(out, n))["optim_file"] for n in names if n == "ckpt.pt" or n.startswith("ckpt_")}
    orphans = [n for n in names if ".optim." in n and n not in named]
    ok = r.returncode == 0 and not left and not orphans
    print("final resume from iter %d: %s" % (it, "worked" if ok else "FAILED: %s %s %s" % (r.stderr.strip()[-300:], left, orphans)))
    return ok


if __name__ == "__main__":
    main(sys.argv[1:])
