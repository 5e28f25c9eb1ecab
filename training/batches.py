"""Deterministic, resumable batch streams for the training loops.

Both sources yield the same number of batches on every rank (so DDP never waits on a rank
that ran out) and their order is a pure function of (seed, epoch, rank, world size), so a
resumed run replays the interrupted epoch and skips the batches it already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from data_pipeline.loader import batches_per_epoch, make_loader
from data_pipeline.shards import read_manifest


class TensorBatches:
    """Batches from tensors already resident on the training device (the in-memory path).

    Each epoch draws one global permutation; global batch ``i`` is the slice
    ``perm[i*W*B:(i+1)*W*B]`` and rank ``r`` takes its ``r``-th share of ``B`` rows, so the
    union over ranks of one step's batches is the same whatever the world size.
    """

    def __init__(
        self, tensors: tuple[torch.Tensor, ...], batch_size: int, rank: int, world_size: int, seed: int
    ) -> None:
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError("all tensors must have the same first dimension")
        self.tensors = tensors
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.batches_per_epoch = n // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{n} samples cannot fill one batch of {batch_size} on {world_size} processes; lower the batch size"
            )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of ``epoch`` from batch index ``start`` on."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.tensors[0].shape[0], generator=g)
        gb = self.batch_size * self.world_size
        for i in range(start, self.batches_per_epoch):
            idx = perm[i * gb + self.rank * self.batch_size : i * gb + (self.rank + 1) * self.batch_size]
            idx = idx.to(self.tensors[0].device)
            yield tuple(t.index_select(0, idx) for t in self.tensors)


class StreamBatches:
    """Batches from the webdataset shard loader (data_pipeline.loader), per rank and worker."""

    def __init__(
        self,
        shard_dir: str,
        split: str,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        shuffle_buffer: int,
        on_error: str,
        device: torch.device,
    ) -> None:
        self.kw = dict(
            shard_dir=shard_dir,
            split=split,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            on_error=on_error,
        )
        self.device = device
        self.batches_per_epoch = batches_per_epoch(read_manifest(shard_dir), split, batch_size, world_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        # The stream is a pure function of (seed, epoch, rank, workers): start_batch skips the
        # batches a resumed run already trained on, before decoding them.
        for images, labels in make_loader(epoch=epoch, start_batch=start, **self.kw):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
