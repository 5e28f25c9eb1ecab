"""Fit metrics: R^2 and RMSE per column, and the free-time reference fit (how far a time-free polynomial in z,
refitted at every sampler step, gets: the ceiling the state dependence allows)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from analysis.sindy.families import Polynomial
from analysis.sindy.gram import GramStats, as_2d_targets, solve_spd

__all__ = ["r2_score", "rmse", "stepwise_stats", "free_time_r2"]


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per column: (n, m) x (n, m) -> (m,); NaN if constant."""
    yt = as_2d_targets(np.asarray(y_true, dtype=np.float64))
    yp = as_2d_targets(np.asarray(y_pred, dtype=np.float64))
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} must have the same shape.")
    rss = ((yt - yp) ** 2).sum(axis=0)
    tss = ((yt - yt.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tss > 0, 1.0 - rss / np.where(tss > 0, tss, 1.0), np.nan)


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Root mean squared error per column: (n, m) x (n, m) -> (m,)."""
    yt = as_2d_targets(np.asarray(y_true, dtype=np.float64))
    yp = as_2d_targets(np.asarray(y_pred, dtype=np.float64))
    if yt.shape != yp.shape:
        raise ValueError(f"y_true {yt.shape} and y_pred {yp.shape} must have the same shape.")
    return np.sqrt(((yt - yp) ** 2).mean(axis=0))


def stepwise_stats(z: np.ndarray, y: np.ndarray, degree: int) -> list[dict]:
    """Per-step statistics of a time-free polynomial library, for ``free_time_r2``.

    Args:
        z: (T, b, d) states of b trajectories at T sampler steps.
        y: (T, b, m) targets.
        degree: polynomial degree (with the constant).

    Returns:
        T ``GramStats.to_numpy()`` dicts, one per step.
    """

    T, b, d = z.shape
    theta = Polynomial(degree=degree).transform(z.reshape(T * b, d)).reshape(T, b, -1)
    return [GramStats.from_arrays(theta[k], y[k], device="cpu").to_numpy() for k in range(T)]


def free_time_r2(
    train_steps: Sequence[GramStats], heldout_steps: Sequence[GramStats], ridge: float = 1e-3
) -> tuple[np.ndarray, np.ndarray]:
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
        G, B, _, _ = tr.numpy_parts()
        lam = ridge * float(np.mean(np.diag(G)))
        W = solve_spd(G + lam * np.eye(G.shape[0]), B).T  # (m, q)
        rss_tr = rss_tr + tr.rss(W)
        rss_ho = rss_ho + ho.rss(W)
    tss_tr = functools.reduce(GramStats.merge, train_steps).tss()
    tss_ho = functools.reduce(GramStats.merge, heldout_steps).tss()
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - rss_tr / tss_tr, 1.0 - rss_ho / tss_ho
