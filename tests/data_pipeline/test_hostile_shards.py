"""Hostile shards whose manifest digest was recomputed: every undecodable or oversized image and every count or
label mismatch makes the shard bad, in both loaders. ``on_error="raise"``: one line naming the shard;
``on_error="skip"``: the shard is left out whole (none of its samples is delivered)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import tarfile
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.loader import load_split_in_memory, make_loader
from data_pipeline.mnist_arrays import MnistArrays
from data_pipeline.png import decode_png_gray, encode_png_gray
from data_pipeline.tar_reader import ShardError, iter_tar_samples

from .conftest import SMALL_LIMIT

BAD = "train-000003.tar"  # samples 300..399 of the small shards


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, colour: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def rgb_bomb() -> bytes:
    """An RGB PNG that declares 60000x60000 (10.8 GB of pixels) in a few hundred bytes."""
    return _png(60000, 60000, 2, zlib.compress(b"\0" * (3 * 60000 + 1) * 4))


def corrupt_idat_grey() -> bytes:
    """A 28x28 grey PNG (the shards' own kind) whose zlib stream is garbage; every CRC is valid."""
    return _png(28, 28, 0, b"\x78\x9c" + b"\xff" * 40)


def corrupt_idat_rgb() -> bytes:
    return _png(28, 28, 2, zlib.compress(b"\1" + b"\0" * 84)[:-6] + b"\x13\x37")


def huge_grey() -> bytes:
    """A valid 20000x20000 grey PNG (400 MB of pixels, about 400 kB of zlib)."""
    z = zlib.compressobj(6)
    row = b"\0" * 20001
    idat = b"".join(z.compress(row * 1000) for _ in range(20)) + z.flush()
    return _png(20000, 20000, 0, idat)


def _rewrite_shard(directory: Path, edit: Callable[[list[dict]], list[dict]]) -> None:
    """Rewrite one shard with edited samples and recompute its manifest digest and size (not its count)."""
    path = directory / BAD
    samples = edit(list(iter_tar_samples(path.read_bytes(), str(path))))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for ext in ("png", "cls"):
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(s[ext])
                tar.addfile(info, io.BytesIO(s[ext]))
    path.write_bytes(buf.getvalue())
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["name"] == BAD:
            entry["bytes"] = len(buf.getvalue())
            entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def _replace_png(png: bytes) -> Callable[[list[dict]], list[dict]]:
    def edit(samples: list[dict]) -> list[dict]:
        samples[40]["png"] = png
        return samples

    return edit


def _label_12(samples: list[dict]) -> list[dict]:
    samples[10]["cls"] = b"12"
    return samples


def _one_more_sample(samples: list[dict]) -> list[dict]:
    return samples + [dict(samples[0], __key__="train_000999")]


HOSTILE = {
    "rgb_bomb_60000x60000": (_replace_png(rgb_bomb()), "60000x60000"),
    "corrupt_idat_grey": (_replace_png(corrupt_idat_grey()), "corrupt"),
    "corrupt_idat_rgb": (_replace_png(corrupt_idat_rgb()), "undecodable PNG"),
    "grey_20000x20000": (_replace_png(huge_grey()), "20000x20000"),
    "label_12": (_label_12, "label 12 outside 0..9"),
    "more_samples_than_manifest": (_one_more_sample, "more samples than the 100 of the manifest"),
}


@pytest.fixture(scope="module", params=sorted(HOSTILE))
def hostile(request, small_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    import shutil

    edit, expected = HOSTILE[request.param]
    d = tmp_path_factory.mktemp(request.param) / "shards"
    shutil.copytree(small_shards, d)
    _rewrite_shard(d, edit)
    return d, expected


def test_raise_mode_is_one_line_naming_the_shard(hostile: tuple[Path, str]) -> None:
    d, expected = hostile
    for read in (
        lambda: list(make_loader(d, "train", 25, shuffle_buffer=0)),
        lambda: list(make_loader(d, "train", 25)),
        lambda: load_split_in_memory(d, "train"),
    ):
        with pytest.raises(ShardError) as info:
            read()
        msg = str(info.value)
        assert BAD in msg and expected in msg and "\n" not in msg and len(msg) < 600, msg


def test_skip_mode_delivers_none_of_the_bad_shard(
    hostile: tuple[Path, str], mnist_arrays: MnistArrays, caplog: pytest.LogCaptureFixture
) -> None:
    d, expected = hostile
    keep = np.r_[0:300, 400:SMALL_LIMIT]
    want_x = torch.from_numpy(mnist_arrays.train_images[keep])
    want_y = torch.from_numpy(mnist_arrays.train_labels[keep]).long()
    loader = make_loader(d, "train", 25, shuffle_buffer=0, on_error="skip", drop_last=False)
    with caplog.at_level(logging.WARNING, logger="data_pipeline.loader"):
        batches = list(loader)
        x, y = load_split_in_memory(d, "train", on_error="skip")
    assert loader.stats == {"skipped": 1, "skipped_shards": 1}
    assert caplog.text.count(BAD) == 2 and expected in caplog.text
    streamed_x = torch.cat([b[0] for b in batches])
    streamed_y = torch.cat([b[1] for b in batches])
    for images, labels in ((streamed_x, streamed_y), (x, y)):
        assert torch.equal((images[:, 0] * 255).round().to(torch.uint8), want_x)
        assert torch.equal(labels, want_y)
    # Training mode (full batches, shuffled) keeps its batch count without the shard.
    train = make_loader(d, "train", 25, on_error="skip")
    assert len(list(train)) == len(train) == SMALL_LIMIT // 25 and train.stats["skipped_shards"] >= 1


def test_oversized_png_is_refused_from_its_header_before_inflating() -> None:
    data = huge_grey()
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="20000x20000"):
            decode_png_gray(data, shape=(28, 28))
        with pytest.raises(ValueError, match="more than the"):
            decode_png_gray(data)
        with pytest.raises(ValueError, match="60000x60000"):
            decode_png_gray(rgb_bomb())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"decoding allocated {peak / 2**20:.0f} MiB (inflated the image?)"
    # A PNG that others wrote (RGB, so PIL decodes it) of the right size still reads, and ours round-trip.
    rows = np.concatenate([np.zeros((28, 1), np.uint8), np.full((28, 84), 200, np.uint8)], axis=1)
    assert decode_png_gray(_png(28, 28, 2, zlib.compress(rows.tobytes())), shape=(28, 28)).tolist() == [[200] * 28] * 28
    image = np.arange(784, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    assert np.array_equal(decode_png_gray(encode_png_gray(image), shape=(28, 28)), image)
