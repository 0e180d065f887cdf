"""A checkpoint is committed as one unit: a crash after any write, rename or removal of a save
leaves the previous save or the new one, whole, and the next run cleans up what the crash left.
Also: a full disk, the lock on out_dir, and the older layouts."""

import errno
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import train
from nanogpt import checkpoint
from nanogpt.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device=cpu", "--compile=False", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
        "--batch_size=2", "--gradient_accumulation_steps=1", "--eval_iters=1", "--warmup_iters=1",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--dataset=shakespeare_char", "--lr_decay_iters=100"]


def tiny(data_root, out_dir, *extra):
    return TINY + ["--data_root=%s" % data_root, "--out_dir=%s" % out_dir] + list(extra)


def a_save(it: int) -> tuple[dict, dict]:
    """Weights and train state of a save at iteration ``it``: every value says which save it is."""
    w = {"model": {"w": torch.full((64,), float(it))}, "model_args": {}, "config": {}, "iter_num": it}
    s = {"optimizer": {"state": {0: {"exp_avg": torch.full((64,), float(it))}}, "param_groups": []}, "rng": {}}
    return w, s


def check_consistent(folder, allowed_iters, synthetic: bool = True) -> int:
    """What a new run sees after cleaning up: a whole checkpoint of one of ``allowed_iters``, its
    optimizer state from the same save, and nothing else lying around. ``synthetic``: the saves
    are ``a_save``'s, whose every value is their iteration."""
    checkpoint.remove_unreferenced(str(folder))
    path = str(folder / "ckpt.pt")
    ckpt = checkpoint.load(path)
    state = checkpoint.load_train_state(path, ckpt)
    it = ckpt["iter_num"]
    assert it in allowed_iters
    assert state["iter_num"] == it
    if synthetic:
        assert float(state["optimizer"]["state"][0]["exp_avg"][0]) == it and float(ckpt["model"]["w"][0]) == it
    names = os.listdir(folder)
    assert not [n for n in names if ".tmp" in n], names
    heads = [torch.load(str(folder / n), weights_only=True) for n in names if n == "ckpt.pt" or n.startswith("ckpt_")]
    assert {n for n in names if ".optim." in n} == {h["optim_file"] for h in heads}, names  # no optimizer file nobody names
    assert {n for n in names if n.endswith(".safetensors")} == {h["model_file"] for h in heads if "model_file" in h}, names
    for n in names:
        if n.startswith("ckpt_"):  # every numbered copy is whole too
            c = checkpoint.load(str(folder / n))
            assert checkpoint.load_train_state(str(folder / n), c)["iter_num"] == c["iter_num"]
    return it


def save_steps(folder, keep: int, fmt: str = "torch") -> list[str]:
    """The steps a save at iteration 3 takes after saves at 1 and 2 (with keep_last_k=keep)."""
    seen = []
    checkpoint._fault = seen.append
    try:
        checkpoint.save_pair(*a_save(3), str(folder / "ckpt.pt"), keep, fmt)
    finally:
        checkpoint._fault = None
    return seen


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to crash a save mid-way")
@pytest.mark.parametrize("keep,fmt", [(0, "torch"), (1, "torch"), (1, "safetensors")])
def test_a_crash_after_any_step_of_a_save_leaves_a_whole_checkpoint(tmp_path, keep, fmt):
    """Each step of the third save is the last thing a process does before it is killed
    (os._exit: no cleanup code runs); the folder must still hold save 2 or save 3, whole."""
    if fmt == "safetensors":
        pytest.importorskip("safetensors")
    base = tmp_path / "base"
    base.mkdir()
    for it in (1, 2):
        checkpoint.save_pair(*a_save(it), str(base / "ckpt.pt"), keep, fmt)
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    steps = save_steps(probe, keep, fmt)
    want = ["write optimizer state", "rename optimizer state"]
    if fmt == "safetensors":
        want += ["write weights file", "rename weights file"]
    want += ["write weights", "rename weights"]
    commit = len(want) - 1  # the rename of ckpt.pt
    if keep:
        want += ["link numbered", "remove numbered"]
    assert steps[:len(want)] == want and any(s.startswith("remove ckpt.optim.") for s in steps), steps
    for k, step in enumerate(steps):
        folder = tmp_path / ("crash%d" % k)
        shutil.copytree(base, folder)
        pid = os.fork()
        if pid == 0:  # the child: save, and die right after this step
            def die(name, target=step):
                if name == target:
                    os._exit(0)
            checkpoint._fault = die
            try:
                checkpoint.save_pair(*a_save(3), str(folder / "ckpt.pt"), keep, fmt)
            finally:
                os._exit(1)  # the step never came: fail
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, step
        it = check_consistent(folder, (2, 3))
        assert it == (2 if k < commit else 3), step  # the rename of the weights is the commit
        checkpoint.save_pair(*a_save(4), str(folder / "ckpt.pt"), keep, fmt)  # and the next save works
        assert check_consistent(folder, (4,)) == 4


