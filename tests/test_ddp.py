"""The multi-process path, on CPU with gloo: torchrun with two processes (one node, and two
"nodes" on this machine) trains like one process fed the same micro-batches, resumes across
world sizes, stops together, and fails fast when a rank dies.

The torchrun runs go through tests/ddp_entry.py, which wraps a few functions of the training
loop to record what each rank did (see its docstring).
"""

import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import ddp_entry
from nanogpt import checkpoint, dist
from nanogpt.errors import ConfigError
from nanogpt.train import TrainConfig
from helpers import train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "tests", "ddp_entry.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TINY = ["--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32",
        "--batch_size=4", "--gradient_accumulation_steps=4", "--eval_iters=2", "--log_interval=1",
        "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--dropout=0.0", "--dataset=shakespeare_char"]
STEPS = 4  # optimizer steps of the two-process run that the equality test compares
K = 2  # micro-steps per rank: gradient_accumulation_steps=4 over 2 processes


def args(data_root, out_dir, *extra):
    return TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % out_dir] + list(extra)


def torchrun(train_args, entry_opts=(), nproc=2, launcher=("--standalone",), timeout=120, wait=True):
    """Start torchrun on tests/ddp_entry.py in its own process group; with ``wait``, return its
    result (``.seconds`` added); without, the running process (see ``finish``)."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc_per_node=%d" % nproc, ENTRY]
           + list(entry_opts) + ["--"] + list(train_args))
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill up and block
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True, env=ENV, start_new_session=True)
    p.files, p.started = (out, err), time.time()
    return finish([p], timeout)[0] if wait else p


def finish(procs, timeout=120):
    """Wait for every process; past ``timeout`` seconds kill their process groups (agents and
    workers) and fail with what they printed."""
    deadline = time.time() + timeout
    ended = {}
    while len(ended) < len(procs) and time.time() < deadline:
        for p in procs:
            if p not in ended and p.poll() is not None:
                ended[p] = time.time() - p.started
        time.sleep(0.05)
    late = [p for p in procs if p not in ended]
    for p in late:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    results = []
    for p in procs:
        texts = []
        for f in p.files:
            f.seek(0)
            texts.append(f.read())
            f.close()
        r = subprocess.CompletedProcess(p.args, p.returncode, *texts)
        r.seconds = ended.get(p)
        results.append(r)
    if late:
        pytest.fail("torchrun did not finish within %d s:\n%s" % (timeout, "\n-----\n".join(
            output(r) for r in results)))
    return results


def output(r, lines=60):
    """What a run said, without traceback frames: the lines a reader of a failure needs."""
    keep, frame = [], False
    for t in (r.stdout + "\n" + r.stderr).splitlines():
        body = re.sub(r"^\[rank\d+\]:", "", t).strip()
        if body.startswith('File "') or frame or set(body) <= set("^~ "):
            frame = body.startswith('File "')  # the source line after a frame goes too
            continue
        keep.append(t)
    return "\n".join(keep[-lines:])


def probes(folder, world=2):
    return [json.loads((folder / ("rank%d.json" % r)).read_text()) for r in range(world)]


def logged_losses(stdout):
    """{iter: train loss} from rank 0's log lines."""
    return {int(i): float(x) for i, x in re.findall(r"^iter (\d+): loss ([0-9.naif]+)", stdout, re.M)}


def eval_lines(stdout):
    """{iter: (train loss, val loss)} as printed (4 decimals)."""
    return {int(i): (float(a), float(b)) for i, a, b in re.findall(r"^step (\d+): train loss (\S+), val loss (\S+)$", stdout, re.M)}


