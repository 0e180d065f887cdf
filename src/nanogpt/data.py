"""Batches of random windows from a token file (train.bin / val.bin), seeded and resumable."""

from __future__ import annotations

import os

import numpy as np
import torch

from .config import UserError


class DataError(UserError):
    pass


def dataset_dir(data_root: str, dataset: str) -> str:
    return os.path.join(data_root, dataset)


def prepare_hint(dataset: str) -> str:
    if os.path.isfile(os.path.join("data", dataset, "prepare.py")):
        return "run `python data/%s/prepare.py` first" % dataset
    return "prepare it first, e.g. `nanogpt prepare corpus --source=YOUR_TEXT --out_dir=data/%s`" % dataset


class BatchLoader:
    """Samples ``batch_size`` windows of ``block_size + 1`` tokens from ``<data_dir>/<split>.bin``.

    The file is memory-mapped afresh for every batch so that pages do not pile up in RAM over a
    long run. Sampling uses its own generator, whose state goes into checkpoints.
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, block_size: int, device: str,
                 seed: int, dtype: str = "uint16", vocab_size: int | None = None, dataset: str = ""):
        self.path = os.path.join(data_dir, "%s.bin" % split)
        name = dataset or os.path.basename(os.path.normpath(data_dir))
        if not os.path.isfile(self.path):
            raise DataError("dataset %r has no %s (looked for %s); %s" % (name, os.path.basename(self.path), self.path, prepare_hint(name)))
        self.dtype = np.dtype(dtype)
        n = os.path.getsize(self.path) // self.dtype.itemsize
        if n == 0:
            raise DataError("%s is empty; %s" % (self.path, prepare_hint(name)))
        if n < block_size + 1:
            raise DataError("%s holds %d tokens, fewer than block_size + 1 = %d; lower --block_size or add data"
                            % (self.path, n, block_size + 1))
        self.n = n
        self.batch_size, self.block_size = batch_size, block_size
        self.device = device
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(block_size + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        starts = torch.randint(self.n - self.block_size, (self.batch_size,), generator=self.generator).numpy()
        rows = data[starts[:, None] + self._offsets].astype(np.int64)  # (B, T+1)
        del data
        if self.vocab_size is not None:
            top = int(rows.max())
            if top >= self.vocab_size:
                raise DataError("%s contains token id %d but the model's vocab_size is %d; re-prepare the data or raise --vocab_size"
                                % (self.path, top, self.vocab_size))
        t = torch.from_numpy(rows)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T) each
        if self.device.startswith("cuda"):
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
