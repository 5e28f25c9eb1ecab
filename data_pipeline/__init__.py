"""MNIST acquisition, deterministic webdataset shards, and rank/worker-aware loaders.

    python -m data_pipeline.prepare --out DIR        # once: writes DIR/*.tar + manifest.json
    loader = make_loader(DIR, "train", 128, rank=r, world_size=w, epoch=e)

See ``sources`` (offline MNIST: the pickle and the choice of a source), ``idx`` (the IDX format and
source), ``mnist_arrays`` (the arrays and their recorded digests), ``errors`` (the expected errors),
``shards`` (writing/verifying shards and their manifest), ``png`` (the image codec), ``tar_reader``
(reading a shard's samples) and ``loader`` (streaming and in-memory readers).
"""

from typing import Any

from data_pipeline.errors import DataPipelineError, SourceCorrupt, SourceUnavailable
from data_pipeline.mnist_arrays import MnistArrays
from data_pipeline.shards import ManifestError, prepare_shards, read_manifest, verify_shards
from data_pipeline.sources import load_mnist
from data_pipeline.tar_reader import ShardError

__all__ = [
    "DataPipelineError",
    "ManifestError",
    "MnistArrays",
    "ShardError",
    "ShardLoader",
    "SourceCorrupt",
    "SourceUnavailable",
    "batches_per_epoch",
    "load_mnist",
    "load_split_in_memory",
    "make_loader",
    "prepare_shards",
    "read_manifest",
    "verify_shards",
]

_LOADER_NAMES = ("ShardLoader", "batches_per_epoch", "load_split_in_memory", "make_loader")


def __getattr__(name: str) -> Any:
    if name in _LOADER_NAMES:
        # heavy dependency: the loader imports torch (seconds); `python -m data_pipeline.prepare` must start fast
        from data_pipeline import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")
