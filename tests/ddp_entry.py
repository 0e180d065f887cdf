"""Runs ``nanogpt.train.train`` with test instruments, in one process or under torchrun:

    torchrun --standalone --nproc_per_node=2 tests/ddp_entry.py [OPTIONS] -- [TRAIN ARGS]
    python tests/ddp_entry.py --interleave=2 -- [TRAIN ARGS]

Options (all optional):
  --probe=DIR      each rank writes DIR/rank{R}.json when training returns: its device, the seeds
                   of its batch loaders, a digest of its first training batch, whether each
                   training forward pass would reduce gradients, the loss estimates before and
                   after averaging over ranks, and how many checkpoints it wrote
  --die=R:I        rank R leaves at once (os._exit(1)) as iteration I starts
  --hang=R:I       rank R stops answering as iteration I starts (sleeps; SIGTERM still ends it)
  --nan=R:I        rank R's training loss is nan at iteration I
  --sigterm=R:I    rank R sends itself SIGTERM as iteration I starts (the other ranks get none)
  --interleave=W   a single process is fed, at every step, the micro-batches that ranks 0..W-1
                   would read under torchrun (rank 0's k micro-batches, then rank 1's, ...)

The same hooks are importable (``install``) so a test can apply them in its own process with
pytest's ``monkeypatch.setattr``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

import torch

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

import nanogpt.checkpoint  # noqa: E402
import nanogpt.dist  # noqa: E402
import nanogpt.model  # noqa: E402
import nanogpt.train  # noqa: E402
from nanogpt.data import BatchLoader  # noqa: E402


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class Interleaved:
    """The training batches of ``world`` ranks, one after the other within each step: ``k``
    micro-batches from the loader seeded like rank 0, then ``k`` from rank 1's, and so on."""

    def __init__(self, make, seed: int, world: int, k: int):
        self.loaders = [make(seed + r) for r in range(world)]
        self.k = k
        self.count = 0
        self.generator = self.loaders[0].generator

    def next(self):
        loader = self.loaders[(self.count // self.k) % len(self.loaders)]
        self.count += 1
        return loader.next()

    def state_dict(self) -> dict:
        return self.loaders[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loaders[0].load_state_dict(state)

    def reseed(self, seed: int) -> None:
        self.loaders[0].reseed(seed)

    def close(self) -> None:
        for loader in self.loaders:
            loader.close()


def install(setattr_, probe: dict, die: tuple[int, int] | None = None, hang: tuple[int, int] | None = None,
            nan: tuple[int, int] | None = None, sigterm: tuple[int, int] | None = None, interleave: int = 0,
            micro_steps: int = 0) -> None:
    """Wrap the functions the training loop looks up by module attribute. ``probe`` collects
    what this rank saw. ``micro_steps`` (with ``interleave``) is the micro-steps of one rank."""
    rank = _rank()
    state = {"iter": None, "first_batch": True}
    probe.update(rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 world_size=int(os.environ.get("WORLD_SIZE", "1")), loaders=[], syncs=[], evals=[], saves=0)

    get_lr = nanogpt.train.get_lr

    def traced_get_lr(it, *args):  # called once as every iteration starts
        state["iter"] = it
        if die is not None and die == (rank, it):
            sys.stdout.flush()
            os._exit(1)
        if hang is not None and hang == (rank, it):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(3600)
        if sigterm is not None and sigterm == (rank, it):
            os.kill(os.getpid(), signal.SIGTERM)
        return get_lr(it, *args)

    setattr_(nanogpt.train, "get_lr", traced_get_lr)

    class TracedLoader(BatchLoader):
        def __init__(self, data_dir, split, batch_size, block_size, device, seed, *args, **kwargs):
            super().__init__(data_dir, split, batch_size, block_size, device, seed, *args, **kwargs)
            probe["loaders"].append([split, seed])
            self.training = split == "train" and len(probe["loaders"]) == 1  # the first one made

        def next(self):
            x, y = super().next()
            if self.training and state["first_batch"]:
                state["first_batch"] = False
                probe["first_batch"] = hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()
            return x, y

    def make_loader(data_dir, split, batch_size, block_size, device, seed, *args, **kwargs):
        def make(s):
            return TracedLoader(data_dir, split, batch_size, block_size, device, s, *args, **kwargs)
        if interleave and split == "train" and not probe["loaders"]:
            return Interleaved(make, seed, interleave, micro_steps)
        return make(seed)

    setattr_(nanogpt.train, "BatchLoader", make_loader)

    reduce_mean = nanogpt.dist.all_reduce_mean

    def traced_reduce_mean(x, info):
        local = float(x)
        out = reduce_mean(x, info)
        probe["evals"].append([state["iter"], local, float(out)])
        return out

    setattr_(nanogpt.dist, "all_reduce_mean", traced_reduce_mean)

    save_pair = nanogpt.checkpoint.save_pair

    def traced_save_pair(*args, **kwargs):
        probe["saves"] += 1
        return save_pair(*args, **kwargs)

    setattr_(nanogpt.checkpoint, "save_pair", traced_save_pair)

    from torch.nn.parallel import DistributedDataParallel as DDP
    ddp_init, ddp_forward = DDP.__init__, DDP.forward

    def traced_init(self, module, *args, **kwargs):
        ddp_init(self, module, *args, **kwargs)
        probe["ddp_device"] = str(next(module.parameters()).device)

    def traced_forward(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training, not evaluation
            probe["syncs"].append([state["iter"], bool(self.require_backward_grad_sync)])
        return ddp_forward(self, *args, **kwargs)

    setattr_(DDP, "__init__", traced_init)
    setattr_(DDP, "forward", traced_forward)

    if nan is not None:
        forward = nanogpt.model.GPT.forward

        def poisoned_forward(self, idx, targets=None, *args, **kwargs):
            logits, loss = forward(self, idx, targets, *args, **kwargs)
            if loss is not None and torch.is_grad_enabled() and nan == (rank, state["iter"]):
                loss = loss * float("nan")
            return logits, loss

        setattr_(nanogpt.model.GPT, "forward", poisoned_forward)


def _pair(text: str) -> tuple[int, int]:
    r, i = text.split(":")
    return int(r), int(i)


def main(argv: list[str]) -> None:
    if "--" in argv:
        cut = argv.index("--")
        opts, train_args = argv[:cut], argv[cut + 1:]
    else:
        opts, train_args = [], argv
    kv = dict(o[2:].split("=", 1) for o in opts)
    probe: dict = {}
    micro = 0
    for a in train_args:
        if a.startswith("--gradient_accumulation_steps="):
            micro = int(a.split("=", 1)[1])
    world = int(kv.get("interleave", 0))
    install(lambda obj, name, value: setattr(obj, name, value), probe,
            die=_pair(kv["die"]) if "die" in kv else None, hang=_pair(kv["hang"]) if "hang" in kv else None,
            nan=_pair(kv["nan"]) if "nan" in kv else None,
            sigterm=_pair(kv["sigterm"]) if "sigterm" in kv else None,
            interleave=world, micro_steps=micro // world if world else 0)
    try:
        nanogpt.train.main(train_args)
    finally:
        if "probe" in kv:
            os.makedirs(kv["probe"], exist_ok=True)
            with open(os.path.join(kv["probe"], "rank%d.json" % probe["rank"]), "w") as f:
                json.dump(probe, f)


if __name__ == "__main__":
    main(sys.argv[1:])
