"""Per-dimension sparse regression of latent velocities on a candidate library.

References:
    S. L. Brunton, J. L. Proctor, J. N. Kutz, "Discovering governing equations from data
    by sparse identification of nonlinear dynamical systems", PNAS 113(15):3932-3937, 2016
    (sequentially thresholded least squares, STLSQ).
    B. de Silva et al., "PySINDy", JOSS 5(49):2104, 2020 and A. A. Kaptanoglu et al.,
    "PySINDy: a comprehensive Python package for robust sparse system identification",
    JOSS 7(69):3994, 2022 (the STLSQ variant we reproduce: ridge steps, column
    normalization, final unregularized refit).
    P. Zheng, T. Askham, S. L. Brunton, J. N. Kutz, A. Y. Aravkin, "A unified framework
    for sparse relaxed regularized regression: SR3", IEEE Access 7:1404-1423, 2019.
    U. Fasel, J. N. Kutz, B. W. Brunton, S. L. Brunton, "Ensemble-SINDy", Proc. R. Soc. A
    478:20210904, 2022 (bagging, inclusion probabilities).
    B. Efron, "Bootstrap methods: another look at the jackknife", Ann. Stat. 7(1), 1979.

Two paths to the same STLSQ coefficients:

1. direct: ``STLSQ(...).fit(theta, targets)`` on Theta (n, p) in memory.
2. Gram: stream the data once to accumulate sufficient statistics (``GramStats``)
       G = Theta^T Theta (p, p),  b = Theta^T Y (p, m),  Y^T Y (m, m),  sum Y (m,),  n
   in float64 with torch on ``device`` (CUDA when available and asked for), then run
   STLSQ per dimension on (G, b) alone: ``STLSQ(...).fit_gram(stats)``. Memory is
   O(p^2) whatever n is; partial statistics from several workers add up (``merge``).
   For full-rank active sets both paths agree with ``pysindy.STLSQ`` to ~1e-10 (tested to
   1e-8); the Gram path squares the condition number, so prefer ``normalize_columns=True``
   or ``alpha > 0`` for badly scaled libraries.

STLSQ semantics (``pysindy.STLSQ`` 2.x with sparse_ind=None and initial_guess=None, per
target dimension; the targets are independent, so fitting them one at a time gives the
same result as pysindy's joint loop):
    * normalize_columns: columns are divided by their L2 norms ||theta_k|| (on the Gram
      path sqrt(G_kk)); thresholds apply to the coefficients of the normalized columns;
      the final coefficients are divided by the norms.
    * iteration k (at most max_iter): ridge solve on the active set S,
      argmin ||y - X_S w||^2 + alpha ||w||^2, i.e. (X_S^T X_S + alpha I) w = X_S^T y;
      coefficients with |w| < threshold are set to zero and leave S.
    * stop when the zero pattern did not change (the first iteration compares with the
      dense least-squares start, i.e. stops when nothing was thresholded) or S is empty;
      a ConvergenceWarning if max_iter is reached first.
    * unbias (default True): refit by plain least squares (no ridge) on the final support
      {k : |w_k| > 1e-14}.

Threshold selection (``sweep_thresholds``): fit on training statistics for each
threshold of a log-spaced grid, score R^2 on held-out statistics (the caller splits by
trajectory), mark the Pareto front of (n_terms, held-out R^2), and choose
(``choose_model``) the sparsest model, optionally among those with at most ``max_terms``
terms, whose held-out unexplained variance uv = 1 - R^2 is at most (1 + tol) uv_best + 1e-10,
ties going to the higher held-out R^2. The tolerance is on uv, not on R^2: "within 1% of the
best R^2" accepts 50% more unexplained variance at R^2 = 0.98 and lets round-off decide on
exact data; the rule and its defaults were chosen on known systems (benchmarks/bench_sindy_rule.py).

Bagging (``bagging``, ``bagging_gram``): B bootstrap resamples, of trajectory groups when
group ids are given, else of samples; each resample's statistics are count-weighted sums
G_boot = sum_g c_g G_g (c: multinomial counts), so no Theta is rebuilt. Reports per-term
inclusion probabilities and coefficient mean/std over all B models (excluded terms count
as 0). Deterministic given ``seed``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.linalg
import torch
from sklearn.exceptions import ConvergenceWarning

from configs.io import resolve_device

__all__ = [
    "GramStats",
    "STLSQ",
    "SR3",
    "ForwardStepwise",
    "fit_dimension",
    "ThresholdSweep",
    "threshold_grid",
    "sweep_thresholds",
    "sweep_with_gate",
    "BaggingResult",
    "group_stats",
    "bagging",
    "bagging_gram",
    "stepwise_stats",
    "free_time_r2",
    "r2_score",
    "rmse",
]

# pysindy marks a coefficient as selected when |w| > 1e-14 before the unbiasing refit.
_SUPPORT_EPS = 1e-14


def _as_2d_targets(y: Any) -> Any:
    if y.ndim == 1:
        return y.reshape(-1, 1)
    if y.ndim != 2:
        raise ValueError(f"targets must have shape (n,) or (n, m); got {tuple(y.shape)}.")
    return y


def _to_device(x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)


# -------------------------------------------------------------------------- statistics


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
    def zeros(
        cls, n_terms: int, n_targets: int, device: str | torch.device | None = None
    ) -> "GramStats":
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

    def update(
        self, theta_chunk: Any, target_chunk: Any, weights: Any | None = None
    ) -> "GramStats":
        """Add a chunk of samples in place.

        Args:
            theta_chunk: (c, p) library rows (numpy or torch, any device).
            target_chunk: (c, m) or (c,) targets.
            weights: optional (c,) nonnegative sample weights (bootstrap counts).

        Returns:
            self.
        """
        th = _to_device(theta_chunk, self.device)  # (c, p)
        y = _as_2d_targets(_to_device(target_chunk, self.device))  # (c, m)
        if th.ndim != 2 or th.shape[1] != self.n_terms:
            raise ValueError(
                f"theta_chunk must have shape (c, {self.n_terms}); got {tuple(th.shape)}. "
                "Use the same library for every chunk."
            )
        if y.shape != (th.shape[0], self.n_targets):
            raise ValueError(
                f"target_chunk must have shape ({th.shape[0]}, {self.n_targets}); got "
                f"{tuple(y.shape)}."
            )
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

    def merge(self, other: "GramStats") -> "GramStats":
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
    def weighted_sum(stats: Sequence["GramStats"], weights: Sequence[float]) -> "GramStats":
        """sum_g w_g S_g (bootstrap over groups with counts w_g)."""
        if len(stats) != len(weights) or not stats:
            raise ValueError(
                f"need one weight per statistics object; got {len(stats)} stats and "
                f"{len(weights)} weights."
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

    def subset(self, cols: Sequence[int]) -> "GramStats":
        """The statistics of the library restricted to the columns ``cols`` (targets unchanged)."""
        idx = torch.as_tensor(np.asarray(cols, dtype=np.int64), device=self.device)
        return GramStats(gram=self.gram[idx][:, idx].clone(), cross=self.cross[idx].clone(),
                         target_gram=self.target_gram.clone(), target_sum=self.target_sum.clone(),
                         n_samples=self.n_samples)

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
    def from_numpy(cls, arrays: dict, device: str | torch.device | None = "cpu") -> "GramStats":
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
    ) -> "GramStats":
        """Statistics of an in-memory Theta (n, p) and targets (n, m), chunk by chunk."""
        targets = _as_2d_targets(targets)
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
    ) -> "GramStats":
        """Stream (z, t, zdot) batches through ``library`` without materializing Theta.

        Args:
            library: an ``analysis.library.Library`` (fit, or fit here on the first batch).
            batches: iterable of (z (c, d), t (c,) or scalar or None, zdot (c, m)) in
                numpy/torch.
            device: where Theta chunks and statistics live (see ``resolve_device``).
            chunk_size: rows per Theta evaluation (bounds peak memory at chunk_size * p).

        Returns:
            GramStats with p = library.n_terms, m = zdot.shape[1].
        """
        dev = resolve_device(device)
        stats = None
        for z, t, zdot in batches:
            z = _to_device(z, dev)
            zdot = _as_2d_targets(_to_device(zdot, dev))
            t = None if t is None else _to_device(t, dev)
            if library.n_state is None:
                library.fit(z, t)
            if stats is None:
                stats = cls.zeros(library.n_terms, zdot.shape[1], dev)
            for i in range(0, z.shape[0], chunk_size):
                tc = t if t is None or t.ndim == 0 else t[i : i + chunk_size]
                theta = library.transform(z[i : i + chunk_size], tc)  # (c, p)
                stats.update(theta, zdot[i : i + chunk_size])
        if stats is None:
            raise ValueError("batches was empty; nothing to accumulate.")
        return stats

    # -- residuals

    def _numpy_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
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
        G, B, YY, _ = self._numpy_parts()
        coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
        dims = list(range(self.n_targets)) if dims is None else list(dims)
        if coef.shape != (len(dims), self.n_terms):
            raise ValueError(
                f"coef must have shape ({len(dims)}, {self.n_terms}) for dims={dims}; got "
                f"{coef.shape}."
            )
        quad = np.einsum("jp,pq,jq->j", coef, G, coef)
        lin = np.einsum("jp,pj->j", coef, B[:, dims])
        return np.maximum(quad - 2 * lin + np.diag(YY)[dims], 0.0)

    def tss(self, dims: Sequence[int] | None = None) -> np.ndarray:
        """Total sum of squares about the mean, (m',)."""
        _, _, YY, S = self._numpy_parts()
        dims = list(range(self.n_targets)) if dims is None else list(dims)
        if self.n_samples <= 0:
            raise ValueError("these statistics hold no samples; accumulate data first.")
        return np.diag(YY)[dims] - S[dims] ** 2 / self.n_samples

    def r2(self, coef: np.ndarray, dims: Sequence[int] | None = None) -> np.ndarray:
        """R^2_j = 1 - RSS_j / TSS_j, (m',); NaN where a target is constant (TSS = 0)."""
        rss, tss = self.rss(coef, dims), self.tss(dims)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(tss > 0, 1.0 - rss / np.where(tss > 0, tss, 1.0), np.nan)


# ------------------------------------------------------------------------------ STLSQ


def _check_hyper(threshold: float, alpha: float, max_iter: int) -> None:
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number >= 0; got {threshold!r}.")
    if not (alpha >= 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number >= 0; got {alpha!r}.")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}.")


def _solve_spd(A: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve A w = rhs for symmetric positive semi-definite A as sklearn's ridge does:
    Cholesky-based solve, falling back to the minimum-norm least-squares solution when A
    is singular."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        try:
            return scipy.linalg.solve(A, rhs, assume_a="pos")
        except np.linalg.LinAlgError:
            return np.linalg.lstsq(A, rhs, rcond=None)[0]


def _stlsq_loop(p, ridge, refit, threshold, max_iter, unbias, dim):
    """The STLSQ iteration shared by both paths, in normalized units.

    Args:
        p: number of library terms.
        ridge: S (bool mask, (p,)) -> ridge coefficients on S, (|S|,).
        refit: S -> unregularized least-squares coefficients on S, (|S|,).

    Returns:
        (p,) coefficients and the number of iterations run.
    """
    ind = np.ones(p, dtype=bool)
    prev_pattern = np.ones(p, dtype=bool)  # pattern of the dense least-squares start
    coef = np.zeros(p)
    for it in range(1, max_iter + 1):
        if not ind.any():
            coef = np.zeros(p)
            break
        c = np.zeros(p)
        c[ind] = ridge(ind)
        big = np.abs(c) >= threshold
        c[~big] = 0.0
        coef, ind = c, big
        pattern = c != 0
        if np.array_equal(pattern, prev_pattern):
            break
        prev_pattern = pattern
    else:
        warnings.warn(
            f"STLSQ did not converge after max_iter={max_iter} iterations for target "
            f"{dim}; raise max_iter.",
            ConvergenceWarning,
        )
    if unbias:
        support = np.abs(coef) > _SUPPORT_EPS
        coef = np.zeros(p)
        if support.any():
            coef[support] = refit(support)
    return coef, it


class STLSQ:
    """Sequentially thresholded (ridge) least squares, pysindy.STLSQ semantics.

    Args:
        threshold: coefficients with |w| < threshold are zeroed (in normalized units when
            normalize_columns is True).
        alpha: ridge weight in ||y - Xw||^2 + alpha ||w||^2.
        max_iter: maximum thresholding iterations.
        normalize_columns: divide library columns by their L2 norms before regressing.
        unbias: refit the final support by unregularized least squares.

    Attributes (after fit/fit_gram):
        coef_: (m, p) coefficients in the units of the unnormalized library.
        ind_: (m, p) bool support.
        n_iter_: (m,) iterations used per target.
    """

    def __init__(
        self,
        threshold: float = 0.1,
        alpha: float = 0.05,
        max_iter: int = 20,
        normalize_columns: bool = False,
        unbias: bool = True,
    ):
        _check_hyper(threshold, alpha, max_iter)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.max_iter = int(max_iter)
        self.normalize_columns = bool(normalize_columns)
        self.unbias = bool(unbias)

    def get_params(self) -> dict:
        return dict(
            threshold=self.threshold,
            alpha=self.alpha,
            max_iter=self.max_iter,
            normalize_columns=self.normalize_columns,
            unbias=self.unbias,
        )

    def with_threshold(self, threshold: float) -> "STLSQ":
        """A copy with another threshold (for sweeps)."""
        return STLSQ(**{**self.get_params(), "threshold": threshold})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"STLSQ({args})"

    def _norms(self, sq_norms: np.ndarray) -> np.ndarray:
        norms = np.sqrt(sq_norms)
        bad = np.flatnonzero(~(norms > 0))
        if bad.size:
            raise ValueError(
                f"normalize_columns=True but library column(s) {bad[:10].tolist()} are "
                "identically zero on this data (norm 0); drop those terms or use "
                "normalize_columns=False."
            )
        return norms

    def _finish(self, coefs: list, iters: list) -> "STLSQ":
        self.coef_ = np.stack(coefs)  # (m, p)
        self.ind_ = self.coef_ != 0
        self.n_iter_ = np.asarray(iters)
        return self

    def fit(self, theta: np.ndarray, targets: np.ndarray) -> "STLSQ":
        """Direct path.

        Args:
            theta: (n, p) library matrix.
            targets: (n, m) or (n,) derivatives.

        Returns:
            self, with coef_ of shape (m, p).
        """
        X = np.asarray(theta, dtype=np.float64)
        Y = _as_2d_targets(np.asarray(targets, dtype=np.float64))
        if X.ndim != 2 or X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"theta (n, p) and targets (n, m) must share n; got {X.shape} and {Y.shape}."
            )
        if not (np.isfinite(X).all() and np.isfinite(Y).all()):
            raise ValueError("theta or targets contain NaN/inf; drop or repair those samples.")
        p = X.shape[1]
        norms = self._norms(np.einsum("np,np->p", X, X)) if self.normalize_columns else None
        Xn = X / norms if norms is not None else X
        coefs, iters = [], []
        for j in range(Y.shape[1]):
            y = Y[:, j]

            def ridge(S, y=y):
                XS = Xn[:, S]
                A = XS.T @ XS
                A.flat[:: A.shape[0] + 1] += self.alpha
                return _solve_spd(A, XS.T @ y)

            def refit(S, y=y):
                return scipy.linalg.lstsq(Xn[:, S], y)[0]

            c, it = _stlsq_loop(p, ridge, refit, self.threshold, self.max_iter, self.unbias, j)
            coefs.append(c / norms if norms is not None else c)
            iters.append(it)
        return self._finish(coefs, iters)

    def fit_gram(self, stats: GramStats, dims: Sequence[int] | None = None) -> "STLSQ":
        """Gram path: STLSQ from (G, b) only.

        Args:
            stats: accumulated statistics (p terms, m targets).
            dims: which targets to fit (default all); coef_ rows follow this order.

        Returns:
            self, with coef_ of shape (len(dims), p).
        """
        G, B, _, _ = stats._numpy_parts()
        dims = list(range(stats.n_targets)) if dims is None else list(dims)
        for j in dims:
            if not 0 <= j < stats.n_targets:
                raise ValueError(f"dim {j} out of range for {stats.n_targets} targets.")
        if not (np.isfinite(G).all() and np.isfinite(B).all()):
            raise ValueError("Gram statistics contain NaN/inf; check the data for NaN/inf.")
        if self.normalize_columns:
            norms = self._norms(np.diag(G).copy())
            Gn = G / np.outer(norms, norms)
            Bn = B / norms[:, None]
        else:
            norms, Gn, Bn = None, G, B
        p = G.shape[0]
        coefs, iters = [], []
        for j in dims:
            b = Bn[:, j]

            def ridge(S, b=b):
                A = Gn[np.ix_(S, S)].copy()
                A.flat[:: A.shape[0] + 1] += self.alpha
                return _solve_spd(A, b[S])

            def refit(S, b=b):
                return _solve_spd(Gn[np.ix_(S, S)], b[S])

            c, it = _stlsq_loop(p, ridge, refit, self.threshold, self.max_iter, self.unbias, j)
            coefs.append(c / norms if norms is not None else c)
            iters.append(it)
        return self._finish(coefs, iters)


class ForwardStepwise:
    """Forward stepwise least squares (greedy; Efroymson 1960, see Hastie, Tibshirani & Friedman, "The
    Elements of Statistical Learning", 2nd ed., sec. 3.3.2) on Gram statistics: start empty, add the term
    that lowers the training RSS most, ``n_terms`` times; each support is refit by plain least squares.

    Thresholding a dense fit ranks terms by coefficient size, which in a collinear library (t^k, z_i t^k,
    tanh(p / c) t^k) says little about what a small model needs; on a trained DiT the STLSQ models with at
    most 30 terms had held-out R^2 ~ 0 where the greedy path reaches 0.3-0.7. The sweep uses both.

    Args:
        n_terms: terms to select.
        normalize_columns: rank on unit-norm columns (as STLSQ's normalisation; the fit is unchanged).

    Attributes (after fit_gram):
        coef_: (m, p) coefficients; path_: per target, the list of (p,) coefficient vectors of sizes 1..n_terms.
    """

    threshold = float("nan")  # not a thresholding method; reported as such

    def __init__(self, n_terms: int = 30, normalize_columns: bool = True):
        if int(n_terms) != n_terms or n_terms < 1:
            raise ValueError(f"n_terms must be a positive int; got {n_terms!r}.")
        self.n_terms, self.normalize_columns = int(n_terms), bool(normalize_columns)

    def path(self, G: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
        """Coefficients (p,) of the nested models of sizes 1..n_terms for one target (G (p, p), b (p,))."""
        p = G.shape[0]
        diag = np.diag(G).copy()
        usable = diag > 1e-12 * max(float(diag.max()), 1e-300)
        S: list[int] = []
        out = []
        for _ in range(min(self.n_terms, int(usable.sum()))):
            if S:
                GS = G[np.ix_(S, S)]
                w = _solve_spd(GS, b[S])
                A = _solve_spd(GS, G[S, :])  # (|S|, p) = G_SS^-1 G_S.
                num = b - G[:, S] @ w  # correlation of each column with the residual
                den = diag - np.einsum("sp,sp->p", G[S, :], A)
            else:
                num, den = b.copy(), diag.copy()
            gain = np.where(usable & (den > 1e-12 * diag), num**2 / np.where(den > 0, den, 1.0), -np.inf)
            gain[S] = -np.inf
            k = int(np.argmax(gain))
            if not np.isfinite(gain[k]) or gain[k] <= 0:
                break
            S.append(k)
            c = np.zeros(p)
            c[S] = _solve_spd(G[np.ix_(S, S)], b[S])
            out.append(c)
        return out

    def fit_gram(self, stats: GramStats, dims: Sequence[int] | None = None) -> "ForwardStepwise":
        """Fit the targets ``dims`` (default all); coef_ is the model with ``n_terms`` terms (or fewer)."""
        G, B, _, _ = stats._numpy_parts()
        dims = list(range(stats.n_targets)) if dims is None else list(dims)
        norms = np.sqrt(np.maximum(np.diag(G), 1e-300)) if self.normalize_columns else np.ones(G.shape[0])
        Gn = G / np.outer(norms, norms)
        self.path_, coefs = [], []
        for j in dims:
            path = [c / norms for c in self.path(Gn, B[:, j] / norms)]
            self.path_.append(path)
            coefs.append(path[-1] if path else np.zeros(G.shape[0]))
        self.coef_ = np.stack(coefs)
        return self


def fit_dimension(
    stats: GramStats,
    dim: int,
    threshold: float,
    alpha: float = 0.05,
    max_iter: int = 20,
    normalize_columns: bool = False,
    unbias: bool = True,
) -> np.ndarray:
    """STLSQ for one target dimension from Gram statistics.

    Args:
        stats: statistics with p terms and m targets.
        dim: the target index (0 <= dim < m).
        threshold, alpha, max_iter, normalize_columns, unbias: as in ``STLSQ``.

    Returns:
        (p,) coefficients.
    """
    opt = STLSQ(threshold, alpha, max_iter, normalize_columns, unbias)
    return opt.fit_gram(stats, dims=[dim]).coef_[0]


class SR3:
    """SR3 (Zheng et al. 2019) through ``pysindy.SR3``, on in-memory data or on Gram statistics.

    Args:
        threshold: the prox threshold in the units of STLSQ's (normalized ones with
            normalize_columns): L0 uses reg_weight_lam = threshold^2 / (2 nu)
            (``pysindy.SR3.calculate_l0_weight``), L1 reg_weight_lam = threshold / nu.
        relax_coeff_nu: nu, the relaxation between the dense and the sparse coefficients.
        regularizer: "L0" or "L1".
        max_iter, tol: pysindy's iteration limit and coefficient-change tolerance.
        normalize_columns, unbias: as in ``STLSQ``.

    The Gram path (``fit_gram``) is written here because pysindy has none: pysindy's SR3
    iteration, its least-squares start and its unbiasing refit see the data only through
    X^T X and X^T y, and ||y - X w||^2 = ||b - R w||^2 + const for any square root
    R^T R = G, R^T b = c. So pysindy's SR3 run on (R, b), p rows instead of n, is the same
    optimisation as on (X, y). R = Lambda^(1/2) V^T from G = V Lambda V^T (eigenvalues below
    a relative 1e-13 dropped; c lies in G's range, so nothing of the fit is lost).
    """

    alpha = 0.0  # no ridge term; threshold_grid scales its grid by the least-squares fit

    def __init__(
        self,
        threshold: float = 0.1,
        relax_coeff_nu: float = 1.0,
        regularizer: str = "L0",
        max_iter: int = 100,
        tol: float = 1e-8,
        normalize_columns: bool = False,
        unbias: bool = True,
    ):
        _check_hyper(threshold, 0.0, max_iter)
        if not relax_coeff_nu > 0:
            raise ValueError(f"relax_coeff_nu must be > 0; got {relax_coeff_nu!r}.")
        if regularizer not in ("L0", "L1"):
            raise ValueError(f"regularizer must be 'L0' or 'L1'; got {regularizer!r}.")
        self.threshold = float(threshold)
        self.relax_coeff_nu = float(relax_coeff_nu)
        self.regularizer = regularizer
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.normalize_columns = bool(normalize_columns)
        self.unbias = bool(unbias)

    def get_params(self) -> dict:
        return dict(threshold=self.threshold, relax_coeff_nu=self.relax_coeff_nu,
                    regularizer=self.regularizer, max_iter=self.max_iter, tol=self.tol,
                    normalize_columns=self.normalize_columns, unbias=self.unbias)

    def with_threshold(self, threshold: float) -> "SR3":
        """A copy with another threshold (for sweeps)."""
        return SR3(**{**self.get_params(), "threshold": threshold})

    def __repr__(self) -> str:
        return "SR3(" + ", ".join(f"{k}={v!r}" for k, v in self.get_params().items()) + ")"

    @property
    def reg_weight_lam(self) -> float:
        nu = self.relax_coeff_nu
        return self.threshold**2 / (2 * nu) if self.regularizer == "L0" else self.threshold / nu

    def _pysindy(self):
        import pysindy

        return pysindy.SR3(reg_weight_lam=self.reg_weight_lam, regularizer=self.regularizer,
                           relax_coeff_nu=self.relax_coeff_nu, max_iter=self.max_iter, tol=self.tol,
                           normalize_columns=self.normalize_columns, unbias=self.unbias)

    def fit(self, theta: np.ndarray, targets: np.ndarray) -> "SR3":
        """Fit on Theta (n, p) and targets (n, m) or (n,); sets coef_ (m, p)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            opt = self._pysindy().fit(np.asarray(theta, dtype=np.float64),
                                      _as_2d_targets(np.asarray(targets, dtype=np.float64)))
        self.coef_ = np.asarray(opt.coef_)
        self.ind_ = self.coef_ != 0
        return self

    def fit_gram(self, stats: GramStats, dims: Sequence[int] | None = None) -> "SR3":
        """Fit the targets ``dims`` (default all) from statistics; sets coef_ (len(dims), p)."""
        G, B, _, _ = stats._numpy_parts()
        dims = list(range(stats.n_targets)) if dims is None else list(dims)
        lam, V = np.linalg.eigh((G + G.T) / 2)
        keep = lam > 1e-13 * max(float(lam.max()), 0.0)
        if not keep.any():
            raise ValueError("the statistics are empty (Theta^T Theta = 0); nothing to fit.")
        root = np.sqrt(lam[keep])
        R = root[:, None] * V[:, keep].T  # (r, p), R^T R = G
        b = (V[:, keep].T @ B[:, dims]) / root[:, None]  # (r, m'), R^T b = c
        return self.fit(R, b)


# ------------------------------------------------------------------ threshold selection


def threshold_grid(
    stats: GramStats,
    dim: int,
    n: int = 30,
    span: float = 1e-4,
    alpha: float = 0.05,
    normalize_columns: bool = False,
) -> np.ndarray:
    """Log-spaced thresholds from span * max|w0| to max|w0|, w0 the dense ridge fit.

    w0 is in the units thresholds apply to (normalized ones if normalize_columns).

    Returns:
        (n,) increasing thresholds.
    """
    if n < 2 or not 0 < span < 1:
        raise ValueError(f"need n >= 2 and 0 < span < 1; got n={n}, span={span}.")
    G, B, _, _ = stats._numpy_parts()
    b = B[:, dim]
    if normalize_columns:
        norms = STLSQ()._norms(np.diag(G).copy())
        G, b = G / np.outer(norms, norms), b / norms
    A = G.copy()
    A.flat[:: A.shape[0] + 1] += alpha
    top = float(np.max(np.abs(_solve_spd(A, b))))
    if not top > 0:
        raise ValueError(f"target {dim} is fit by all-zero coefficients; nothing to sweep.")
    return np.logspace(np.log10(top * span), np.log10(top), n)


@dataclasses.dataclass
class ThresholdSweep:
    """Result of ``sweep_thresholds`` for one target dimension.

    Attributes:
        dim: target index.
        thresholds: (k,) swept thresholds, increasing; then NaN for the forward stepwise models (with a budget).
        n_terms: (k,) number of nonzero coefficients.
        r2_train: (k,) R^2 on the training statistics.
        r2_heldout: (k,) R^2 on the held-out statistics.
        coefs: (k, p) coefficients per threshold.
        pareto: (k,) True where no other model has <= terms and >= held-out R^2 with one
            of them strict.
        chosen: index of the chosen threshold.
        tol: relative tolerance of the selection rule (on unexplained variance).
        rule: the selection rule in words.
        unrestricted: index the rule picks without the term budget (== chosen without one).
    """

    dim: int
    thresholds: np.ndarray
    n_terms: np.ndarray
    r2_train: np.ndarray
    r2_heldout: np.ndarray
    coefs: np.ndarray
    pareto: np.ndarray
    chosen: int
    tol: float
    rule: str
    unrestricted: int = -1

    @property
    def chosen_threshold(self) -> float:
        return float(self.thresholds[self.chosen])

    @property
    def chosen_coef(self) -> np.ndarray:
        """(p,) coefficients of the chosen model."""
        return self.coefs[self.chosen]

    def table(self) -> list[dict]:
        """One JSON-able row per threshold."""
        return [
            dict(
                threshold=float(self.thresholds[i]),
                n_terms=int(self.n_terms[i]),
                r2_train=float(self.r2_train[i]),
                r2_heldout=float(self.r2_heldout[i]),
                pareto=bool(self.pareto[i]),
                chosen=i == self.chosen,
            )
            for i in range(len(self.thresholds))
        ]


def _pareto_mask(n_terms: np.ndarray, score: np.ndarray) -> np.ndarray:
    k = len(n_terms)
    mask = np.ones(k, dtype=bool)
    for i in range(k):
        dominated = (n_terms <= n_terms[i]) & (score >= score[i])
        dominated &= (n_terms < n_terms[i]) | (score > score[i])
        mask[i] = not dominated.any()
    return mask


# Unexplained variance below this is round-off (exact data), not a difference between models.
UV_FLOOR = 1e-10


def select_rule(tol: float, max_terms: int | None = None) -> str:
    """The selection rule in words (the report and equations.json quote it)."""
    budget = "" if max_terms is None else f" among the models with at most {max_terms} terms"
    return (f"the sparsest model{budget} whose held-out unexplained variance 1 - R^2 is at most "
            f"(1 + {tol:g}) x the best's{budget and ' (the best among them)'} + {UV_FLOOR:g} "
            "(ties: higher held-out R^2, then larger threshold)")


def choose_model(n_terms: np.ndarray, r2_heldout: np.ndarray, thresholds: np.ndarray, tol: float,
                 max_terms: int | None = None) -> int:
    """Index of the model the rule picks (see ``select_rule``).

    Args:
        n_terms, r2_heldout, thresholds: (k,) per swept model.
        tol: relative tolerance on the held-out unexplained variance uv = 1 - R^2: models with
            uv <= (1 + tol) uv_best + UV_FLOOR qualify. Relative to uv, not to R^2, so it is as
            strict at R^2 = 0.999 as at R^2 = 0.5; the floor stops round-off from deciding on exact data.
        max_terms: only models with at most max_terms terms compete (None: all); if none has, the
            sparsest model is taken.

    Returns:
        the chosen index.
    """
    score = np.where(np.isfinite(r2_heldout), r2_heldout, -np.inf)
    pool = np.arange(len(score))
    if max_terms is not None:
        pool = pool[n_terms <= max_terms]
        if pool.size == 0:  # nothing small enough was swept: the sparsest model there is
            return int(np.argmin(n_terms))
    uv = 1.0 - score[pool]
    best = uv.min()
    ok = pool[uv <= (1.0 + tol) * best + UV_FLOOR]
    return int(min(ok, key=lambda i: (n_terms[i], -score[i], -np.nan_to_num(thresholds[i], nan=-np.inf))))


def sweep_thresholds(
    train: GramStats,
    heldout: GramStats,
    dim: int,
    optimizer: STLSQ | None = None,
    thresholds: Sequence[float] | None = None,
    n_thresholds: int = 30,
    tol: float = 0.05,
    max_terms: int | None = None,
    span: float = 1e-4,
) -> ThresholdSweep:
    """Sweep STLSQ thresholds for one dimension and choose one by ``choose_model``.

    Args:
        train: training statistics (split by trajectory from ``heldout`` by the caller).
        heldout: held-out statistics with the same library and targets.
        dim: target index.
        optimizer: STLSQ template (alpha, normalize_columns, ...); its threshold is
            replaced by each swept value. Default STLSQ().
        thresholds: explicit grid; default ``threshold_grid(train, dim, n_thresholds, span)``.
        n_thresholds: size of the default grid.
        tol: relative tolerance on the held-out unexplained variance (``choose_model``).
        max_terms: term budget of the chosen model (None: no budget). With a budget, the models of the
            forward stepwise path (``ForwardStepwise``) of 1..max_terms terms join the pool (threshold NaN).
        span: the default grid runs from span * max|w0| to max|w0|.

    Returns:
        ThresholdSweep.
    """
    if tol < 0:
        raise ValueError(f"tol must be >= 0; got {tol}.")
    opt = optimizer or STLSQ()
    if thresholds is None:
        thresholds = threshold_grid(
            train, dim, n_thresholds, span=span, alpha=opt.alpha, normalize_columns=opt.normalize_columns
        )
    thr = np.sort(np.asarray(thresholds, dtype=np.float64))
    coefs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for th in thr:
            coefs.append(opt.with_threshold(float(th)).fit_gram(train, dims=[dim]).coef_[0])
    if max_terms is not None:  # the greedy path's models of 1..max_terms terms compete too (threshold NaN)
        path = ForwardStepwise(max_terms, opt.normalize_columns).fit_gram(train, dims=[dim]).path_[0]
        coefs += path
        thr = np.concatenate([thr, np.full(len(path), np.nan)])
    coefs = np.stack(coefs)  # (k, p)
    n_terms = np.count_nonzero(coefs, axis=1)
    r2_tr = train.r2(coefs, dims=[dim] * len(thr))
    r2_ho = heldout.r2(coefs, dims=[dim] * len(thr))
    if not np.isfinite(r2_ho).any():
        raise ValueError(
            f"held-out R^2 is undefined for target {dim} (constant target in held-out data)."
        )
    score = np.where(np.isfinite(r2_ho), r2_ho, -np.inf)
    chosen = choose_model(n_terms, r2_ho, thr, tol, max_terms)
    return ThresholdSweep(
        dim=dim,
        thresholds=thr,
        n_terms=n_terms,
        r2_train=r2_tr,
        r2_heldout=r2_ho,
        coefs=coefs,
        pareto=_pareto_mask(n_terms, score),
        chosen=chosen,
        tol=tol,
        rule=select_rule(tol, max_terms),
        unrestricted=choose_model(n_terms, r2_ho, thr, tol, None),
    )


def sweep_with_gate(train: GramStats, heldout: GramStats, dim: int, optimizer, gated: Sequence[int],
                    gate: float = 0.5, **kw) -> tuple[ThresholdSweep, dict | None]:
    """``sweep_thresholds`` with optional families that must earn their place on held-out data.

    The sweep runs with and without the columns ``gated``; they are kept only if the best held-out
    unexplained variance with them is at most ``gate`` times the best without them. Why: a family that
    is a cheap proxy for many true terms (tanh(u.z / c) t^k stands in for a sum of z_j t^k) makes the
    sparsest good model a wrong one (measured on DDIM of Gaussian data, where the drift is exactly linear
    in z), while a family the dynamics need (the tanh of a two-mode mixture) removes most of the error.

    Args:
        train, heldout, dim, optimizer, **kw: as ``sweep_thresholds``.
        gated: column indices of the optional families (empty: a plain sweep).
        gate: the factor on unexplained variance (0.5: the family must remove half of it).

    Returns:
        (the sweep whose coefficients are over all p columns, zeros in the gated ones when they were
        dropped; {"kept", "uv_with", "uv_without", "gate", "keep": columns fitted} or None without gating).
    """
    sw = sweep_thresholds(train, heldout, dim, optimizer, **kw)
    gated = np.unique(np.asarray(list(gated), dtype=np.int64))
    if gated.size == 0:
        return sw, None
    keep = np.setdiff1d(np.arange(train.n_terms), gated)
    sub = sweep_thresholds(train.subset(keep), heldout.subset(keep), dim, optimizer, **kw)
    uv_with, uv_without = 1.0 - float(np.nanmax(sw.r2_heldout)), 1.0 - float(np.nanmax(sub.r2_heldout))
    kept = uv_with <= gate * uv_without
    info = {"kept": bool(kept), "uv_with": uv_with, "uv_without": uv_without, "gate": gate,
            "keep": None if kept else keep.tolist()}
    if kept:
        return sw, info
    full = np.zeros((len(sub.coefs), train.n_terms))
    full[:, keep] = sub.coefs
    sub.coefs = full
    return sub, info


# ------------------------------------------------------------------ free-time reference fit


def stepwise_stats(z: np.ndarray, y: np.ndarray, degree: int) -> list[dict]:
    """Per-step statistics of a time-free polynomial library, for ``free_time_r2``.

    Args:
        z: (T, b, d) states of b trajectories at T sampler steps.
        y: (T, b, m) targets.
        degree: polynomial degree (with the constant).

    Returns:
        T ``GramStats.to_numpy()`` dicts, one per step.
    """
    from analysis.library import Polynomial

    T, b, d = z.shape
    theta = Polynomial(degree=degree).transform(z.reshape(T * b, d)).reshape(T, b, -1)
    return [GramStats.from_arrays(theta[k], y[k], device="cpu").to_numpy() for k in range(T)]


def free_time_r2(train_steps: Sequence[GramStats], heldout_steps: Sequence[GramStats],
                 ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """R^2 of a separate ridge fit per sampler step (any time dependence), pooled over steps.

    The global library can only change its coefficients with t through its time terms; this
    reference fit lets every step have its own polynomial in z. Where it also stays far from 1
    on held-out trajectories, the state dependence is what limits the equations.

    Args:
        train_steps, heldout_steps: per-step statistics (same library, same steps).
        ridge: weight relative to the mean diagonal of each step's Gram matrix.

    Returns:
        (r2_train, r2_heldout), each (m,), pooled: 1 - sum_k RSS_k / TSS of all rows.
    """
    if len(train_steps) != len(heldout_steps) or not train_steps:
        raise ValueError(f"need the same steps for both splits; got {len(train_steps)} and {len(heldout_steps)}.")
    rss_tr = rss_ho = 0.0
    for tr, ho in zip(train_steps, heldout_steps):
        G, B, _, _ = tr._numpy_parts()
        lam = ridge * float(np.mean(np.diag(G)))
        W = _solve_spd(G + lam * np.eye(G.shape[0]), B).T  # (m, q)
        rss_tr = rss_tr + tr.rss(W)
        rss_ho = rss_ho + ho.rss(W)
    tss_tr = functools.reduce(GramStats.merge, train_steps).tss()
    tss_ho = functools.reduce(GramStats.merge, heldout_steps).tss()
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - rss_tr / tss_tr, 1.0 - rss_ho / tss_ho


# ----------------------------------------------------------------------------- bagging


@dataclasses.dataclass
class BaggingResult:
    """Bootstrap ensemble of STLSQ fits.

    Attributes:
        coefs: (B, m', p) coefficients of each bootstrap model (rows follow ``dims``).
        inclusion_probability: (m', p) fraction of models in which a term is nonzero.
        coef_mean: (m', p) mean over all B models (excluded terms count as 0).
        coef_std: (m', p) standard deviation over all B models.
        dims: target indices.
        resample: "group" or "sample".
        seed: the RNG seed.
    """

    coefs: np.ndarray
    inclusion_probability: np.ndarray
    coef_mean: np.ndarray
    coef_std: np.ndarray
    dims: list
    resample: str
    seed: int


def _summarize(coefs: list, dims: list, resample: str, seed: int) -> BaggingResult:
    c = np.stack(coefs)  # (B, m', p)
    return BaggingResult(
        coefs=c,
        inclusion_probability=(c != 0).mean(axis=0),
        coef_mean=c.mean(axis=0),
        coef_std=c.std(axis=0),
        dims=dims,
        resample=resample,
        seed=seed,
    )


def group_stats(
    theta: Any,
    targets: Any,
    groups: Any,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, list[GramStats]]:
    """Per-group statistics (e.g. one per trajectory).

    Args:
        theta: (n, p) library matrix.
        targets: (n, m) or (n,).
        groups: (n,) group id per sample.

    Returns:
        (sorted unique group ids (g,), list of g GramStats).
    """
    groups = np.asarray(groups)
    if groups.shape != (theta.shape[0],):
        raise ValueError(
            f"groups must have shape ({theta.shape[0]},), one id per sample; got {groups.shape}."
        )
    targets = _as_2d_targets(targets)
    ids = np.unique(groups)
    out = []
    for g in ids:
        rows = np.flatnonzero(groups == g)
        out.append(GramStats.from_arrays(theta[rows], targets[rows], device=device))
    return ids, out


def bagging_gram(
    stats_per_group: Sequence[GramStats],
    optimizer: STLSQ,
    n_bootstrap: int = 50,
    seed: int = 0,
    dims: Sequence[int] | None = None,
) -> BaggingResult:
    """Bootstrap over groups from per-group statistics: G_boot = sum_g c_g G_g.

    Args:
        stats_per_group: one GramStats per group (trajectory), all of the same shape.
        optimizer: the STLSQ to run on every resample.
        n_bootstrap: number of resamples B.
        seed: RNG seed (numpy default_rng); same seed, same result.
        dims: targets to fit (default all).

    Returns:
        BaggingResult with resample="group".
    """
    n_groups = len(stats_per_group)
    if n_groups < 2 or n_bootstrap < 1:
        raise ValueError(
            f"need >= 2 groups and n_bootstrap >= 1; got {n_groups} groups, "
            f"n_bootstrap={n_bootstrap}."
        )
    dims = list(range(stats_per_group[0].n_targets)) if dims is None else list(dims)
    rng = np.random.default_rng(seed)
    coefs = []
    for _ in range(n_bootstrap):
        counts = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        boot = GramStats.weighted_sum(stats_per_group, counts.tolist())
        coefs.append(optimizer.fit_gram(boot, dims=dims).coef_)
    return _summarize(coefs, dims, "group", seed)


def bagging(
    theta: Any,
    targets: Any,
    optimizer: STLSQ,
    groups: Any | None = None,
    n_bootstrap: int = 50,
    seed: int = 0,
    dims: Sequence[int] | None = None,
    device: str | torch.device | None = None,
) -> BaggingResult:
    """Bootstrap STLSQ ensemble from in-memory Theta.

    Args:
        theta: (n, p) library matrix.
        targets: (n, m) or (n,).
        optimizer: the STLSQ to run on every resample.
        groups: optional (n,) trajectory ids; resample whole groups when given (samples
            of one trajectory are correlated), else resample samples.
        n_bootstrap: number of resamples B.
        seed: RNG seed.
        dims: targets to fit (default all).
        device: where the weighted Gram matrices are computed.

    Returns:
        BaggingResult.
    """
    if groups is not None:
        _, per_group = group_stats(theta, targets, groups, device=device)
        return bagging_gram(per_group, optimizer, n_bootstrap, seed, dims)
    targets = _as_2d_targets(targets)
    n = theta.shape[0]
    dims = list(range(targets.shape[1])) if dims is None else list(dims)
    dev = resolve_device(device)
    th, y = _to_device(theta, dev), _to_device(targets, dev)
    rng = np.random.default_rng(seed)
    coefs = []
    for _ in range(n_bootstrap):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        boot = GramStats.zeros(th.shape[1], y.shape[1], dev).update(th, y, weights=counts)
        coefs.append(optimizer.fit_gram(boot, dims=dims).coef_)
    return _summarize(coefs, dims, "sample", seed)


# ----------------------------------------------------------------------------- metrics


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column: (n, m) x (n, m) -> (m,); NaN if constant."""
    yt = _as_2d_targets(np.asarray(y_true, dtype=np.float64))
    yp = _as_2d_targets(np.asarray(y_pred, dtype=np.float64))
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} must have the same shape.")
    rss = ((yt - yp) ** 2).sum(axis=0)
    tss = ((yt - yt.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tss > 0, 1.0 - rss / np.where(tss > 0, tss, 1.0), np.nan)


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Root mean squared error per column: (n, m) x (n, m) -> (m,)."""
    yt = _as_2d_targets(np.asarray(y_true, dtype=np.float64))
    yp = _as_2d_targets(np.asarray(y_pred, dtype=np.float64))
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} must have the same shape.")
    return np.sqrt(((yt - yp) ** 2).mean(axis=0))
