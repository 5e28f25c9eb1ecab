"""Sufficient statistics of a linear least-squares problem, streamed once: the Gram path of the SINDy fit.

Stream the data once to accumulate (``GramStats``)
    G = Theta^T Theta (p, p),  b = Theta^T Y (p, m),  Y^T Y (m, m),  sum Y (m,),  n
in float64 with torch on ``device`` (CUDA when available and asked for). Memory is O(p^2)
whatever n is; partial statistics from several workers add up (``merge``), and residuals and
R^2 of any coefficients follow from them alone (``rss``, ``tss``, ``r2``). The fits on them live in
analysis/sindy/optimizers.py; the Gram path squares the condition number, so prefer
``normalize_columns=True`` or ``alpha > 0`` for badly scaled libraries.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import scipy.linalg
import torch

from configs.io import resolve_device

__all__ = ["GramStats", "as_2d_targets", "solve_spd"]


def as_2d_targets(y: Any) -> Any:
    """(n,) -> (n, 1); (n, m) unchanged; anything else is an error."""
    if y.ndim == 1:
        return y.reshape(-1, 1)
    if y.ndim != 2:
        raise ValueError(f"targets must have shape (n,) or (n, m); got {tuple(y.shape)}.")
    return y


def _to_device(x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)


def solve_spd(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve A w = rhs for symmetric positive semi-definite A as sklearn's ridge does:
    Cholesky-based solve, falling back to the minimum-norm least-squares solution when A
    is singular."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        try:
            return scipy.linalg.solve(A, rhs, assume_a="pos")
        except np.linalg.LinAlgError:
            return np.linalg.lstsq(A, rhs, rcond=None)[0]


@dataclasses.dataclass
class GramStats:
    """Sufficient statistics of a linear least-squares problem Y ~ Theta W.

    Attributes:
        gram: (p, p) Theta^T Theta.
        cross: (p, m) Theta^T Y.
        target_gram: (m, m) Y^T Y.
        target_sum: (m,) sum of Y over samples (for R^2's total sum of squares).
        n_samples: number of samples accumulated (a float when bootstrap-weighted counts
            are used; always a whole number in practice).
    """

    gram: torch.Tensor
    cross: torch.Tensor
    target_gram: torch.Tensor
    target_sum: torch.Tensor
    n_samples: float = 0

    @classmethod
    def zeros(cls, n_terms: int, n_targets: int, device: str | torch.device | None = None) -> GramStats:
        """Empty statistics for p = n_terms and m = n_targets on ``device``."""
        dev = resolve_device(device)
        z = dict(dtype=torch.float64, device=dev)
        return cls(
            gram=torch.zeros((n_terms, n_terms), **z),
            cross=torch.zeros((n_terms, n_targets), **z),
            target_gram=torch.zeros((n_targets, n_targets), **z),
            target_sum=torch.zeros((n_targets,), **z),
            n_samples=0,
        )

    @property
    def device(self) -> torch.device:
        return self.gram.device

    @property
    def n_terms(self) -> int:
        return int(self.gram.shape[0])

    @property
    def n_targets(self) -> int:
        return int(self.cross.shape[1])

    def update(self, theta_chunk: Any, target_chunk: Any, weights: Any | None = None) -> GramStats:
        """Add a chunk of samples in place.

        Args:
            theta_chunk: (c, p) library rows (numpy or torch, any device).
            target_chunk: (c, m) or (c,) targets.
            weights: optional (c,) nonnegative sample weights (bootstrap counts).

        Returns:
            self.
        """
        th = _to_device(theta_chunk, self.device)  # (c, p)
        y = as_2d_targets(_to_device(target_chunk, self.device))  # (c, m)
        if th.ndim != 2 or th.shape[1] != self.n_terms:
            raise ValueError(
                f"theta_chunk must have shape (c, {self.n_terms}); got {tuple(th.shape)}. "
                "Use the same library for every chunk."
            )
        if y.shape != (th.shape[0], self.n_targets):
            raise ValueError(f"target_chunk must have shape ({th.shape[0]}, {self.n_targets}); got {tuple(y.shape)}.")
        if weights is None:
            thw, yw, n = th, y, th.shape[0]
        else:
            w = _to_device(weights, self.device).reshape(-1, 1)  # (c, 1)
            if w.shape[0] != th.shape[0]:
                raise ValueError(f"weights must have shape ({th.shape[0]},); got {tuple(w.shape)}.")
            thw, yw, n = th * w, y * w, float(w.sum())
        self.gram += thw.T @ th
        self.cross += thw.T @ y
        self.target_gram += yw.T @ y
        self.target_sum += yw.sum(dim=0)
        self.n_samples += n
        return self

    def merge(self, other: GramStats) -> GramStats:
        """Sum of two statistics (e.g. from two workers), as a new object on self's device."""
        if (other.n_terms, other.n_targets) != (self.n_terms, self.n_targets):
            raise ValueError(
                f"cannot merge statistics of shape (p={other.n_terms}, m={other.n_targets}) "
                f"into (p={self.n_terms}, m={self.n_targets}); they come from different "
                "libraries or targets."
            )
        dev = self.device
        return GramStats(
            gram=self.gram + other.gram.to(dev),
            cross=self.cross + other.cross.to(dev),
            target_gram=self.target_gram + other.target_gram.to(dev),
            target_sum=self.target_sum + other.target_sum.to(dev),
            n_samples=self.n_samples + other.n_samples,
        )

    __add__ = merge

    @staticmethod
    def weighted_sum(stats: Sequence[GramStats], weights: Sequence[float]) -> GramStats:
        """sum_g w_g S_g (bootstrap over groups with counts w_g)."""
        if len(stats) != len(weights) or not stats:
            raise ValueError(
                f"need one weight per statistics object; got {len(stats)} stats and {len(weights)} weights."
            )
        out = GramStats.zeros(stats[0].n_terms, stats[0].n_targets, stats[0].device)
        for s, w in zip(stats, weights):
            if w == 0:
                continue
            out.gram += w * s.gram
            out.cross += w * s.cross
            out.target_gram += w * s.target_gram
            out.target_sum += w * s.target_sum
            out.n_samples += w * s.n_samples
        return out

    def subset(self, cols: Sequence[int]) -> GramStats:
        """The statistics of the library restricted to the columns ``cols`` (targets unchanged)."""
        idx = torch.as_tensor(np.asarray(cols, dtype=np.int64), device=self.device)
        return GramStats(
            gram=self.gram[idx][:, idx].clone(),
            cross=self.cross[idx].clone(),
            target_gram=self.target_gram.clone(),
            target_sum=self.target_sum.clone(),
            n_samples=self.n_samples,
        )

    def to_numpy(self) -> dict:
        """{"gram", "cross", "target_gram", "target_sum": float64 arrays, "n_samples"}."""
        return {
            "gram": self.gram.detach().cpu().numpy().copy(),
            "cross": self.cross.detach().cpu().numpy().copy(),
            "target_gram": self.target_gram.detach().cpu().numpy().copy(),
            "target_sum": self.target_sum.detach().cpu().numpy().copy(),
            "n_samples": self.n_samples,
        }

    @classmethod
    def from_numpy(cls, arrays: dict, device: str | torch.device | None = "cpu") -> GramStats:
        """Inverse of ``to_numpy``."""
        dev = resolve_device(device)
        return cls(
            gram=_to_device(arrays["gram"], dev),
            cross=_to_device(arrays["cross"], dev),
            target_gram=_to_device(arrays["target_gram"], dev),
            target_sum=_to_device(arrays["target_sum"], dev),
            n_samples=arrays["n_samples"],
        )

    @classmethod
    def from_arrays(
        cls,
        theta: Any,
        targets: Any,
        chunk_size: int = 65536,
        device: str | torch.device | None = None,
    ) -> GramStats:
        """Statistics of an in-memory Theta (n, p) and targets (n, m), chunk by chunk."""
        targets = as_2d_targets(targets)
        stats = cls.zeros(theta.shape[1], targets.shape[1], device)
        for i in range(0, theta.shape[0], chunk_size):
            stats.update(theta[i : i + chunk_size], targets[i : i + chunk_size])
        return stats

    @classmethod
    def from_library(
        cls,
        library: Any,
        batches: Iterable[tuple[Any, Any, Any]],
        device: str | torch.device | None = None,
        chunk_size: int = 65536,
    ) -> GramStats:
        """Stream (z, t, zdot) batches through ``library`` without materializing Theta.

        Args:
            library: an ``analysis.sindy.library.Library`` (fit, or fit here on the first batch).
            batches: iterable of (z (c, d), t (c,) or scalar or None, zdot (c, m)) in
                numpy/torch, optionally with (c,) nonnegative row weights as a fourth element.
            device: where Theta chunks and statistics live (see ``resolve_device``).
            chunk_size: rows per Theta evaluation (bounds peak memory at chunk_size * p).

        Returns:
            GramStats with p = library.n_terms, m = zdot.shape[1].
        """
        dev = resolve_device(device)
        stats = None
        for batch in batches:
            z, t, zdot = batch[:3]
            w = batch[3] if len(batch) > 3 else None
            z = _to_device(z, dev)
            zdot = as_2d_targets(_to_device(zdot, dev))
            t = None if t is None else _to_device(t, dev)
            if library.n_state is None:
                library.fit(z, t)
            if stats is None:
                stats = cls.zeros(library.n_terms, zdot.shape[1], dev)
            for i in range(0, z.shape[0], chunk_size):
                tc = t if t is None or t.ndim == 0 else t[i : i + chunk_size]
                theta = library.transform(z[i : i + chunk_size], tc)  # (c, p)
                stats.update(theta, zdot[i : i + chunk_size], None if w is None else w[i : i + chunk_size])
        if stats is None:
            raise ValueError("batches was empty; nothing to accumulate.")
        return stats

    # -- residuals

    def numpy_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(G, b, Y^T Y, sum Y) as float64 numpy arrays on the CPU (views where the tensors live there)."""
        return (
            self.gram.detach().cpu().numpy(),
            self.cross.detach().cpu().numpy(),
            self.target_gram.detach().cpu().numpy(),
            self.target_sum.detach().cpu().numpy(),
        )

    def rss(self, coef: np.ndarray, dims: Sequence[int] | None = None) -> np.ndarray:
        """Residual sum of squares RSS_j = w^T G w - 2 w^T b_j + y_j^T y_j.

        Args:
            coef: (m', p) coefficients, one row per target in ``dims``.
            dims: target indices of the rows of coef (default: all m targets).

        Returns:
            (m',) RSS, clipped at 0 (negative values are float64 cancellation only).
        """
        G, B, YY, _ = self.numpy_parts()
        coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
        dims = list(range(self.n_targets)) if dims is None else list(dims)
        if coef.shape != (len(dims), self.n_terms):
            raise ValueError(f"coef must have shape ({len(dims)}, {self.n_terms}) for dims={dims}; got {coef.shape}.")
        quad = np.einsum("jp,pq,jq->j", coef, G, coef)
        lin = np.einsum("jp,pj->j", coef, B[:, dims])
        return np.maximum(quad - 2 * lin + np.diag(YY)[dims], 0.0)

    def tss(self, dims: Sequence[int] | None = None) -> np.ndarray:
        """Total sum of squares about the mean, (m',)."""
        _, _, YY, S = self.numpy_parts()
        dims = list(range(self.n_targets)) if dims is None else list(dims)
        if self.n_samples <= 0:
            raise ValueError("these statistics hold no samples; accumulate data first.")
        return np.diag(YY)[dims] - S[dims] ** 2 / self.n_samples

    def r2(self, coef: np.ndarray, dims: Sequence[int] | None = None) -> np.ndarray:
        """R^2_j = 1 - RSS_j / TSS_j, (m',); NaN where a target is constant (TSS = 0)."""
        rss, tss = self.rss(coef, dims), self.tss(dims)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(tss > 0, 1.0 - rss / np.where(tss > 0, tss, 1.0), np.nan)
