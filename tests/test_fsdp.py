"""parallelism='fsdp': two CPU processes (gloo) against one process reading the same batches.

All two-process work is one torchrun launch of tests/fsdp_run.py (see its docstring for how
the batches are made independent of the world size); the one-process references run here.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from nanogpt import checkpoint, fsdp
from nanogpt.errors import ConfigError
from nanogpt.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "tests", "fsdp_run.py")
WHY = fsdp.unavailable()
needs_fsdp = pytest.mark.skipif(WHY is not None, reason=str(WHY))
TOL = 1e-4  # float32 sums in another order; a missing cross-rank reduction is off by ~1e-2

spec = importlib.util.spec_from_file_location("fsdp_run", LAUNCHER)
fsdp_run = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fsdp_run)


FEATURES = dict(rope=True, qk_norm=True, mlp_activation="relu2", untied_head=True, loss_chunk=40)


def argv(data_root, out_dir, **over):
    args = dict(device="cpu", compile=False, dtype="float32", n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True,
                dropout=0.0, batch_size=4, gradient_accumulation_steps=4, max_iters=4, eval_interval=4, eval_iters=2,
                log_interval=1, learning_rate=3e-3, decay_lr=False, weight_decay=0.1, grad_clip=0.5,
                dataset="shakespeare_char", data_root=str(data_root), out_dir=str(out_dir))
    args.update(over)
    return ["--%s=%s" % kv for kv in args.items()]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data_root):
    """Runs, in one torchrun launch of two processes: the optimizer checks; 4 steps with AdamW,
    with StripedAdamW and with every optional model feature; a copy of the StripedAdamW run; its
    resume to 6 steps."""
    tmp = tmp_path_factory.mktemp("fsdp2")
    plan = [["optimizers", str(tmp / "optimizers.json")],
            ["train", [argv(data_root, tmp / "adamw", parallelism="fsdp", optimizer="adamw"),
                       argv(data_root, tmp / "striped", parallelism="fsdp", optimizer="striped_adamw"),
                       argv(data_root, tmp / "features", parallelism="fsdp", **FEATURES)]],
            ["copy", str(tmp / "striped"), str(tmp / "striped_at_4")],
            ["train", [argv(data_root, tmp / "striped", parallelism="fsdp", optimizer="striped_adamw",
                            init_from="resume", max_iters=6)]]]
    (tmp / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", LAUNCHER,
           str(tmp / "plan.json")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, r.stdout


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_root):
    """The references: one process, the same batches, 4 steps (AdamW) and 6 (StripedAdamW, keeping iter 4)."""
    tmp = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the two processes run
    try:
        for opt, iters in (("adamw", 4), ("striped_adamw", 6)):
            fsdp_run.train_with_fixed_batches(argv(data_root, tmp / opt, optimizer=opt, max_iters=iters, keep_last_k=2))
        fsdp_run.train_with_fixed_batches(argv(data_root, tmp / "features", **FEATURES))
    finally:
        torch.set_num_threads(threads)
    return tmp


def records(folder):
    """(kind, iter) -> numbers from metrics.jsonl that do not depend on the world size: the
    gradient norm of each step (gathered over the shards under FSDP) and the evaluation losses
    (the same batches on every rank). Logged training losses are rank 0's micro-batches only."""
    out = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[("train", r["iter"])] = [r["grad_norm"]]
        elif r["kind"] == "eval":
            out[("eval", r["iter"])] = [r["train_loss"], r["val_loss"]]
    return out


def assert_records_match(fs, single, keys):
    got, want = records(fs), records(single)
    assert sorted(got) == sorted(keys)
    for k in keys:
        assert got[k] == pytest.approx(want[k], rel=1e-5), k


def assert_weights_close(path_a, path_b):
    a, b = checkpoint.load(str(path_a)), checkpoint.load(str(path_b))
    assert a["iter_num"] == b["iter_num"]
    assert list(a["model"]) == list(b["model"])  # the same keys (the tied head included), in order
    for k in a["model"]:
        assert a["model"][k].shape == b["model"][k].shape, k
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=TOL, rtol=0, msg=k)


