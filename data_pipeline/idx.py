"""The IDX format of MNIST's original release (http://yann.lecun.com/exdb/mnist/): reading and writing
unsigned-byte IDX files (optionally gzipped), and the ``"idx:DIR"`` source, torchvision's raw IDX files in
``DIR`` or ``DIR/MNIST/raw``, parsed here with numpy.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import INSTALL_HINT, SourceCorrupt, SourceUnavailable
from data_pipeline.mnist_arrays import MnistArrays, assemble

__all__ = ["read_idx", "write_idx", "find_idx_dir", "load_idx_source"]

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), then the number of dims.
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}


def _open_maybe_gz(path: Path) -> bytes:
    opener: Callable[[Path], Any] = gzip.open if path.suffix == ".gz" else open  # type: ignore[assignment]
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exn:
        raise SourceCorrupt(f"cannot read IDX file {path}: {exn}") from exn


def read_idx(path: str | os.PathLike[str], ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (optionally gzipped).

    Args:
        path: the file.
        ndim: expected number of dimensions (3 for images, 1 for labels).

    Returns:
        uint8 array with the dimensions from the header, e.g. (N, 28, 28) or (N,).

    Raises:
        SourceCorrupt: wrong magic number, truncated header, or data size not matching it.
    """
    path = Path(path)
    raw = _open_maybe_gz(path)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise SourceCorrupt(f"IDX file {path} is {len(raw)} bytes, shorter than its {header_len}-byte header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise SourceCorrupt(
            f"IDX file {path}: magic number 0x{magic:08x}, expected 0x{_IDX_MAGIC[ndim]:08x} "
            f"(unsigned byte, {ndim} dims); wrong file or not an IDX file"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header_len != expected:
        raise SourceCorrupt(
            f"IDX file {path}: header says {dims} = {expected} bytes of data, file has "
            f"{len(raw) - header_len}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when ``path`` ends in ``.gz``).

    The inverse of :func:`read_idx`; used by tests and to export MNIST for other tools.

    Raises:
        ValueError: ``array`` is not uint8 with 1 or 3 dims.
    """
    if array.dtype != np.uint8 and not (
        np.issubdtype(array.dtype, np.integer) and array.min() >= 0 and array.max() <= 255
    ):
        raise ValueError(f"write_idx needs values in 0..255, got dtype {array.dtype}")
    if array.ndim not in _IDX_MAGIC:
        raise ValueError(f"write_idx supports 1-D labels or 3-D images, got shape {array.shape}")
    header = _IDX_MAGIC[array.ndim].to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        # GzipFile, not gzip.open: only it takes mtime, and 0 keeps the output reproducible.
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def find_idx_dir(root: Path) -> Path | None:
    for candidate in (root, root / "MNIST" / "raw"):
        if all((candidate / name).is_file() or (candidate / f"{name}.gz").is_file() for name in _IDX_FILES.values()):
            return candidate
    return None


def load_idx_source(root: str | os.PathLike[str]) -> MnistArrays:
    """Load MNIST from torchvision's raw IDX files in ``root`` or ``root/MNIST/raw``.

    Raises:
        SourceUnavailable: the four files are not all there.
        SourceCorrupt: a file is malformed or the counts do not line up.
    """
    root = Path(root).expanduser()
    found = find_idx_dir(root)
    if found is None:
        raise SourceUnavailable(
            f"no complete set of MNIST IDX files in {root} or {root / 'MNIST' / 'raw'}; {INSTALL_HINT}"
        )
    arrays: dict[str, np.ndarray] = {}
    for name, filename in _IDX_FILES.items():
        path = found / filename
        if not path.is_file():
            path = found / f"{filename}.gz"
        arrays[name] = read_idx(path, ndim=3 if name.endswith("images") else 1)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
            raise SourceCorrupt(
                f"IDX {split} files in {found}: images {images.shape} and labels {labels.shape} "
                "do not describe the same number of 28x28 images"
            )
        if labels.max(initial=0) > 9:
            raise SourceCorrupt(f"IDX {split} labels in {found} contain {labels.max()}, expected 0..9")
    return assemble(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype("<i8"),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype("<i8"),
        source_name="idx",
        source_location=str(found),
    )
