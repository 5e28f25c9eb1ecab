"""Data pipeline: images/s of the streaming shard loader per worker process, against a plain
webdataset pipeline (PIL decode) over the same shards.

    python -m benchmarks.bench_data --shards data/mnist [--repeats 3]

Target (issue 6): at least 20,000 images/s per worker process on CPU. "Per worker" is the loader
with num_workers=0 (everything in the calling process); the multi-worker row is for reference.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from benchmarks.common import finish, row, time_calls
from data_pipeline.loader import make_loader
from data_pipeline.shards import read_manifest

TARGET = 20_000


def plain_epoch(shard_dir: Path, batch_size: int) -> int:
    """The plain way: webdataset's own PIL decoder and batching, one process."""
    urls = [str(shard_dir / s["name"]) for s in read_manifest(shard_dir)["splits"]["train"]["shards"]]

    def pil_gray(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("L"))

    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .map_dict(png=pil_gray, cls=lambda b: int(b))
        .to_tuple("png", "cls")
        .batched(batch_size)
    )
    n = 0
    for images, labels in ds:
        torch.from_numpy(np.asarray(images))
        n += len(labels)
    return n


def loader_epoch(shard_dir: Path, batch_size: int, workers: int) -> int:
    n = 0
    for images, _ in make_loader(
        shard_dir, "train", batch_size, num_workers=workers, shuffle_buffer=1000, drop_last=False
    ):
        n += images.shape[0]
    return n


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default="data/mnist", help="shard folder written by data_pipeline.prepare")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference row")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    shard_dir = Path(a.shards)
    if not (shard_dir / "manifest.json").is_file():
        raise SystemExit(f"{shard_dir} has no manifest.json: run python -m data_pipeline.prepare --out {shard_dir}")
    total = read_manifest(shard_dir)["splits"]["train"]["total"]
    cpu = torch.device("cpu")
    cfg = {"split": "train", "images": total, "batch_size": a.batch_size}
    rows = []
    counts = {}

    def timed(name, fn, config):
        secs = time_calls(lambda: counts.__setitem__(name, fn()), cpu, a.repeats, warmup=0)
        rows.append(row(name, config, secs, total, "images/s", check=f"{counts[name]} images"))

    timed("plain webdataset + PIL, 1 process", lambda: plain_epoch(shard_dir, a.batch_size), cfg)
    timed(
        "make_loader, num_workers=0 (one process)",
        lambda: loader_epoch(shard_dir, a.batch_size, 0),
        {**cfg, "num_workers": 0, "shuffle_buffer": 1000},
    )
    if a.workers > 0:
        timed(
            f"make_loader, num_workers={a.workers} (total)",
            lambda: loader_epoch(shard_dir, a.batch_size, a.workers),
            {**cfg, "num_workers": a.workers, "shuffle_buffer": 1000},
        )
    if len(set(counts.values())) != 1:
        raise SystemExit(f"the pipelines read different numbers of images: {counts}")
    per_worker = rows[1]["median"]
    targets = [
        {
            "target": f"loader >= {TARGET:,} images/s per worker process (CPU)",
            "met": per_worker >= TARGET,
            "measured": f"{per_worker:,.0f} images/s, {rows[1]['median'] / rows[0]['median']:.2f}x plain",
        }
    ]
    return finish("data", cpu, rows, targets, Path(a.out) if a.out else None)


if __name__ == "__main__":
    main()
