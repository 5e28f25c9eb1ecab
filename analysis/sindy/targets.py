"""Regression samples (z, t, dz/dt) from recorded trajectories: the sampler's drift or central differences.

References:
    S. L. Brunton, J. L. Proctor, J. N. Kutz, PNAS 113(15):3932, 2016 (SINDy needs the state
    derivative; finite differences are its usual estimate). The reference study
    (docs/REFERENCES.md, the SINDy study, phase 3) uses
    z' ~ (z_{k+1} - z_{k-1}) / (2 dt) on DDPM trajectories.

Why the drift is the default target: along a stochastic DDPM trajectory
z[k+1] = z[k] - dt * drift[k] + sigma_k n_k, so the difference quotient carries the injected
noise divided by dt (sigma_k / dt >> |drift| for most steps): a regression on it mostly fits
noise, which shows up as a poor held-out R^2. The sampler's mean step, drift = dz/dt of its
deterministic update (models/diffusion.py), is the velocity the network actually defines. For
deterministic samplers (DDIM eta = 0, probability-flow ODE) the two only differ by the
finite-difference error.

Convention (as models/diffusion.py): states k = 0..T at t_k = 1 - k/T, velocities dz/dt in
increasing t. The regression samples are the states k = 0..T-1 (those the network was evaluated
at; drift[k] belongs to state k). The final sample z_0 (t = 0) enters only through differences.
"""

from __future__ import annotations

import numpy as np

TARGETS = ("drift", "central_diff", "eps")


def time_windows(t: np.ndarray, n: int) -> list[float]:
    """The job's one definition of windows of t: n equal windows of the data's t range, as n + 1 increasing
    edges. The fit's held-out R^2 per window, the eps/drift view and the mixture view all use it."""
    return np.linspace(float(np.min(t)), float(np.max(t)), n + 1).tolist()


def window_index(t: np.ndarray, edges: list[float] | np.ndarray) -> np.ndarray:
    """Window w of each time, edges[w] <= t < edges[w + 1] (the last window closed).

    A time within 1e-9 of the span below an edge counts as on it: the grid t = 1 - k/T lands a hair below
    the edge k/T in float64 (1 - 40/50 = 0.19999999999999996), and a grid point on an edge opens its window.
    """
    e = np.asarray(edges, dtype=np.float64)
    tol = 1e-9 * max(float(e[-1] - e[0]), 1e-300)
    return np.clip(np.searchsorted(e, np.asarray(t, dtype=np.float64) + tol, side="right") - 1, 0, len(e) - 2)


def central_diff(z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """dz/dt by central differences, one-sided at both ends.

    Args:
        z: (T+1, ...) states in the order of ``t``.
        t: (T+1,) their times (any monotone order; with t descending the quotient still
            estimates dz/dt in increasing t, because both differences change sign).

    Returns:
        (T+1, ...) float64: (z[k+1] - z[k-1]) / (t[k+1] - t[k-1]) inside, forward/backward
        differences at k = 0 and k = T.
    """
    z = np.asarray(z, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    if z.shape[0] != t.shape[0] or t.shape[0] < 3:
        raise ValueError(f"need (T+1 >= 3, ...) states and (T+1,) times; got {z.shape} and {t.shape}")
    shape = (-1,) + (1,) * (z.ndim - 1)
    out = np.empty_like(z)
    out[1:-1] = (z[2:] - z[:-2]) / (t[2:] - t[:-2]).reshape(shape)
    out[0] = (z[1] - z[0]) / (t[1] - t[0])
    out[-1] = (z[-1] - z[-2]) / (t[-1] - t[-2])
    return out


def regression_samples(
    z: np.ndarray, t: np.ndarray, drift: np.ndarray | None, targets: tuple[str, ...], eps: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten a block of trajectories into regression rows.

    Args:
        z: (T+1, b, d) states in fit coordinates, z_T first.
        t: (T+1,) times 1 -> 0.
        drift: (T, b, d) drift in fit coordinates, or None.
        targets: which velocity estimates to stack as targets, e.g. ("drift", "central_diff"); "eps" is the
            DiT's own output (the drift's unknown part, analysis/sindy/theory.py: drift = p z + q eps).
        eps: (T, b, d) the DiT's eps in fit coordinates, or None.

    Returns:
        zs (T*b, d), ts (T*b,), ys (T*b, len(targets)*d), rows ordered step-major
        (all trajectories at k = 0, then k = 1, ...).

    Raises:
        ValueError: "drift" asked for without drift data.
    """
    T1, b, d = z.shape
    cols = []
    for name in targets:
        if name == "drift":
            if drift is None:
                raise ValueError("target 'drift' needs the sampler's drift, which these trajectories do not have")
            cols.append(np.asarray(drift, dtype=np.float64))
        elif name == "central_diff":
            cols.append(central_diff(z, t)[:-1])
        elif name == "eps":
            if eps is None:
                raise ValueError("target 'eps' needs the DiT's recorded eps, which these trajectories do not have")
            cols.append(np.asarray(eps, dtype=np.float64))
        else:
            raise ValueError(f"unknown target {name!r}; choose from {TARGETS}")
    zs = np.asarray(z[:-1], dtype=np.float64).reshape(-1, d)
    ts = np.repeat(np.asarray(t[:-1], dtype=np.float64), b)
    ys = np.concatenate([c.reshape(-1, d) for c in cols], axis=1)
    return zs, ts, ys
