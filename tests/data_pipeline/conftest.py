"""Session fixtures for data_pipeline tests: MNIST loaded once, shards prepared once.

The shard directories are shared and must be treated as read-only; tests that damage
shards copy them first (``copy_shards``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from data_pipeline.errors import SourceUnavailable
from data_pipeline.mnist_arrays import MnistArrays
from data_pipeline.shards import prepare_shards
from data_pipeline.sources import load_mnist

SMALL_LIMIT = 650  # 7 shards of <= 100 per split: uneven across 2 ranks, last shard short
SMALL_SHARD_SIZE = 100


@pytest.fixture(scope="session")
def mnist_arrays() -> MnistArrays:
    """Real MNIST from the default source (skips the suite where none is installed)."""
    try:
        return load_mnist()
    except SourceUnavailable as exn:
        pytest.skip(f"no MNIST source: {exn}")


@pytest.fixture(scope="session")
def full_shards(tmp_path_factory: pytest.TempPathFactory, mnist_arrays: MnistArrays) -> Path:
    """All 70,000 samples at the default shard size (about 10 s on 2 cores)."""
    out = tmp_path_factory.mktemp("shards_full")
    prepare_shards(out, arrays=mnist_arrays)
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory, mnist_arrays: MnistArrays) -> Path:
    """First 650 samples of each split in 7 shards (6 x 100 + 50)."""
    out = tmp_path_factory.mktemp("shards_small")
    prepare_shards(out, arrays=mnist_arrays, limit=SMALL_LIMIT, shard_size=SMALL_SHARD_SIZE)
    return out


@pytest.fixture
def copy_shards(tmp_path: Path) -> Callable[[Path], Path]:
    """Copy a shared shard directory into this test's tmp_path so it may be damaged."""

    def copy(src: Path) -> Path:
        dst = tmp_path / f"copy_{src.name}"
        shutil.copytree(src, dst)
        return dst

    return copy