def test_an_interrupted_save_keeps_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    checkpoint.save_pair(*a_save(1), str(tmp_path / "ckpt.pt"))
    real = torch.save
    calls = {"n": 0}

    def second_write_breaks(obj, f):
        calls["n"] += 1
        if calls["n"] == 2:  # the weights, after the optimizer state was written
            f.write(b"partial")
            raise KeyboardInterrupt
        real(obj, f)

    monkeypatch.setattr(torch, "save", second_write_breaks)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_pair(*a_save(2), str(tmp_path / "ckpt.pt"))
    monkeypatch.undo()
    assert check_consistent(tmp_path, (1,)) == 1


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_folder_and_bytes(tmp_path, monkeypatch):
    checkpoint.save_pair(*a_save(1), str(tmp_path / "ckpt.pt"))

    def no_space(obj, f):
        f.write(b"some")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(CheckpointError, match=r"no room in %s to save the checkpoint: it needs about [\d,]+ bytes" % tmp_path):
        checkpoint.save_pair(*a_save(2), str(tmp_path / "ckpt.pt"))
    monkeypatch.undo()
    assert check_consistent(tmp_path, (1,)) == 1
    # too little room to begin with: refused before anything is written
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    with pytest.raises(CheckpointError, match="and 100 are free"):
        checkpoint.save_pair(*a_save(2), str(tmp_path / "ckpt.pt"))
    monkeypatch.undo()
    assert check_consistent(tmp_path, (1,)) == 1


def _small_tmpfs(path, size: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_training_onto_a_full_disk_stops_with_one_line(data_root, tmp_path):
    """A real file system that fills up: the run stops at the save that does not fit, with one
    line naming the folder, and the checkpoint before it still resumes."""
    out = tmp_path / "small"
    if not sys.platform.startswith("linux") or not _small_tmpfs(out, "600k"):
        pytest.skip("cannot mount a small tmpfs here")
    try:
        args = ["train.py"] + tiny(data_root, out, "--max_iters=40", "--eval_interval=2", "--keep_last_k=40")
        r = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        err = r.stderr.strip()
        assert err.startswith("error: no room in %s to save the checkpoint" % out) and "\n" not in err, err
        assert "resume with --init_from=resume" in err
        ckpt = checkpoint.load(str(out / "ckpt.pt"))
        assert 2 <= ckpt["iter_num"] < 40
        assert not [n for n in os.listdir(out) if ".tmp" in n]
        assert checkpoint.load_train_state(str(out / "ckpt.pt"), ckpt)["iter_num"] == ckpt["iter_num"]
    finally:
        subprocess.run(["umount", str(out)])


def test_the_next_run_removes_what_a_killed_save_left(data_root, tmp_path, capsys):
    train(tiny(data_root, tmp_path, "--max_iters=2", "--eval_interval=2"))
    (tmp_path / ("ckpt.pt.tmp%d" % 99999)).write_bytes(b"x" * 1000)  # a weights file cut off mid-write
    (tmp_path / "ckpt.optim.0123456789abcdef.pt").write_bytes(b"y")  # a save that never committed
    train(tiny(data_root, tmp_path, "--max_iters=4", "--eval_interval=2", "--init_from=resume"))
    out = capsys.readouterr().out
    assert "removed 2 file(s) an interrupted save left" in out
    assert check_consistent(tmp_path, (4,), synthetic=False) == 4


def test_two_file_checkpoints_of_format_2_still_resume(data_root, tmp_path):
    """ckpt.pt and ckpt.optim.pt tied by a save id (the layout before the optimizer file was named)."""
    train(tiny(data_root, tmp_path, "--max_iters=2", "--eval_interval=2"))
    w = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    os.rename(tmp_path / w["optim_file"], tmp_path / "ckpt.optim.pt")
    for k in ("optim_file", "rewinds", "lr_scale"):
        w.pop(k)
    checkpoint.save(dict(w, format=2), str(tmp_path / "ckpt.pt"))
    s = train(tiny(data_root, tmp_path, "--max_iters=4", "--eval_interval=2", "--init_from=resume"))
    assert s["final_iter"] == 4
    names = os.listdir(tmp_path)
    assert "ckpt.optim.pt" not in names  # replaced by the new save's own file
    assert check_consistent(tmp_path, (4,), synthetic=False) == 4


# ------------------------------------------------------------------------------------------
# one run per out_dir


def test_a_second_run_into_the_same_out_dir_is_refused(tmp_path):
    lock = checkpoint.RunLock(str(tmp_path / "out")).acquire()
    try:
        with pytest.raises(CheckpointError, match=r"is in use by another run \(pid %d on " % os.getpid()):
            checkpoint.RunLock(str(tmp_path / "out")).acquire()
    finally:
        lock.release()
    checkpoint.RunLock(str(tmp_path / "out")).acquire().release()  # free again


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, os; sys.path.insert(0, %r); from nanogpt.checkpoint import RunLock; "
            "RunLock(%r).acquire(); os._exit(9)" % (os.path.join(ROOT, "src"), str(out)))
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9  # died holding it
    assert "pid" in (out / ".lock").read_text()
    lock = checkpoint.RunLock(str(out)).acquire()
    assert (out / ".lock").read_text() == "pid %d on %s" % (os.getpid(), __import__("socket").gethostname())
    lock.release()


def test_kill_script_resumes_after_every_kill(data_root, tmp_path):
    """scripts/kill_resume.py as a user runs it, with a few kills."""
    r = subprocess.run([sys.executable, "scripts/kill_resume.py", "--kills=2", "--seed=1", "--out_dir=%s" % (tmp_path / "k"),
                        "--data_root=%s" % data_root], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kills: 2 resumes worked, 0 failed" in r.stdout, r.stdout
