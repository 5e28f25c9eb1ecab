"""The SINDy job's plan: memory planning of the Gram path before any work."""

from __future__ import annotations

import dataclasses

import numpy as np

from analysis.library import Library

__all__ = ["MemoryEstimate", "estimate_memory"]


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the streamed Gram path needs (float64) to regress n_samples on a library of n_terms columns.

    Attributes:
        n_samples: rows of Theta.
        n_terms: columns p of Theta.
        n_targets: regression targets m (usually d).
        gram_bytes: Gram statistics G (p, p), b (p, m), Y^T Y (m, m), sum Y (m,).
        chunk_bytes: one streamed Theta chunk, chunk_size * p * 8.
    """

    n_samples: int
    n_terms: int
    n_targets: int
    gram_bytes: int
    chunk_bytes: int


def estimate_memory(
    n_samples: int,
    d: int,
    library: Library | None = None,
    n_targets: int | None = None,
    chunk_size: int = 65536,
) -> MemoryEstimate:
    """Memory for the Gram statistics and one Theta chunk, in bytes (float64).

    Args:
        n_samples: number of (z, t, zdot) samples.
        d: state dimension.
        library: the library (default: ``Library.reference(d)``).
        n_targets: regression targets (default d).
        chunk_size: rows per streamed chunk.

    Returns:
        MemoryEstimate. E.g. reference library, d=16: Gram statistics 8.7 MB whatever n_samples is.
    """
    if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 1:
        raise ValueError(f"d (state dimension) must be a positive int; got {d!r}.")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0; got {n_samples}.")
    lib = Library.reference() if library is None else library
    p = lib.n_output_features(int(d))
    m = d if n_targets is None else int(n_targets)
    b = 8
    return MemoryEstimate(
        n_samples=int(n_samples),
        n_terms=p,
        n_targets=m,
        gram_bytes=(p * p + p * m + m * m + m) * b,
        chunk_bytes=min(int(n_samples), int(chunk_size)) * p * b,
    )
