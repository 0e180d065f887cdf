"""Shared fixtures."""

import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """tiny Shakespeare, prepared from the copy in the repository."""
    from nanogpt.prepare import prepare_shakespeare_char

    root = tmp_path_factory.mktemp("data")
    (root / "shakespeare_char").mkdir()
    shutil.copyfile(os.path.join(ROOT, "data", "shakespeare_char", "input.txt"), root / "shakespeare_char" / "input.txt")
    prepare_shakespeare_char(str(root / "shakespeare_char"))
    return root


@pytest.fixture(scope="session")
def data_mirror():
    """The offline data mirror (``shared/data`` beside the repository, or $NANOGPT_DATA_MIRROR);
    tests that need it are skipped without it."""
    from pathlib import Path

    env = os.environ.get("NANOGPT_DATA_MIRROR")
    path = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (path / "tiktoken-cache").is_dir():
        pytest.skip("no data mirror at %s" % path)
    return path