def assert_optimizer_close(path_a, path_b):
    a = checkpoint.load_train_state(str(path_a), checkpoint.load(str(path_a)))["optimizer"]
    b = checkpoint.load_train_state(str(path_b), checkpoint.load(str(path_b)))["optimizer"]
    assert [g["params"] for g in a["param_groups"]] == [g["params"] for g in b["param_groups"]]
    assert sorted(a["state"]) == sorted(b["state"])
    for i, st in a["state"].items():
        assert sorted(st) == sorted(b["state"][i])
        for k, v in st.items():
            if torch.is_tensor(v):
                assert v.shape == b["state"][i][k].shape, (i, k)
                torch.testing.assert_close(v.float(), b["state"][i][k].float(), atol=TOL, rtol=1e-3, msg="%s %s" % (i, k))
            else:
                assert v == b["state"][i][k]


@needs_fsdp
@pytest.mark.parametrize("name", ["adamw", "striped_adamw", "striped_adamw_foreach", "striped_adamw_columns"])
def test_sharded_optimizer_steps_like_an_unsharded_one(two_processes, name):
    """Both StripedAdamW paths all-reduce the column statistics and mean(r) of row-sharded
    matrices (and the row statistics of column-sharded ones); the gathered state has one
    process's shapes. The embedding's 37 rows shard unevenly (19 + 18)."""
    tmp, _ = two_processes
    res = json.loads((tmp / "optimizers.json").read_text())[name]
    assert res["local_rows_of_wte"] == [19, 16]
    assert res["shapes_equal"]
    assert res["max_abs_diff"] < TOL, res
    assert res["state_max_abs_diff"] < TOL, res


@needs_fsdp
@pytest.mark.parametrize("optimizer", ["adamw", "striped_adamw"])
def test_fsdp_training_equals_one_process(two_processes, one_process, optimizer):
    """Same losses, and a ckpt.pt and its optimizer file in one process's format with the same
    values (gradient accumulation skips the reduce-scatter on the first micro-step of each)."""
    tmp, stdout = two_processes
    assert "fsdp: 2 blocks and the root sharded over 2 processes" in stdout
    assert "2 processes x 2 micro-steps" in stdout
    fs, single = tmp / ("adamw" if optimizer == "adamw" else "striped_at_4"), one_process / optimizer
    assert_records_match(fs, single, [("eval", 0), ("eval", 4)] + [("train", i) for i in range(4)])
    ref = single / "ckpt_4.pt"
    assert_weights_close(fs / "ckpt.pt", ref)
    assert_optimizer_close(fs / "ckpt.pt", ref)
    assert checkpoint.load(str(fs / "ckpt.pt"))["world_size"] == 2


@needs_fsdp
def test_fsdp_with_every_model_feature_equals_one_process(two_processes, one_process):
    """RoPE (a buffer, not a parameter), QK-norm, ReLU² and an untied head (a second matrix in
    the root unit) shard and train like one process."""
    tmp, _ = two_processes
    fs, single = tmp / "features", one_process / "features"
    assert_records_match(fs, single, [("eval", 0), ("eval", 4)] + [("train", i) for i in range(4)])
    assert_weights_close(fs / "ckpt.pt", single / "ckpt.pt")
    assert "lm_head.weight" in checkpoint.load(str(fs / "ckpt.pt"))["model"]


@needs_fsdp
def test_fsdp_resume_continues_like_an_uninterrupted_run(two_processes, one_process):
    """4 steps, save, resume on two processes to 6: the same as 6 steps in one process (the
    saved optimizer state was sharded again on load)."""
    tmp, stdout = two_processes
    assert "resumed from" in stdout
    assert_records_match(tmp / "striped", one_process / "striped_adamw",
                         [("eval", 0), ("eval", 4), ("eval", 6)] + [("train", i) for i in range(6)])
    assert_weights_close(tmp / "striped" / "ckpt.pt", one_process / "striped_adamw" / "ckpt.pt")
    assert_optimizer_close(tmp / "striped" / "ckpt.pt", one_process / "striped_adamw" / "ckpt.pt")


