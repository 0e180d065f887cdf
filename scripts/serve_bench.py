"""Requests/s and tokens/s of ``nanogpt serve`` under 1 and 8 concurrent clients, with requests
batched through the key/value cache (--max_batch=8) against one at a time (--max_batch=1).

    python scripts/serve_bench.py --out_dir=DIR [--clients=1,8] [--max_batch=1,8] [--requests=16] [--rounds=3] [--max_tokens=64]

Without --out_dir a GPT-2-shaped model with random weights is saved to a temp folder
(--n_layer, --n_head, --n_embd, --block_size). Each client sends completion requests back to back
(plain HTTP, greedy, a different prompt each); a round is --requests requests from 8 clients (and
the same number per client from fewer), and tokens/s counts completion tokens. One server per
--max_batch value, all started at once; the rounds alternate between them (so a change in the
machine's load falls on each alike) and the table gives the median round.
"""

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["To be, or not to be, that is the question:", "Friends, Romans, countrymen, lend me your ears;",
           "Now is the winter of our discontent", "All the world's a stage,", "O Romeo, Romeo! wherefore art thou Romeo?",
           "If music be the food of love, play on;", "The quality of mercy is not strain'd;", "Once more unto the breach,"]


def random_checkpoint(folder, n_layer, n_head, n_embd, block_size):
    import torch

    from nanogpt import checkpoint
    from nanogpt.model import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=50257)
    checkpoint.save({"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg), "config": {}, "iter_num": 0},
                    os.path.join(folder, "ckpt.pt"))


def start(out_dir, max_batch, extra):
    cmd = [sys.executable, "-m", "nanogpt.cli", "serve", "--out_dir=%s" % out_dir, "--port=0", "--max_batch=%d" % max_batch] + extra
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    found = {}
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            m = re.search(r"serving (\S+) .* on (http://\S+/v1)$", line.strip())
            if m:
                found["model"], found["url"] = m.groups()
                ready.set()
            elif line.startswith(("error", "Traceback", "cpu threads")):
                sys.stderr.write(line)
        ready.set()
    threading.Thread(target=read, daemon=True).start()
    ready.wait(300)
    if "url" not in found:
        raise SystemExit("the server did not start")
    return proc, found["model"], found["url"]


def complete(url, model, prompt, max_tokens):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        answer = json.loads(r.read())
    return answer["usage"]["completion_tokens"], time.perf_counter() - t0


def run(url, model, clients, requests, max_tokens):
    """(requests/s, completion tokens/s, mean latency) of ``requests`` requests from ``clients`` clients."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(lambda i: complete(url, model, PROMPTS[i % len(PROMPTS)], max_tokens), range(requests)))
    wall = time.perf_counter() - t0
    tokens = sum(t for t, _ in done)
    return requests / wall, tokens / wall, sum(dt for _, dt in done) / len(done)


def main(argv):
    opts = {"out_dir": "", "clients": "1,8", "max_batch": "1,8", "requests": "16", "rounds": "3", "max_tokens": "64", "n_layer": "6",
            "n_head": "6", "n_embd": "384", "block_size": "256", "threads": "0", "device": "cpu"}
    if "-h" in argv or "--help" in argv:
        print("usage: " + __doc__.strip())
        return
    for a in argv:
        k, _, v = a.lstrip("-").partition("=")
        if k not in opts:
            raise SystemExit("unknown option --%s (known: %s)" % (k, ", ".join(opts)))
        opts[k] = v
    tmp = None
    out_dir = opts["out_dir"]
    if not out_dir:
        tmp = tempfile.TemporaryDirectory()
        out_dir = os.path.join(tmp.name, "random")
        os.makedirs(out_dir)
        random_checkpoint(out_dir, *(int(opts[k]) for k in ("n_layer", "n_head", "n_embd", "block_size")))
    import torch
    print("torch %s, %s, %s; per round %s requests (8 clients; 1 client: a client's share) of %s tokens, greedy; "
          "median of %s rounds" % (torch.__version__, opts["device"], time.strftime("%Y-%m-%d"), opts["requests"],
                                   opts["max_tokens"], opts["rounds"]))
    print("| server | clients | requests/s | tokens/s | mean latency (s) |")
    print("| --- | --- | --- | --- | --- |")
    extra = ["--device=%s" % opts["device"], "--threads=%s" % opts["threads"]]
    servers = {}  # every server up at once; the rounds alternate between them, so a change in
    try:          # the machine's load falls on each alike
        for mb in (int(x) for x in opts["max_batch"].split(",")):
            servers[mb] = start(out_dir, mb, extra)
            complete(servers[mb][2], servers[mb][1], PROMPTS[0], 4)  # warm-up
        for c in (int(x) for x in opts["clients"].split(",")):
            got = {mb: [] for mb in servers}
            for _ in range(int(opts["rounds"])):
                for mb, (_, model, url) in servers.items():
                    got[mb].append(run(url, model, c, max(c, int(opts["requests"]) * c // 8 or 1), int(opts["max_tokens"])))
            for mb, rows in got.items():
                rps, tps, lat = (statistics.median(r[i] for r in rows) for i in range(3))
                name = "one at a time (`--max_batch=1`)" if mb == 1 else "batched (`--max_batch=%d`)" % mb
                print("| %s | %d | %.2f | %.1f | %.2f |" % (name, c, rps, tps, lat), flush=True)
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
