"""How long the training loop waits for batches, with and without the background reader.

    python scripts/loader_speed.py --data_dir=data/openwebtext [--batch=12 --block=1024 --steps=100 --mmap]

The device's step is stood in for by a sleep of --step_ms (the host is free meanwhile, as it is
while a GPU works). Before each row the file's pages are dropped from the page cache
(posix_fadvise, where the OS has it), so windows are read from disk as early in a long run.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from nanogpt.data import BatchLoader


class MappedLoader(BatchLoader):
    """For comparison: the windows read through a memory map of the file (page faults)."""

    def _read(self, generator):
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        starts = torch.randint(self.n - self.block_size, (self.batch_size,), generator=generator).numpy()
        rows = torch.from_numpy(data[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def evict(path: str) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def row(kind, data_dir: str, prefetch: int, step_ms: float, batch: int, block: int, steps: int, cold: bool):
    """(ms the loop waited per batch, ms per step in all)."""
    if cold:
        evict(os.path.join(data_dir, "train.bin"))
    loader = kind(data_dir, "train", batch, block, "cpu", 1, prefetch=prefetch)
    waited = 0.0
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            t = time.perf_counter()
            loader.next()
            waited += time.perf_counter() - t
            time.sleep(step_ms / 1000)
    finally:
        loader.close()
    return 1000 * waited / steps, 1000 * (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_dir", required=True, help="a folder with train.bin (uint16 tokens)")
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--block", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--step_ms", default="0,5,20,30", help="comma-separated device step times to stand in for")
    ap.add_argument("--prefetch", default="0,2", help="comma-separated prefetch depths to compare")
    ap.add_argument("--warm", action="store_true", help="leave the page cache as it is")
    ap.add_argument("--mmap", action="store_true", help="also time reads through a memory map")
    a = ap.parse_args()
    kinds = [("file reads", BatchLoader)] + ([("memory map", MappedLoader)] if a.mmap else [])
    print("| device step (ms) | reads | prefetch | loop waits (ms/batch) | ms per step |")
    print("| --- | --- | --- | --- | --- |")
    for step_ms in [float(s) for s in a.step_ms.split(",")]:
        for name, kind in kinds:
            for prefetch in [int(p) for p in a.prefetch.split(",")]:
                wait, total = row(kind, a.data_dir, prefetch, step_ms, a.batch, a.block, a.steps, not a.warm)
                print("| %g | %s | %d | %.2f | %.2f |" % (step_ms, name, prefetch, wait, total))


if __name__ == "__main__":
    main()
