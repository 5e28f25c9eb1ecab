"""Streaming MNIST batches from the webdataset shards, split by rank and DataLoader worker.

Pipeline per (rank, worker) "consumer" (webdataset, https://github.com/webdataset/webdataset):

    shard list (manifest) -> seeded per-epoch shard shuffle -> this consumer's shards
      -> whole shard read, size + sha256 checked against the manifest, every sample decoded and
         checked (tar_reader.read_shard; a bad shard is dropped whole) -> sample shuffle buffer
         (wds.shuffle, seeded) -> batches (wds.batched) -> exact per-worker quota

Data order is a pure function of ``(seed, epoch, rank, world_size, num_workers)``; nothing
reads the clock, the pid or ``torch.distributed``. With ``drop_last=True`` every rank yields
exactly ``batches_per_epoch(...)`` batches: a consumer whose shards run out before its quota
starts another (reshuffled) pass over them, and one with more data stops at the quota, so
uneven shard counts across ranks never make DDP wait on a rank that has finished.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shards import SPLITS, read_manifest
from data_pipeline.tar_reader import ShardError, read_shard

__all__ = ["ShardLoader", "make_loader", "batches_per_epoch", "load_split_in_memory"]

log = logging.getLogger(__name__)

# Distinct streams of randomness derived from one user seed.
_SHARD_ORDER, _SAMPLE_ORDER = 1, 2


def _derive_seed(*parts: int) -> int:
    # SeedSequence mixes the parts into well-separated seeds; hash() would be salted per process.
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def batches_per_epoch(manifest: dict[str, Any], split: str, batch_size: int, world_size: int) -> int:
    """Full batches every rank yields per epoch: ``floor(total / (world_size * batch_size))``.

    Args:
        manifest: from :func:`data_pipeline.shards.read_manifest`.
        split: ``"train"`` or ``"test"``.
        batch_size: samples per batch on one rank.
        world_size: number of ranks.
    """
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} is not in the manifest (has {sorted(manifest['splits'])})")
    return int(manifest["splits"][split]["total"]) // (world_size * batch_size)


def _consumer_shards(
    shards: list[dict[str, Any]],
    *,
    shuffle: bool,
    seed: int,
    epoch: int,
    pass_index: int,
    consumer: int,
    n_consumers: int,
) -> tuple[list[dict[str, Any]], bool]:
    """This consumer's shards for one pass, and whether samples must be strided.

    Every consumer computes the same shuffled list (the seed has no rank in it), so the
    slices partition it. With fewer shards than consumers a shard split would leave some
    consumer empty, so then every consumer reads every shard and keeps every
    ``n_consumers``-th sample (``strided``).
    """
    order = list(shards)
    if shuffle:
        random.Random(_derive_seed(seed, epoch, pass_index, _SHARD_ORDER)).shuffle(order)
    offset = 0
    for shard in order:
        shard["offset"] = offset  # index of the shard's first sample within this pass
        offset += shard["samples"]
    if len(order) >= n_consumers:
        return order[consumer::n_consumers], False
    return order, True


class _ShardStream(IterableDataset):
    """One epoch of batches for one rank; splits itself across DataLoader workers."""

    def __init__(self, loader: ShardLoader, epoch: int) -> None:
        super().__init__()
        self.loader = loader
        self.epoch = epoch

    def _handle(self, exn: ShardError) -> None:
        if self.loader.on_error == "raise":
            raise exn
        self.loader.stats["skipped"] += 1
        self.loader.stats["skipped_shards"] += 1
        log.warning("skipping a bad shard: %s", exn)

    def _samples(self, worker: int, n_workers: int, cycle: bool) -> Iterator[dict[str, Any]]:
        # Hand-written instead of wds.split_by_node/split_by_worker: those read the rank from
        # torch.distributed or the environment, while here it is passed explicitly, and they
        # cannot fall back to sample striding when shards are fewer than consumers.
        ld = self.loader
        consumer = ld.rank + ld.world_size * worker
        n_consumers = ld.world_size * n_workers
        for pass_index in range(1 << 62) if cycle else range(1):
            shards, strided = _consumer_shards(
                [dict(s) for s in ld.shards],
                shuffle=ld.shuffle_buffer > 0,
                seed=ld.seed,
                epoch=self.epoch,
                pass_index=pass_index,
                consumer=consumer,
                n_consumers=n_consumers,
            )
            produced = 0
            for shard in shards:
                path = ld.shard_dir / shard["name"]
                try:
                    images, labels = read_shard(path, shard)
                except ShardError as exn:
                    self._handle(exn)
                    continue
                for i in range(len(labels)):
                    if strided and (shard["offset"] + i) % n_consumers != consumer:
                        continue
                    produced += 1
                    yield images[i], int(labels[i])
            if produced == 0:
                raise ShardError(
                    f"rank {ld.rank} worker {worker} read no usable sample from its shards of "
                    f"{ld.split} in {ld.shard_dir}; re-run python -m data_pipeline.prepare --out {ld.shard_dir}"
                )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ld = self.loader
        info = get_worker_info()
        real_worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader takes batches from workers round-robin starting at worker 0, so epoch
        # batch j comes from stream j % n_workers. A run resumed at start_batch restarts that
        # round-robin, so its worker w must play stream (w + start_batch) % n_workers.
        worker = (real_worker + ld.start_batch) % n_workers
        stages: list[Any] = [lambda: self._samples(worker, n_workers, cycle=ld.drop_last)]
        if ld.shuffle_buffer > 1:
            rng = random.Random(
                _derive_seed(ld.seed, self.epoch, ld.rank, ld.world_size, n_workers, worker, _SAMPLE_ORDER)
            )
            stages.append(wds.shuffle(ld.shuffle_buffer, initial=min(ld.shuffle_buffer, 100), rng=rng))
        # Stream `worker` owns epoch batches worker, worker + n_workers, ...; skip those before
        # start_batch (before batching; the shards were decoded as they were checked).
        skip = len(range(worker, ld.start_batch, n_workers))
        if skip:
            stages.append(lambda src: islice(src, skip * ld.batch_size, None))
        stages.append(wds.batched(ld.batch_size, collation_fn=_collate, partial=not ld.drop_last))
        if ld.drop_last:
            quota = len(range(worker, ld.num_batches, n_workers)) - skip
            stages.append(lambda src: islice(src, quota))
        return iter(wds.DataPipeline(*stages))


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([s[0] for s in samples]))  # (B, 28, 28) uint8
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)  # (B,)
    return images.unsqueeze(1).to(torch.float32).div_(255.0), labels  # (B, 1, 28, 28) in [0, 1]


class ShardLoader:
    """Iterable of ``(images (B, 1, 28, 28) float32 in [0, 1], labels (B,) int64)``.

    Build it with :func:`make_loader`. ``len(loader)`` is the number of batches one
    iteration yields; :meth:`set_epoch` changes the order for the next iteration.

    Attributes:
        stats: ``skipped`` (skip events), ``skipped_shards`` (a bad shard is skipped whole); counted in
            this process, so only complete with ``num_workers=0`` (workers log warnings).
    """

    def __init__(
        self,
        shard_dir: str | Path,
        split: str,
        batch_size: int,
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        shuffle_buffer: int,
        seed: int,
        epoch: int,
        on_error: str,
        drop_last: bool,
        start_batch: int,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("start_batch", start_batch, 0),
            ("epoch", epoch, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not drop_last and world_size > 1:
            raise ValueError(
                "drop_last=False gives ranks different batch counts (DDP would hang); use "
                "drop_last=True with world_size > 1, or load_split_in_memory for evaluation"
            )
        if not drop_last and start_batch:
            raise ValueError("start_batch needs drop_last=True (resuming mid-epoch is a training feature)")
        self.shard_dir = Path(shard_dir)
        self.manifest = read_manifest(self.shard_dir)
        self.split, self.batch_size = split, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch
        self.on_error, self.drop_last, self.start_batch = on_error, drop_last, start_batch
        self.shards = [dict(s) for s in self.manifest["splits"][split]["shards"]]
        self.stats = {"skipped": 0, "skipped_shards": 0}
        self.num_batches = batches_per_epoch(self.manifest, split, batch_size, world_size)
        if drop_last and self.num_batches == 0:
            total = self.manifest["splits"][split]["total"]
            raise ValueError(
                f"{split} has {total} samples, fewer than world_size * batch_size = "
                f"{world_size * batch_size}: no full batch per rank; lower batch_size"
            )
        if start_batch > self.num_batches:
            raise ValueError(f"start_batch {start_batch} is past the epoch's {self.num_batches} batches")

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (shard and sample order depend on it)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_batches - self.start_batch
        n_workers = max(1, self.num_workers)
        total = 0
        for worker in range(n_workers):
            shards, strided = _consumer_shards(
                [dict(s) for s in self.shards],
                shuffle=self.shuffle_buffer > 0,
                seed=self.seed,
                epoch=self.epoch,
                pass_index=0,
                consumer=worker,
                n_consumers=n_workers,
            )
            n = (
                len(range(worker, self.manifest["splits"][self.split]["total"], n_workers))
                if strided
                else sum(s["samples"] for s in shards)
            )
            total += -(-n // self.batch_size)
        return total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = _ShardStream(self, self.epoch)
        if self.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))


def make_loader(
    shard_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch: int = 0,
    on_error: str = "raise",
    drop_last: bool = True,
    start_batch: int = 0,
) -> ShardLoader:
    """Stream shuffled MNIST batches for one rank.

    Args:
        shard_dir: directory written by ``python -m data_pipeline.prepare``.
        split: ``"train"`` or ``"test"``.
        batch_size: samples per batch on this rank.
        rank: this process's rank (e.g. ``accelerator.process_index``).
        world_size: number of processes (e.g. ``accelerator.num_processes``).
        num_workers: DataLoader worker processes (0 = read in this process).
        shuffle_buffer: sample shuffle buffer size; 0 reads shards and samples in stored order.
        seed: base seed; order is a pure function of (seed, epoch, rank, world_size, num_workers).
        epoch: epoch whose order to produce (see also ``ShardLoader.set_epoch``).
        on_error: ``"raise"``: a bad shard raises ShardError naming the file; ``"skip"``:
            the bad shard is skipped whole, logged and counted in ``stats``. Every shard is
            checked against the manifest's size and sha256, and every sample decoded and
            checked (28x28, label 0..9, the manifest's count), before any of its samples is
            used, so none of a bad shard's samples is ever yielded.
        drop_last: True: exactly ``batches_per_epoch`` full batches on every rank (data wraps
            around within a rank if its shards hold fewer samples). False: one pass, every
            sample once, last batch per worker may be partial; single rank only.
        start_batch: skip the first ``start_batch`` batches of the epoch (resume); the rest
            are identical to an uninterrupted run.

    Returns:
        ShardLoader yielding ``(images (B, 1, 28, 28) float32 = uint8 / 255, labels (B,) int64)``.

    Raises:
        ManifestError: ``shard_dir`` has no valid manifest.
        ValueError: an argument is out of range.
    """
    return ShardLoader(
        shard_dir,
        split,
        batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch=epoch,
        on_error=on_error,
        drop_last=drop_last,
        start_batch=start_batch,
    )


def load_split_in_memory(
    shard_dir: str | Path, split: str, device: str | torch.device | None = None, on_error: str = "raise"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every sample of a split, in stored order, into two tensors.

    Args:
        shard_dir: directory written by ``python -m data_pipeline.prepare``.
        split: ``"train"`` or ``"test"``.
        device: where to put the tensors; ``None`` = CPU, ``"auto"`` = CUDA when available.
        on_error: ``"raise"``: a bad shard raises ShardError naming it; ``"skip"``: a bad shard is
            left out whole, with a warning (the tensors are shorter by its samples).

    Returns:
        images (N, 1, 28, 28) float32 = uint8 / 255, labels (N,) int64.

    Raises:
        ManifestError: no valid manifest.
        ShardError: a shard's size or sha256 differs from the manifest, it is unreadable, its sample
            count differs, or a sample is undecodable, not 28x28 or labelled outside 0..9 (names the
            file); with ``on_error="skip"`` only when no shard is usable.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    directory = Path(shard_dir)
    info = read_manifest(directory)["splits"][split]
    total = int(info["total"])
    images = np.empty((total, 28, 28), dtype=np.uint8)  # (N, 28, 28)
    labels = np.empty((total,), dtype=np.int64)  # (N,)
    n = 0
    for shard in info["shards"]:
        try:
            shard_images, shard_labels = read_shard(directory / shard["name"], shard)
        except ShardError as exn:
            if on_error == "raise":
                raise
            log.warning("skipping a bad shard: %s", exn)
            continue
        k = len(shard_labels)  # = the manifest's count, whose sum is total (read_manifest checks it)
        images[n : n + k], labels[n : n + k] = shard_images, shard_labels
        n += k
    if n == 0 and total > 0:
        raise ShardError(
            f"no usable shard of {split} in {directory}; re-run python -m data_pipeline.prepare --out {directory}"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(images[:n]).unsqueeze(1).to(device=device or "cpu", dtype=torch.float32).div_(255.0)
    return x, torch.from_numpy(labels[:n]).to(device or "cpu")