def free_port():
    """A free port below the ephemeral range, so that no socket bound to port 0 meanwhile (gloo
    opens many) can take it before the node 0 agent listens on it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(out_dir):
    return checkpoint.load(str(out_dir / "ckpt.pt"))["model"]


@pytest.fixture(scope="module")
def ddp_run(data_root, tmp_path_factory):
    """Two processes, STEPS steps of K micro-steps each, an evaluation (and save) every 2 steps."""
    tmp = tmp_path_factory.mktemp("ddp")
    r = torchrun(args(data_root, tmp / "out", "--max_iters=%d" % STEPS, "--lr_decay_iters=%d" % STEPS, "--eval_interval=2"),
                 ["--probe=%s" % (tmp / "probe")])
    assert r.returncode == 0, output(r)
    return r, probes(tmp / "probe"), tmp / "out"


# ------------------------------------------------------------------------------------------
# what each rank does


def test_each_rank_has_its_device_data_seed_and_share_of_micro_steps(ddp_run):
    r, (p0, p1), _ = ddp_run
    assert (p0["rank"], p0["local_rank"], p1["rank"], p1["local_rank"]) == (0, 0, 1, 1)
    assert p0["world_size"] == p1["world_size"] == 2
    assert p0["ddp_device"] == p1["ddp_device"] == "cpu"
    # the training stream is seeded seed + rank; so are the fixed evaluation batches
    assert p0["loaders"][0] == ["train", 1337] and p1["loaders"][0] == ["train", 1338]
    evals0 = [s for split, s in p0["loaders"][2:]]
    evals1 = [s for split, s in p1["loaders"][2:]]
    assert evals0 and [s + 1 for s in evals0] == evals1
    assert p0["first_batch"] != p1["first_batch"]
    # gradient_accumulation_steps=4 over 2 ranks: 2 micro-steps each, gradients reduced on the last only
    want = [[it, micro == K - 1] for it in range(STEPS) for micro in range(K)]
    assert p0["syncs"] == p1["syncs"] == want
    assert "tokens per iteration: 512 (2 processes x 2 micro-steps x 4 x 32)" in r.stdout


def test_only_rank_zero_logs_and_writes(ddp_run):
    r, (p0, p1), out = ddp_run
    assert r.stdout.count("iter %d: loss" % (STEPS - 1)) == 1 and r.stdout.count("step 2: train loss") == 1
    assert p0["saves"] == r.stdout.count("saved checkpoint") >= 1 and p1["saves"] == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["iter"] for x in records if x["kind"] == "train"] == list(range(STEPS))
    assert [x["iter"] for x in records if x["kind"] == "eval"] == [0, 2, 4]
    ckpt = checkpoint.load(str(out / "ckpt.pt"))
    assert ckpt["iter_num"] == STEPS and ckpt["world_size"] == 2
    assert not [f for f in os.listdir(out) if ".tmp" in f or "rank" in f]


def test_ranks_agree_on_every_evaluation(ddp_run):
    r, (p0, p1), _ = ddp_run
    assert len(p0["evals"]) == len(p1["evals"]) == 3 * 2  # 3 evaluations x (train, val)
    printed = eval_lines(r.stdout)
    for (it, local0, mean0), (it1, local1, mean1) in zip(p0["evals"], p1["evals"]):
        assert it == it1 and mean0 == mean1  # bit for bit: one all-reduce result
        assert mean0 == pytest.approx((local0 + local1) / 2, rel=1e-6)
        assert local0 != local1  # each rank measured its own batches
    vals = [m for _, _, m in p0["evals"]][1::2]
    assert [round(v, 4) for v in vals] == [printed[i][1] for i in (0, 2, 4)]


def test_two_processes_equal_one_process_fed_the_same_micro_batches(ddp_run, data_root, tmp_path, monkeypatch):
    """One process with gradient_accumulation_steps=4, reading per step rank 0's two micro-batches
    then rank 1's, ends with the two-process weights. The two runs sum the same 4 gradients in
    another order and divide at another point (each rank's mean over 2, then an all-reduce mean
    over ranks, against one mean over 4), so float32 results differ by a few ulps per step;
    AdamW divides by sqrt(v), which keeps such differences relative (~1e-6 of an update), and
    4 updates of lr <= 3e-3 leave them far below atol=1e-5 (seen: 6e-8). Weights move ~1e-2 in
    those steps, and a run fed other batches ends about as far away, so the tolerance can fail."""
    _, (p0, _), out = ddp_run
    common = ("--max_iters=%d" % STEPS, "--lr_decay_iters=%d" % STEPS, "--eval_interval=2")
    probe = {}
    ddp_entry.install(monkeypatch.setattr, probe, interleave=2, micro_steps=K)
    train(args(data_root, tmp_path / "ref", *common))
    monkeypatch.undo()
    assert probe["first_batch"] == p0["first_batch"]
    assert [s for split, s in probe["loaders"][:2]] == [1337, 1338]  # rank 0's stream, then rank 1's
    train(args(data_root, tmp_path / "plain", *common))  # one process, its own stream only

    ddp, ref, plain = weights(out), weights(tmp_path / "ref"), weights(tmp_path / "plain")
    init = weights_at_init()
    assert ddp.keys() == ref.keys()
    for k in ddp:
        torch.testing.assert_close(ddp[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)
    moved = max(float((ddp[k] - init[k]).abs().max()) for k in ddp)
    other = max(float((plain[k] - ddp[k]).abs().max()) for k in ddp)
    assert moved > 1e-3 and other > 1e-3  # both 100x the tolerance


def test_muon_and_model_features_under_ddp_equal_one_process(data_root, tmp_path, monkeypatch):
    """The same equality with every optional model feature on and Muon. Muon orthogonalises the
    reduced gradient on each rank alike; its Newton-Schulz iteration is smooth, so float32
    summation-order differences stay of the same size as with AdamW (seen: about 1e-7)."""
    feats = ("--rope=True", "--qk_norm=True", "--mlp_activation=relu2", "--untied_head=True", "--loss_chunk=40", "--optimizer=muon",
             "--muon_lr=0.02", "--max_iters=%d" % STEPS, "--lr_decay_iters=%d" % STEPS, "--eval_interval=%d" % STEPS)
    r = torchrun(args(data_root, tmp_path / "ddp", *feats))
    assert r.returncode == 0, output(r)
    probe = {}
    ddp_entry.install(monkeypatch.setattr, probe, interleave=2, micro_steps=K)
    train(args(data_root, tmp_path / "ref", *feats))
    monkeypatch.undo()
    train(args(data_root, tmp_path / "plain", *feats))  # one process, its own stream only
    ddp, ref, plain = weights(tmp_path / "ddp"), weights(tmp_path / "ref"), weights(tmp_path / "plain")
    assert "lm_head.weight" in ddp and "transformer.wpe.weight" not in ddp
    for k in ddp:
        torch.testing.assert_close(ddp[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)
    assert max(float((plain[k] - ddp[k]).abs().max()) for k in ddp) > 1e-3  # other batches: 100x the tolerance


def weights_at_init():
    """The weights every rank starts from: rank 0's initialisation (seed 1337), broadcast by DDP."""
    from nanogpt.model import GPT, GPTConfig
    torch.manual_seed(1337)
    return GPT(GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)).state_dict()


