"""Batches of random windows from a token file (train.bin / val.bin), seeded and resumable."""

from __future__ import annotations

import os
import queue
import threading

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

    Each window is one plain file read: nothing is mapped into this process over a long run, and
    the GIL is free while the disk works. Sampling uses its own generator, whose state goes into
    checkpoints.

    With ``prefetch > 0`` a background thread reads that many batches ahead (into pinned memory
    on CUDA) while the device works; the batches, their order and ``state_dict`` are the same as
    without it, so a resume is exact either way.
    """

    def __init__(self, data_dir: str, split: str, batch_size: int, block_size: int, device: str,
                 seed: int, dtype: str = "uint16", vocab_size: int | None = None, dataset: str = "",
                 prefetch: int = 0):
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
        self.generator = torch.Generator().manual_seed(seed)  # where the next batch to hand out starts
        self.prefetch = prefetch
        self._worker = None

    def _read(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch from ``generator``'s stream, still in host memory."""
        starts = torch.randint(self.n - self.block_size, (self.batch_size,), generator=generator).tolist()
        raw = np.empty((self.batch_size, self.block_size + 1), dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as f:  # plain reads: the GIL is free while the disk works
            for row, start in zip(raw, starts):
                f.seek(start * self.dtype.itemsize)
                if f.readinto(memoryview(row).cast("B")) != row.nbytes:
                    raise DataError("%s was cut short while training read it; prepare the dataset again" % self.path)
        rows = raw.astype(np.int64)  # (B, T+1)
        if self.vocab_size is not None:
            top = int(rows.max())
            if top >= self.vocab_size:
                raise DataError("%s contains token id %d but the model's vocab_size is %d; re-prepare the data or raise --vocab_size"
                                % (self.path, top, self.vocab_size))
        t = torch.from_numpy(rows)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (B, T) each
        if self.device.startswith("cuda"):
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prefetch <= 0:
            x, y = self._read(self.generator)
        else:
            if self._worker is None:
                self._worker = _Prefetcher(self._read, self.generator.get_state(), self.prefetch)
            try:
                x, y, state = self._worker.get()
            except BaseException:
                self.close()
                raise
            self.generator.set_state(state)  # as if this batch had been read here
        if self.device.startswith("cuda"):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        elif self.device != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def close(self) -> None:
        """Stop the background reader, dropping what it read ahead; ``next`` starts a new one."""
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def reseed(self, seed: int) -> None:
        self.close()
        self.generator.manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.generator.set_state(state["generator"])


class _Prefetcher:
    """A daemon thread that calls ``read(generator)`` ahead into a bounded queue, passing on the
    generator's state after each batch, or the error that stopped it."""

    def __init__(self, read, state: torch.Tensor, depth: int):
        self.queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        generator = torch.Generator()
        generator.set_state(state)
        self.thread = threading.Thread(target=self._run, args=(read, generator), daemon=True, name="batch-prefetch")
        self.thread.start()

    def _run(self, read, generator) -> None:
        while not self.stopped.is_set():
            try:
                item = (*read(generator), generator.get_state())
            except BaseException as e:  # handed to the training loop, which raises it
                item = e
            self.queue.put(item)  # stop() makes room, so this never blocks a stop
            if isinstance(item, BaseException):
                return

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self.stopped.set()
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        self.thread.join()