@needs_fsdp
def test_one_process_resumes_an_fsdp_checkpoint(two_processes, one_process, data_root, tmp_path):
    """The FSDP checkpoint is an ordinary one: a single process loads it and resumes it."""
    tmp, _ = two_processes
    out = tmp_path / "run"
    shutil.copytree(tmp / "striped_at_4", out)
    model, ckpt = checkpoint.load_model(str(out / "ckpt.pt"))  # as sample.py loads it
    assert model.lm_head.weight is model.transformer.wte.weight
    fsdp_run.train_with_fixed_batches(argv(data_root, out, optimizer="striped_adamw", init_from="resume", max_iters=6))
    assert_records_match(out, one_process / "striped_adamw",
                         [("eval", 0), ("eval", 4), ("eval", 6)] + [("train", i) for i in range(6)])
    assert_weights_close(out / "ckpt.pt", one_process / "striped_adamw" / "ckpt.pt")


def test_parallelism_is_checked():
    TrainConfig(parallelism="fsdp").validate(world_size=2)
    with pytest.raises(ConfigError, match="parallelism must be one of"):
        (TrainConfig(parallelism="zero3")).validate()
    with pytest.raises(ConfigError, match="optimizer_in_backward"):
        (TrainConfig(parallelism="fsdp", optimizer_in_backward=True, gradient_accumulation_steps=1,
                                   grad_clip=0.0)).validate()
    with pytest.raises(ConfigError, match="eval_tasks"):
        TrainConfig(parallelism="fsdp", eval_tasks="ppl=x.txt", gradient_accumulation_steps=2).validate(world_size=2)


# ---------------------------------------------------------------------------------------------
# CUDA: skipped without a GPU. Two ranks cannot share one GPU under NCCL, so with one GPU the
# FSDP runs are one-process torchrun launches (a mesh of one: every code path, no splitting).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def launch(args, nproc=0):
    """train.py as one process (nproc=0) or under torchrun with nproc processes."""
    cmd = [sys.executable, "train.py"] if not nproc else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=%d" % nproc, "train.py"]
    r = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@needs_fsdp
@needs_cuda
def test_cuda_fsdp_float32_equals_a_plain_run(tmp_path, data_root):
    """On CUDA StripedAdamW takes its multi-tensor path, here on DTensor shards."""
    common = dict(device="cuda", dtype="float32", optimizer="striped_adamw", max_iters=4)
    launch(argv(data_root, tmp_path / "plain", **common))
    out = launch(argv(data_root, tmp_path / "fsdp", parallelism="fsdp", **common), nproc=1)
    assert "fsdp: 2 blocks and the root sharded over 1 processes" in out
    got, want = records(tmp_path / "fsdp"), records(tmp_path / "plain")
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-3), k
    a, b = checkpoint.load(str(tmp_path / "fsdp" / "ckpt.pt")), checkpoint.load(str(tmp_path / "plain" / "ckpt.pt"))
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-3, rtol=0, msg=k)


@needs_fsdp
@needs_cuda
@pytest.mark.parametrize("dtype,compile_", [("bfloat16", False), ("float16", False), ("bfloat16", True)])
def test_cuda_fsdp_mixed_precision_trains_saves_and_resumes(tmp_path, data_root, dtype, compile_):
    """Half-precision compute (MixedPrecisionPolicy; float16 with the loss scaler), torch.compile
    on the sharded model, on as many GPUs as there are (up to 2); the checkpoint loads in one CPU
    process and resumes under FSDP."""
    nproc = min(2, torch.cuda.device_count())
    common = dict(device="cuda", dtype=dtype, compile=compile_, parallelism="fsdp", optimizer="striped_adamw",
                  learning_rate=1e-2, eval_interval=10, max_iters=10, gradient_accumulation_steps=2 * nproc)
    launch(argv(data_root, tmp_path, **common), nproc=nproc)
    model, ckpt = checkpoint.load_model(str(tmp_path / "ckpt.pt"))
    assert ckpt["iter_num"] == 10 and next(model.parameters()).dtype == torch.float32
    out = launch(argv(data_root, tmp_path, init_from="resume", **dict(common, max_iters=14)), nproc=nproc)
    assert "resumed from" in out
    evals = {k[1]: v for k, v in records(tmp_path).items() if k[0] == "eval"}
    assert sorted(evals) == [0, 10, 14]
    assert max(evals[10][1], evals[14][1]) < evals[0][1] - 0.3  # it learned, before and after the resume