# ------------------------------------------------------------------------------------------
# resuming across world sizes


def test_two_processes_resume_a_one_process_checkpoint(data_root, tmp_path):
    common = ("--lr_decay_iters=8", "--eval_interval=4", "--optimizer=striped_adamw")
    first = train(args(data_root, tmp_path, "--max_iters=4", *common))
    assert first["final_iter"] == 4
    r = torchrun(args(data_root, tmp_path, "--max_iters=8", "--init_from=resume", *common))
    assert r.returncode == 0, output(r)
    assert "resumed from %s at iter 4" % (tmp_path / "ckpt.pt") in r.stdout
    losses = logged_losses(r.stdout)
    assert sorted(losses) == [4, 5, 6, 7] and all(math.isfinite(x) for x in losses.values())
    assert max(losses.values()) < first["history"][0][1]
    evals = eval_lines(r.stdout)
    assert list(evals) == [8] and evals[8][1] < first["last_val_loss"]
    ckpt = checkpoint.load(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 8 and ckpt["world_size"] == 2 and ckpt["config"]["optimizer"] == "striped_adamw"


def test_two_process_resume_is_exact(data_root, tmp_path):
    """With dropout on, 8 steps straight under two processes equal 4, a resume and 4 more: every
    rank gets back its own dropout and batch streams from the checkpoint."""
    common = ("--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1", "--log_interval=1")
    a = torchrun(args(data_root, tmp_path / "a", "--max_iters=8", *common))
    b1 = torchrun(args(data_root, tmp_path / "b", "--max_iters=4", *common))
    b2 = torchrun(args(data_root, tmp_path / "b", "--max_iters=8", "--init_from=resume", *common))
    for r in (a, b1, b2):
        assert r.returncode == 0, output(r)
    assert logged_losses(a.stdout) == {**logged_losses(b1.stdout), **logged_losses(b2.stdout)}
    wa = checkpoint.load(str(tmp_path / "a" / "ckpt.pt"))["model"]
    wb = checkpoint.load(str(tmp_path / "b" / "ckpt.pt"))["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_one_process_resumes_a_two_process_checkpoint(ddp_run, data_root, tmp_path):
    r, _, out = ddp_run
    shutil.copytree(out, tmp_path / "out")
    before = eval_lines(r.stdout)[STEPS][1]
    s = train(args(data_root, tmp_path / "out", "--init_from=resume", "--max_iters=%d" % (2 * STEPS),
                   "--lr_decay_iters=%d" % (2 * STEPS), "--eval_interval=%d" % STEPS))
    assert s["iters"] == STEPS and s["final_iter"] == 2 * STEPS
    assert [i for i, _ in s["history"]] == list(range(STEPS, 2 * STEPS))
    assert all(math.isfinite(x) for _, x in s["history"]) and s["last_val_loss"] < before
    ckpt = checkpoint.load(str(tmp_path / "out" / "ckpt.pt"))
    assert ckpt["iter_num"] == 2 * STEPS and ckpt["world_size"] == 1


# ------------------------------------------------------------------------------------------
# two nodes on one machine


def test_two_nodes_train_and_node_zero_writes_the_only_checkpoint(data_root, tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        launcher = ("--nnodes=2", "--node_rank=%d" % node, "--master_addr=127.0.0.1", "--master_port=%d" % port)
        procs.append(torchrun(args(data_root, tmp_path / "out", "--max_iters=3", "--lr_decay_iters=3", "--eval_interval=3"),
                              ["--probe=%s" % (tmp_path / "probe")], nproc=1, launcher=launcher, wait=False))
    runs = finish(procs)
    for r in runs:
        assert r.returncode == 0, output(r)
    p0, p1 = probes(tmp_path / "probe")
    assert (p0["rank"], p0["local_rank"], p1["rank"], p1["local_rank"]) == (0, 0, 1, 0)
    assert p0["saves"] == 1 and p1["saves"] == 0
    assert "iter 2: loss" in runs[0].stdout and "iter" not in runs[1].stdout
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f or "rank" in f]
    ckpt = checkpoint.load(str(tmp_path / "out" / "ckpt.pt"))
    assert ckpt["iter_num"] == 3 and ckpt["world_size"] == 2


# ------------------------------------------------------------------------------------------
# failures and stops


@pytest.mark.parametrize("failure", ["die", "hang"])
def test_a_dead_or_silent_rank_stops_the_run_and_keeps_the_last_checkpoint(data_root, tmp_path, failure):
    """Rank 1 exits (its sockets close: rank 0's next all-reduce fails at once) or stops answering
    (rank 0's all-reduce gives up after dist_timeout) as iteration 6 starts; the checkpoint
    written at the evaluation of iteration 4 survives, and rank 0 says so in one line."""
    r = torchrun(args(data_root, tmp_path, "--max_iters=10", "--lr_decay_iters=10", "--eval_interval=4",
                      "--dist_timeout=%d" % (20 if failure == "die" else 3)), ["--%s=1:6" % failure])
    assert r.returncode != 0 and r.seconds < 60
    assert "iter 5: loss" in r.stdout and "iter 6: loss" not in r.stdout
    err = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, output(r)
    assert "rank 0 of 2 lost contact with the other processes" in err[0]
    assert "%s is left as it was" % (tmp_path / "ckpt.pt") in err[0]
    model, ckpt = checkpoint.load_model(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 4
    assert "optimizer" in checkpoint.load_train_state(str(tmp_path / "ckpt.pt"), ckpt)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_iteration(data_root, tmp_path):
    """Rank 1's loss is nan at iteration 2; rank 0's own loss turns nan only at 3 (after the
    all-reduced step). Both stop at iteration 2 at the next log step (rank 0 alone prints it), and
    nothing is saved."""
    r = torchrun(args(data_root, tmp_path, "--max_iters=9", "--lr_decay_iters=9", "--eval_interval=6", "--log_interval=3"),
                 ["--nan=1:2"])
    assert r.returncode != 0 and r.seconds < 60
    # every rank stops with the error, and only rank 0 prints its line
    assert r.stderr.count("error: the loss became nan/inf at iter 2;") == 1, output(r)
    assert "error: rank 1" not in r.stderr, output(r)
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_signal_to_one_rank_stops_every_rank_at_the_next_log_step(data_root, tmp_path):
    """SIGTERM reaches rank 1 alone during iteration 4; with log_interval=3 both ranks agree at
    the end of iteration 6, stop, and rank 0 saves a checkpoint at iteration 7."""
    r = torchrun(args(data_root, tmp_path, "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=100", "--log_interval=3",
                      "--dist_timeout=20"), ["--sigterm=1:4"])
    assert r.seconds < 60 and "collective mismatch" not in r.stderr
    assert "caught a stop signal at iter 7" in r.stdout, output(r)
    assert checkpoint.load(str(tmp_path / "ckpt.pt"))["iter_num"] == 7


# ------------------------------------------------------------------------------------------
# setup, without starting processes


def test_accumulation_steps_must_divide_the_world_size(data_root, tmp_path, monkeypatch):
    TrainConfig(gradient_accumulation_steps=6).validate(world_size=3)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps \(4\) must be divisible by the number of processes \(3\); "
                                          r"pass e.g. --gradient_accumulation_steps=6$"):
        TrainConfig(gradient_accumulation_steps=4).validate(world_size=3)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # as torchrun would set it: refused before any process group
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        train(args(data_root, tmp_path, "--max_iters=1"))


def test_each_cuda_rank_takes_the_device_of_its_local_rank(monkeypatch):
    calls = {}
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("set_device", d))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    info, device = dist.init("cuda", "auto", 30.0)
    assert device == "cuda:1" and calls["set_device"] == "cuda:1"
    assert (info.rank, info.local_rank, info.world_size, info.master) == (3, 1, 4, False)
    assert calls["init"]["backend"] == "nccl" and calls["init"]["device_id"] == torch.device("cuda:1")
    assert calls["init"]["timeout"].total_seconds() == 30.0
    calls.clear()
    info, device = dist.init("cpu", "auto", 30.0)
    assert device == "cpu" and calls["init"]["backend"] == "gloo" and "set_device" not in calls
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 but only 2 CUDA"):
        dist.init("cuda", "auto", 30.0)
    with pytest.raises(ConfigError, match="backend='nccl' needs device='cuda'"):
        dist.init("cpu", "nccl", 30.0)


def test_peer_failures_become_one_line(tmp_path, monkeypatch):
    handlers = []
    monkeypatch.setattr(signal, "signal", lambda s, h: handlers.append((s, h)))  # keep this process's handlers
    on = dist.DistInfo(True, 0, 0, 2)
    gloo = RuntimeError("[/src/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging")
    with pytest.raises(dist.PeerError, match=r"^rank 0 of 2 lost contact .*\(Read error \[127.0.0.1\]:1: Connection "
                                             r"reset by peer\).*no checkpoint had been written$"):
        with dist.peer_failures(on, str(tmp_path)):
            raise gloo
    assert handlers == [(signal.SIGTERM, signal.SIG_IGN)]  # torchrun's SIGTERM cannot cut the line short
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug on this rank stays what it is
        with dist.peer_failures(on, str(tmp_path)):
            raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="Connection reset"):  # one process: nothing to blame on others
        with dist.peer_failures(dist.DistInfo(), str(tmp_path)):
            raise gloo
