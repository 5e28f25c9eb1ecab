"""Validation by integration: the discovered system dz/dt = Xi Theta(z, t) integrated along the sampler's grid.

References:
    S. L. Brunton, J. L. Proctor, J. N. Kutz, PNAS 113(15):3932, 2016 (a SINDy model is judged by
    simulating it, not only by its regression fit).

From the held-out trajectories' initial noise z(t=1) down to t = 0 on the sampler's grid t_k = 1 - k/T
(explicit Euler z[k+1] = z[k] - dt f(z[k], t_k), which is exactly how the drift target was defined, or
classical RK4 with step -dt); the report compares the result with the DiT's own trajectories from the
same noise, step by step.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DIVERGED", "sindy_rhs", "integrate"]

DIVERGED = 1e4  # |z| beyond this counts as a blown-up rollout (normalised latents are O(1))


def sindy_rhs(library, xi: np.ndarray):
    """f(z (b, d), t float) -> (b, d) = Theta(z, t) Xi^T, with Xi (d, p)."""

    def f(z: np.ndarray, t: float) -> np.ndarray:
        return library.transform(z, float(t)) @ xi.T

    return f


def integrate(f, z0: np.ndarray, t: np.ndarray, method: str = "euler") -> tuple[np.ndarray, np.ndarray]:
    """Integrate dz/dt = f(z, t) backwards along the grid ``t`` (1 -> 0).

    Args:
        f: right-hand side, (b, d), float -> (b, d).
        z0: (b, d) states at t[0].
        t: (T+1,) descending grid.
        method: "euler" | "rk4".

    Returns:
        z (T+1, b, d) (NaN after a trajectory blows up) and diverged_at (b,) step index or -1.
    """
    T = len(t) - 1
    out = np.full((T + 1, *z0.shape), np.nan)
    out[0] = z0
    diverged = np.full(z0.shape[0], -1)
    z = np.asarray(z0, dtype=np.float64).copy()
    alive = np.ones(z0.shape[0], dtype=bool)
    for k in range(T):
        h = t[k + 1] - t[k]  # negative: integrating towards t = 0
        with np.errstate(all="ignore"):
            za = z[alive]
            if method == "euler":
                zn = za + h * f(za, t[k])
            else:
                k1 = f(za, t[k])
                k2 = f(za + 0.5 * h * k1, t[k] + 0.5 * h)
                k3 = f(za + 0.5 * h * k2, t[k] + 0.5 * h)
                k4 = f(za + h * k3, t[k + 1])
                zn = za + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        bad = ~np.all(np.isfinite(zn) & (np.abs(zn) < DIVERGED), axis=1)
        idx = np.flatnonzero(alive)
        diverged[idx[bad]] = k + 1
        z[idx] = np.where(bad[:, None], np.nan, zn)
        alive[idx[bad]] = False
        out[k + 1, alive] = z[alive]
        if not alive.any():
            break
    return out, diverged
