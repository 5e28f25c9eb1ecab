"""Polishing through the integrator recovers a linear system's coefficients from a perturbed start."""

from __future__ import annotations

import numpy as np

from analysis.sindy.integration import integrate
from analysis.sindy.polish import polish_coefficients


def test_polish_recovers_the_true_coefficients_on_their_support():
    rng = np.random.default_rng(0)
    d, T = 3, 40
    A = np.array([[-1.0, 0.5, 0.0], [0.0, -2.0, 0.3], [0.2, 0.0, -0.5]])

    def rhs_of(xi):
        return lambda z, t: z @ xi.T

    t = np.arange(T, -1, -1) / T
    ref, _ = integrate(rhs_of(A), rng.standard_normal((30, d)), t, "euler")
    start = A + 0.1 * rng.standard_normal(A.shape) * (A != 0)
    new, rec = polish_coefficients(rhs_of, start, ref, t, iterations=4)
    assert np.all(new[A == 0] == 0)  # the support stays
    assert np.abs(new - A).max() < 1e-4 < np.abs(start - A).max()
    assert rec["rmse_after"] < 1e-3 * rec["rmse_before"] and rec["nonzeros"] == int((A != 0).sum())
    assert rec["checkpoints"][-1] == T
