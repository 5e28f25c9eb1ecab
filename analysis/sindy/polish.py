"""Polish the chosen coefficients through the integrator: the support fixed, the rollouts matched (issue 22).

The regression fits each step's target at the DiT's own states; the equations are then used by integrating them
from noise, where small per-step errors compound. Polishing takes the chosen equations as they are (the same
terms, so nothing new to read) and moves their nonzero coefficients so that Euler rollouts on the sampler's grid
from training noises pass through the DiT's own trajectories at a few checkpoints (the end state among them):
a damped Gauss-Newton (Levenberg-Marquardt) least-squares problem in the nonzero coefficients.

Why by hand: the Jacobian of the rollout with respect to the coefficients comes from finite differences, because
the library's families (the mixture's closed form among them) are numpy functions without derivatives; scipy's
least_squares would do the same differences but cannot share one rollout per column across its trust-region
steps the way this loop keeps the cost at (nonzeros + 1) rollouts per iteration. References: K. Levenberg, Q.
Appl. Math. 2:164, 1944; D. Marquardt, SIAM J. Appl. Math. 11:431, 1963.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from analysis.sindy.integration import integrate

__all__ = ["polish_coefficients"]


def _residual(rhs_of: Callable, xi: np.ndarray, ref: np.ndarray, t: np.ndarray, checkpoints: np.ndarray) -> np.ndarray:
    sim, diverged = integrate(rhs_of(xi), ref[0], t, "euler")
    r = (sim[checkpoints] - ref[checkpoints]).ravel()
    return np.where(np.isfinite(r), r, 1e3)  # a diverged rollout is a large residual, not a NaN


def polish_coefficients(
    rhs_of: Callable[[np.ndarray], Callable],
    xi: np.ndarray,
    ref: np.ndarray,
    t: np.ndarray,
    iterations: int = 3,
    n_checkpoints: int = 5,
    step: float = 1e-4,
) -> tuple[np.ndarray, dict]:
    """Levenberg-Marquardt on the nonzero entries of ``xi`` so that rollouts match ``ref`` at checkpoints.

    Args:
        rhs_of: xi (d, p) -> f(z (b, d), t float) -> dz/dt (b, d), the right-hand side the job integrates.
        xi: (d, p) the chosen coefficients; its zeros stay zero.
        ref: (T+1, n, d) the DiT's trajectories (training ones) in fit coordinates, initial noise first.
        t: (T+1,) descending grid.
        iterations: Gauss-Newton steps (each costs nonzeros + 2 rollouts).
        n_checkpoints: states compared, evenly spaced, the end state always among them.
        step: relative finite-difference step of a coefficient.

    Returns:
        (xi polished, {"rmse_before", "rmse_after", "iterations": [{"rmse", "damping"}], "nonzeros"}): the RMS over
        the checkpoints of the rollouts' distance to ``ref``; a step that does not lower it is not taken.
    """
    T = len(t) - 1
    checkpoints = np.unique(np.linspace(T / n_checkpoints, T, n_checkpoints).round().astype(int))
    support = np.flatnonzero(xi.ravel())
    x = xi.ravel().copy()
    r = _residual(rhs_of, x.reshape(xi.shape), ref, t, checkpoints)
    rmse0, lam, hist = float(np.sqrt(np.mean(r**2))), 1e-3, []
    for _ in range(iterations):
        J = np.empty((r.size, support.size))
        for c, j in enumerate(support):
            h = step * max(abs(x[j]), 1e-3)
            xp = x.copy()
            xp[j] += h
            J[:, c] = (_residual(rhs_of, xp.reshape(xi.shape), ref, t, checkpoints) - r) / h
        JtJ, Jtr = J.T @ J, J.T @ r
        scale = np.diag(JtJ).copy() + 1e-12
        for _try in range(6):  # raise the damping until the step lowers the residual
            delta = np.linalg.solve(JtJ + lam * np.diag(scale), -Jtr)
            xn = x.copy()
            xn[support] += delta
            rn = _residual(rhs_of, xn.reshape(xi.shape), ref, t, checkpoints)
            if np.sum(rn**2) < np.sum(r**2):
                x, r, lam = xn, rn, lam / 3
                break
            lam *= 10
        hist.append({"rmse": float(np.sqrt(np.mean(r**2))), "damping": lam})
    return x.reshape(xi.shape), {
        "rmse_before": rmse0,
        "rmse_after": float(np.sqrt(np.mean(r**2))),
        "iterations": hist,
        "nonzeros": int(support.size),
        "checkpoints": checkpoints.tolist(),
    }
