"""The batch loader: the background reader hands out the same batches, in the same order, with
the same resumable state as reading in the loop."""

import threading

import numpy as np
import pytest
import torch

from nanogpt.data import BatchLoader, DataError


@pytest.fixture
def token_dir(tmp_path):
    rng = np.random.default_rng(0)
    rng.integers(0, 100, size=5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    return tmp_path


def make(token_dir, prefetch, seed=3, **kw):
    return BatchLoader(str(token_dir), "train", 4, 16, "cpu", seed, prefetch=prefetch, **kw)


def readers():
    return [t for t in threading.enumerate() if t.name == "batch-prefetch"]


def test_prefetch_gives_the_same_batches_and_states(token_dir):
    plain, ahead = make(token_dir, 0), make(token_dir, 3)
    try:
        for _ in range(12):
            (x0, y0), (x1, y1) = plain.next(), ahead.next()
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
            assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets are the inputs shifted by one
            assert torch.equal(plain.state_dict()["generator"], ahead.state_dict()["generator"])
        assert len(readers()) == 1  # started on the first next(), one for the loader that prefetches
    finally:
        ahead.close()
    assert readers() == []


def test_prefetch_resumes_exactly(token_dir):
    straight = make(token_dir, 2)
    first = make(token_dir, 2)
    try:
        expected = [straight.next()[0] for _ in range(10)]
        got = [first.next()[0] for _ in range(4)]
        state = first.state_dict()  # the reader has gone on ahead; the state has not
        first.next()  # consumed after the save: the resumed loader must repeat it
        resumed = make(token_dir, 3, seed=99)
        resumed.load_state_dict(state)
        got += [resumed.next()[0] for _ in range(6)]
        for a, b in zip(expected, got):
            assert torch.equal(a, b)
        first.reseed(3)  # back to the start of the seed's stream, dropping what was read ahead
        assert torch.equal(first.next()[0], expected[0])
    finally:
        for loader in (straight, first, resumed):
            loader.close()
    assert readers() == []


def test_reader_error_is_raised_in_the_loop(token_dir):
    loader = make(token_dir, 2, vocab_size=50)  # the file holds ids up to 99
    with pytest.raises(DataError, match="vocab_size is 50"):
        loader.next()
    assert readers() == []  # the reader stopped with its error
    with pytest.raises(DataError, match="vocab_size is 50"):
        loader.next()  # and the next call reads again rather than waiting forever
    loader.close()
