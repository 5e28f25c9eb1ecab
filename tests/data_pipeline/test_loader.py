"""Streaming loader: per-rank batch counts, determinism, exact values, corrupt shards."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loader import batches_per_epoch, load_split_in_memory, make_loader
from data_pipeline.mnist_arrays import MnistArrays
from data_pipeline.shards import read_manifest
from data_pipeline.tar_reader import ShardError
from tests.conftest import refusal_line

from .conftest import SMALL_LIMIT


def _collect(loader) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 0), (3, 0), (4, 2)])
def test_every_rank_gets_the_same_number_of_full_batches(small_shards: Path, world_size: int, num_workers: int) -> None:
    # 7 shards (last one short) never divide evenly; (4, 2) has more consumers than shards.
    expected = batches_per_epoch(read_manifest(small_shards), "train", 32, world_size)
    assert expected == SMALL_LIMIT // (world_size * 32)
    for rank in range(world_size):
        loader = make_loader(small_shards, "train", 32, rank=rank, world_size=world_size, num_workers=num_workers)
        batches = list(loader)
        assert len(loader) == len(batches) == expected, f"rank {rank}"
        assert all(x.shape == (32, 1, 28, 28) and y.shape == (32,) for x, y in batches)


def test_ranks_read_disjoint_shards_in_one_pass(small_shards: Path, mnist_arrays: MnistArrays) -> None:
    source = {mnist_arrays.train_images[i].tobytes() for i in range(SMALL_LIMIT)}
    seen = []
    for rank in range(7):  # one shard each; batch 50 = the shortest shard, so nothing wraps
        x, _ = _collect(make_loader(small_shards, "train", 50, rank=rank, world_size=7, shuffle_buffer=0))
        seen.append({(img * 255).round().to(torch.uint8).numpy().tobytes() for img in x[:, 0]})
    assert all(s <= source for s in seen)
    for i in range(7):
        for j in range(i + 1, 7):
            assert not seen[i] & seen[j], (i, j)


def test_same_seed_and_epoch_reproduce_other_epochs_differ(small_shards: Path) -> None:
    def labels(**kw: int) -> torch.Tensor:
        return _collect(make_loader(small_shards, "train", 25, shuffle_buffer=200, **kw))[1]

    a = labels(seed=1, epoch=0)
    assert torch.equal(a, labels(seed=1, epoch=0))
    assert not torch.equal(a, labels(seed=1, epoch=1))
    assert not torch.equal(a, labels(seed=2, epoch=0))
    loader = make_loader(small_shards, "train", 25, shuffle_buffer=200, seed=1)
    loader.set_epoch(1)
    assert torch.equal(_collect(loader)[1], labels(seed=1, epoch=1))


def test_workers_are_deterministic_and_resume_skips_exactly(small_shards: Path) -> None:
    full = list(make_loader(small_shards, "train", 20, num_workers=2, seed=3, epoch=2))
    again = list(make_loader(small_shards, "train", 20, num_workers=2, seed=3, epoch=2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    resumed = make_loader(small_shards, "train", 20, num_workers=2, seed=3, epoch=2, start_batch=5)
    rest = list(resumed)
    assert len(resumed) == len(rest) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[5:], rest))


def test_values_are_exactly_uint8_over_255(small_shards: Path, mnist_arrays: MnistArrays) -> None:
    loader = make_loader(small_shards, "test", 64, shuffle_buffer=0, drop_last=False)
    x, y = _collect(loader)
    assert len(loader) == len(list(loader))
    assert x.dtype == torch.float32 and x.shape == (SMALL_LIMIT, 1, 28, 28)
    expected = torch.from_numpy(mnist_arrays.test_images[:SMALL_LIMIT]).unsqueeze(1).to(torch.float32) / 255
    assert torch.equal(x, expected)
    assert torch.equal(y, torch.from_numpy(mnist_arrays.test_labels[:SMALL_LIMIT]))


def test_one_pass_with_workers_covers_every_sample_once(small_shards: Path, mnist_arrays: MnistArrays) -> None:
    loader = make_loader(small_shards, "train", 64, num_workers=2, drop_last=False)
    x, y = _collect(loader)
    assert x.shape[0] == SMALL_LIMIT
    order = np.lexsort(x.reshape(SMALL_LIMIT, -1).numpy().T)
    src = mnist_arrays.train_images[:SMALL_LIMIT].reshape(SMALL_LIMIT, -1).astype(np.float32) / 255
    assert np.array_equal(x.reshape(SMALL_LIMIT, -1).numpy()[order], src[np.lexsort(src.T)])


def test_load_split_in_memory_matches_source(full_shards: Path, mnist_arrays: MnistArrays) -> None:
    x, y = load_split_in_memory(full_shards, "test")
    assert x.shape == (10000, 1, 28, 28) and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(mnist_arrays.test_images).unsqueeze(1).float() / 255)
    assert torch.equal(y, torch.from_numpy(mnist_arrays.test_labels))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 3000] = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbage"])
def test_corrupt_shard_raises_naming_it(
    small_shards: Path, copy_shards: Callable[[Path], Path], damage: Callable[[Path], None]
) -> None:
    d = copy_shards(small_shards)
    damage(d / "train-000003.tar")
    with pytest.raises(ShardError, match="train-000003.tar"):
        list(make_loader(d, "train", 25, shuffle_buffer=0))
    with pytest.raises(ShardError, match="train-000003.tar"):
        load_split_in_memory(d, "train")


@pytest.mark.parametrize("damage", [_truncate, _garble], ids=["truncated", "garbage"])
def test_skip_mode_counts_and_keeps_batch_count(
    small_shards: Path,
    copy_shards: Callable[[Path], Path],
    damage: Callable[[Path], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = copy_shards(small_shards)
    damage(d / "train-000003.tar")
    loader = make_loader(d, "train", 25, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        batches = list(loader)
    assert len(batches) == len(loader) == SMALL_LIMIT // 25
    assert loader.stats["skipped"] >= 1
    assert "train-000003.tar" in caplog.text


def test_tar_reader_matches_webdataset_and_checks_headers(small_shards: Path, tmp_path: Path) -> None:
    import tarfile

    import webdataset as wds

    from data_pipeline.tar_reader import iter_tar_samples

    path = small_shards / "train-000003.tar"
    ours = list(iter_tar_samples(path.read_bytes(), str(path)))
    theirs = list(wds.tarfile_samples([{"url": str(path)}], handler=wds.reraise_exception))
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert {k: v for k, v in a.items() if k != "__url__"} == {k: b[k] for k in ("__key__", "png", "cls")}
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF  # a byte of the first member's name: the header checksum no longer matches
    with pytest.raises(ShardError, match="checksum mismatch"):
        list(iter_tar_samples(bytes(data), "x.tar"))
    pax = tmp_path / "pax.tar"
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(path, arcname="k" * 120 + ".png")  # a long name needs a pax header
    with pytest.raises(ShardError, match="only plain ustar files"):
        list(iter_tar_samples(pax.read_bytes(), str(pax)))


def test_bad_arguments_name_the_value(small_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rank must be in"):
        make_loader(small_shards, "train", 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fewer than world_size \\* batch_size"):
        make_loader(small_shards, "train", 400, world_size=2)
    with pytest.raises(ValueError, match="drop_last=False"):
        make_loader(small_shards, "train", 8, world_size=2, drop_last=False)
    with pytest.raises(ValueError, match="on_error"):
        make_loader(small_shards, "train", 8, on_error="ignore")
    with pytest.raises(Exception, match="python -m data_pipeline.prepare --out"):
        make_loader(tmp_path, "train", 8)


def _flip_first_label(path: Path) -> tuple[int, int]:
    """Change the first sample's ``.cls`` digit in place; returns (old, new) label.

    Only member data changes, so every tar header (and its checksum) stays valid: the tar
    reader alone cannot tell, only the manifest's sha256 can.
    """
    import tarfile

    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".cls"))
    data = bytearray(path.read_bytes())
    old = int(chr(data[member.offset_data]))
    new = (old + 1) % 10
    data[member.offset_data] = ord(str(new))
    path.write_bytes(bytes(data))
    return old, new


def test_flipped_label_is_caught_by_both_loaders(small_shards: Path, copy_shards: Callable[[Path], Path]) -> None:
    from data_pipeline.tar_reader import iter_tar_samples

    d = copy_shards(small_shards)
    bad = d / "train-000003.tar"
    old, new = _flip_first_label(bad)
    # The tar itself still reads cleanly, with the changed label: only the digest reveals it.
    first = next(iter_tar_samples(bad.read_bytes(), str(bad)))
    assert int(first["cls"]) == new != old
    with pytest.raises(ShardError, match=r"train-000003\.tar: sha256 .* differs from the manifest"):
        list(make_loader(d, "train", 25, shuffle_buffer=0))
    with pytest.raises(ShardError, match=r"train-000003\.tar: sha256 .* differs from the manifest"):
        load_split_in_memory(d, "train")
    # The test split's shards are untouched and still load.
    assert load_split_in_memory(d, "test")[0].shape[0] == SMALL_LIMIT


def test_skip_mode_drops_a_modified_shard_whole(
    small_shards: Path, copy_shards: Callable[[Path], Path], mnist_arrays: MnistArrays, caplog: pytest.LogCaptureFixture
) -> None:
    d = copy_shards(small_shards)
    _flip_first_label(d / "train-000003.tar")
    loader = make_loader(d, "train", 25, shuffle_buffer=0, on_error="skip", drop_last=False)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        x, y = _collect(loader)
    assert loader.stats == {"skipped": 1, "skipped_shards": 1}
    assert "train-000003.tar" in caplog.text and "sha256" in caplog.text
    # Exactly the other shards' samples, in order: nothing of shard 3 (samples 300..399) got through.
    keep = np.r_[0:300, 400:SMALL_LIMIT]
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(mnist_arrays.train_images[keep]))
    assert torch.equal(y, torch.from_numpy(mnist_arrays.train_labels[keep]).long())


def test_classifier_training_refuses_a_modified_shard(
    small_shards: Path, copy_shards: Callable[[Path], Path], tmp_path: Path
) -> None:
    import subprocess
    import sys

    d = copy_shards(small_shards)
    _flip_first_label(d / "train-000003.tar")
    out = tmp_path / "clf.safetensors"
    proc = subprocess.run(
        [
            sys.executable,
            "training/train_classifier.py",
            "--shards",
            str(d),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = refusal_line(proc)
    assert "train-000003.tar" in line and "sha256" in line, line
    assert not out.exists()
