"""Runs FSDP work for tests/test_fsdp.py under torchrun (train_with_fixed_batches also serves
the one-process references there).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fsdp_run.py PLAN.json

PLAN.json is a list of steps, done in order:
    ["optimizers", "OUT.json"]    sharded optimizer steps against unsharded ones on every rank
    ["train", [argv, ...]]        nanogpt.train with batches that do not depend on the world size
    ["copy", "SRC", "DST"]        copy a folder (rank 0), e.g. to keep a checkpoint before a resume

The batches: micro-step j of step s on rank r reads batch number s * A + r * a + j (A
micro-steps per step in all, a = A / world per rank), so two processes together see exactly
the batches one process sees; evaluation batches are the same on every rank.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys

import numpy as np
import torch

RUN = {"seed": 0, "rank": 0, "world": 1, "accum": 1, "resume_from": None}


class FixedBatches:
    """Stands in for nanogpt.data.BatchLoader (same constructor and methods)."""

    def __init__(self, data_dir, split, batch_size, block_size, device, seed, dtype="uint16", vocab_size=None,
                 dataset="", prefetch=0, meta=None, verify=True):
        self.data = np.memmap(os.path.join(data_dir, "%s.bin" % split), dtype=np.dtype(dtype), mode="r")
        self.split, self.batch_size, self.block_size, self.device = split, batch_size, block_size, device
        self.training = split == "train" and seed == RUN["seed"] + RUN["rank"]  # the training stream
        self.count = 0
        if self.training and RUN["resume_from"]:  # continue the stream where the checkpoint left it
            from nanogpt import checkpoint
            self.count = checkpoint.load(RUN["resume_from"])["iter_num"] * RUN["accum"]
        self.generator = torch.Generator()  # train.py reseeds it on a resume; the batches ignore it

    def next(self):
        k = self.count
        self.count += 1
        if self.training:
            step, micro = divmod(k, RUN["accum"])
            k = (step * RUN["world"] + RUN["rank"]) * RUN["accum"] + micro
        g = torch.Generator().manual_seed(2 * k + (self.split == "val"))
        starts = torch.randint(len(self.data) - self.block_size - 1, (self.batch_size,), generator=g).tolist()
        rows = torch.from_numpy(np.stack([self.data[s:s + self.block_size + 1].astype(np.int64) for s in starts]))
        return rows[:, :-1].to(self.device), rows[:, 1:].to(self.device)  # (B, T) each

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def reseed(self, seed):
        self.generator.manual_seed(seed)

    def close(self):
        pass


def share_one_process_group() -> None:
    """train() starts and ends a process group per run; a second one in the same processes would
    meet the first one's rendezvous keys in torchrun's store and hang, so the runs of one launch
    share a single group, started once and ended at exit."""
    import torch.distributed as dist

    from nanogpt import dist as ndist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    info = ndist.DistInfo(True, dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_world_size())
    ndist.init = lambda device, backend="auto", timeout_s=600.0: (info, device)
    ndist.shutdown = lambda info: None


def train_with_fixed_batches(argv: list[str]) -> dict:
    """nanogpt.train.train(argv), reading FixedBatches."""
    import nanogpt.train as train_mod
    from nanogpt.train import TrainConfig

    cfg = TrainConfig.parse(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    RUN.update(seed=cfg.seed, rank=int(os.environ.get("RANK", "0")), world=world,
               accum=cfg.gradient_accumulation_steps // world,
               resume_from=os.path.join(cfg.out_dir, "ckpt.pt") if cfg.init_from == "resume" else None)
    saved = train_mod.BatchLoader
    train_mod.BatchLoader = FixedBatches
    try:
        return train_mod.train(TrainConfig.parse(argv))
    finally:
        train_mod.BatchLoader = saved


def check_optimizers(out_path: str) -> None:
    """Steps a sharded GPT (uneven shards included: 37 embedding rows over 2 ranks) and an
    unsharded copy on every rank, each rank feeding its part of the same global batch, and
    writes (rank 0) the largest weight difference and whether the gathered optimizer state has
    the unsharded one's shapes, per optimizer. Blocks are also sharded on their columns
    (Shard(1)) in one case, which puts the cross-rank sums on the row statistics instead."""
    import torch.distributed as dist

    from nanogpt import fsdp
    from nanogpt.model import GPT, GPTConfig
    from nanogpt.optim import StripedAdamW, param_groups

    share_one_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    fully_shard, _ = fsdp._api()
    makers = {
        "adamw": lambda gs: torch.optim.AdamW(gs, lr=1e-2, betas=(0.9, 0.95)),
        "striped_adamw": lambda gs: StripedAdamW(gs, lr=1e-2, betas=(0.9, 0.95), foreach=False),
        "striped_adamw_foreach": lambda gs: StripedAdamW(gs, lr=1e-2, betas=(0.9, 0.95), foreach=True),
        "striped_adamw_columns": lambda gs: StripedAdamW(gs, lr=1e-2, betas=(0.9, 0.95), foreach=True),
    }
    out = {}
    for name, make in makers.items():
        torch.manual_seed(0)
        ref = GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True))
        model = copy.deepcopy(ref)
        if name.endswith("_columns"):
            from torch.distributed.tensor import Shard
            mesh = fsdp.mesh_for(model)
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
            fully_shard(model, mesh=mesh)
        else:
            fsdp.shard(model)
        o_ref, o = make(param_groups(ref, 0.1)), make(param_groups(model, 0.1))
        for step in range(3):
            x = torch.randint(0, 37, (2 * world, 16), generator=torch.Generator().manual_seed(step))  # (2W, T)
            _, loss = ref(x, x)
            loss.backward()
            o_ref.step()
            o_ref.zero_grad(set_to_none=True)
            mine = x.chunk(world)[rank]  # (2, T): this rank's part
            _, loss = model(mine, mine)
            loss.backward()
            o.step()
            o.zero_grad(set_to_none=True)
        err = max((fsdp.full_tensor(p.detach()) - q.detach()).abs().max().item()
                  for p, q in zip(model.parameters(), ref.parameters()))
        full = fsdp.full_optimizer_state(model, o)
        if rank == 0:
            want = o_ref.state_dict()
            shapes = {i: {k: list(v.shape) for k, v in st.items() if torch.is_tensor(v)} for i, st in want["state"].items()}
            got = {i: {k: list(v.shape) for k, v in st.items() if torch.is_tensor(v)} for i, st in full["state"].items()}
            state_err = max((full["state"][i][k] - v).abs().max().item()
                            for i, st in want["state"].items() for k, v in st.items() if torch.is_tensor(v) and v.dim())
            out[name] = {"max_abs_diff": err, "shapes_equal": shapes == got, "state_max_abs_diff": state_err,
                         "local_rows_of_wte": list(model.transformer.wte.weight.to_local().shape)}
        dist.barrier()
        del model, o
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(out, f)


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    rank = int(os.environ.get("RANK", "0"))
    share_one_process_group()
    for step in plan:
        if step[0] == "optimizers":
            check_optimizers(step[1])
        elif step[0] == "train":
            for argv in step[1]:
                train_with_fixed_batches(argv)
        elif step[0] == "copy":
            if rank == 0:
                shutil.copytree(step[1], step[2])
        else:
            raise SystemExit("unknown plan step %r" % (step[0],))
        torch.distributed.barrier()  # e.g. a resume reads what rank 0 wrote or copied
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
