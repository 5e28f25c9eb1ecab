"""Targets and integration conventions without Ray: central differences on a known ODE, and the
fit + Euler rollout of analysis/sindy/integration.py recover dz/dt = -z (t from 1 to 0, dt = 1/T)."""

from __future__ import annotations

import numpy as np

from analysis.sindy.gram import GramStats
from analysis.sindy.integration import integrate, sindy_rhs
from analysis.sindy.library import Library
from analysis.sindy.optimizers import STLSQ
from analysis.sindy.targets import central_diff, regression_samples


def test_central_diff_sign_and_ends():
    T = 50
    t = 1 - np.arange(T + 1) / T  # descending, as recorded
    z = np.exp(-t)[:, None, None] * np.ones((1, 2, 3))  # dz/dt = -z
    v = central_diff(z, t)
    np.testing.assert_allclose(v[1:-1], -z[1:-1], rtol=2e-4)
    np.testing.assert_allclose(v[[0, -1]], -z[[0, -1]], rtol=2e-2)  # one-sided: first order


def test_fit_and_rollout_recover_linear_decay():
    T, d, n = 50, 3, 20
    t = 1 - np.arange(T + 1) / T
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((n, d))
    rate = np.array([1.0, -0.5, 2.0])
    z = z0[None] * np.exp(rate * (t - 1)[:, None, None])
    drift = rate * z[:-1]
    zs, ts, ys = regression_samples(z, t, drift, ("drift",))
    lib = Library.reference(d)
    stats = GramStats.from_library(lib, [(zs, ts, ys)], device="cpu")
    xi = STLSQ(threshold=0.05, alpha=1e-6, normalize_columns=True).fit_gram(stats).coef_
    names = lib.get_feature_names()
    for j in range(d):
        assert [names[k] for k in np.flatnonzero(xi[j])] == [f"z{j}"]
        np.testing.assert_allclose(xi[j, names.index(f"z{j}")], rate[j], rtol=1e-6)
    sim, diverged = integrate(sindy_rhs(lib, xi), z[0], t, "rk4")
    assert (diverged < 0).all()
    np.testing.assert_allclose(sim, z, rtol=1e-6, atol=1e-8)
