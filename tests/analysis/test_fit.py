"""Tests for the SINDy fit: analysis/sindy/gram.py, analysis/sindy/optimizers.py, analysis/sindy/selection.py, analysis/sindy/metrics.py.

(a) the Gram path reproduces pysindy.STLSQ to 1e-8;
(b) known sparse dynamics are recovered exactly in support; coefficients to 1e-6
    relative with exact derivatives, to 1e-2 relative with second-order finite differences;
(c) the threshold sweep picks the planted sparsity;
(d) bagging inclusion probabilities separate true terms from noise terms.
"""

from __future__ import annotations

import warnings

import numpy as np
import pysindy
import pytest
import torch
from scipy.integrate import solve_ivp

from analysis.sindy.families import Polynomial
from analysis.sindy.gram import GramStats
from analysis.sindy.library import Library
from analysis.sindy.metrics import r2_score, rmse
from analysis.sindy.optimizers import SR3, STLSQ
from analysis.sindy.selection import bagging_gram, sweep_thresholds


def pysindy_stlsq(theta, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pysindy.STLSQ(**kw).fit(theta, y).coef_


def planted(d=3, n=2000, noise=0.01, seed=0, n_groups=None):
    """Reference library on random states with a sparse planted model, (n, p), (n, d)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    t = rng.uniform(size=n)
    lib = Library.reference(d)
    theta = lib.transform(z, t)
    names = lib.get_feature_names()
    W = np.zeros((lib.n_terms, d))
    W[names.index("z0"), 0] = -1.0
    W[names.index("z1 t"), 0] = 2.0
    W[names.index("z0 z2"), 1] = 0.5
    W[names.index("z1^3"), 1] = -0.8
    W[names.index("exp(-t z2)"), 2] = 1.2
    W[names.index("1"), 2] = 0.7
    Y = theta @ W + noise * rng.normal(size=(n, d))
    groups = None if n_groups is None else np.repeat(np.arange(n_groups), n // n_groups)
    return theta, Y, W, names, groups


def group_stats(theta, Y, groups):
    """One GramStats per group id, in sorted id order (the job accumulates one per bootstrap group)."""
    return [GramStats.from_arrays(theta[groups == g], Y[groups == g], device="cpu") for g in np.unique(groups)]


# --------------------------------------------------------------- (a) equivalence with pysindy

CASES = [(False, a, th) for a in (0.0, 0.05, 1.0) for th in (0.01, 0.1, 0.3)] + [
    (True, a, th) for a in (0.0, 0.05, 1.0) for th in (0.5, 5.0, 10.0)
]


@pytest.fixture(scope="module")
def planted_stats():
    theta, Y, W, names, _ = planted()
    return theta, Y, GramStats.from_arrays(theta, Y, chunk_size=300, device="cpu")


@pytest.mark.parametrize("normalize,alpha,threshold", CASES)
def test_gram_path_matches_pysindy(planted_stats, normalize, alpha, threshold):
    theta, Y, stats = planted_stats
    kw = dict(threshold=threshold, alpha=alpha, normalize_columns=normalize)
    ref = pysindy_stlsq(theta, Y, **kw)
    gram = STLSQ(**kw).fit_gram(stats).coef_
    np.testing.assert_array_equal(gram != 0, ref != 0)
    np.testing.assert_allclose(gram, ref, atol=1e-8, rtol=0)
    # one dimension at a time, as the job's fit tasks do
    np.testing.assert_allclose(STLSQ(**kw).fit_gram(stats, dims=[1]).coef_[0], ref[1], atol=1e-8, rtol=0)


@pytest.mark.parametrize("unbias", [True, False])
def test_unbias_and_max_iter_match_pysindy(planted_stats, unbias):
    theta, Y, stats = planted_stats
    kw = dict(threshold=0.05, alpha=5.0, unbias=unbias, max_iter=2)
    ref = pysindy_stlsq(theta, Y, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = STLSQ(**kw).fit_gram(stats).coef_
    np.testing.assert_allclose(ours, ref, atol=1e-8, rtol=0)


def test_all_terms_thresholded_gives_zeros(planted_stats):
    theta, Y, stats = planted_stats
    ref = pysindy_stlsq(theta, Y, threshold=100.0)
    assert not ref.any() and not STLSQ(threshold=100.0).fit_gram(stats).coef_.any()


# ------------------------------------------------------------------------ Gram statistics


def _same_sums(actual, desired):
    """Equal to float64 rounding of sums in another order: entries that nearly cancel (|x| << the terms summed)
    keep an absolute error of about eps x the largest entry, whatever the thread count and chunking."""
    np.testing.assert_allclose(actual, desired, rtol=1e-12, atol=1e-12 * np.abs(desired).max())


def test_gram_stats_chunking_merge_and_roundtrip(planted_stats):
    theta, Y, stats = planted_stats
    _same_sums(stats.gram.numpy(), theta.T @ theta)
    _same_sums(stats.cross.numpy(), theta.T @ Y)
    half = len(Y) // 2
    a = GramStats.from_arrays(theta[:half], Y[:half])
    b = GramStats.from_arrays(torch.tensor(theta[half:]), torch.tensor(Y[half:]))
    merged = a.merge(b)
    assert merged.n_samples == stats.n_samples == len(Y)
    for key, value in merged.to_numpy().items():
        _same_sums(value, stats.to_numpy()[key])
    back = GramStats.from_numpy(stats.to_numpy())
    np.testing.assert_array_equal(back.gram.numpy(), stats.gram.numpy())
    with pytest.raises(ValueError, match="cannot merge"):
        stats.merge(GramStats.zeros(3, 3, "cpu"))


def test_gram_stats_from_library_streams_batches():
    rng = np.random.default_rng(3)
    z, t, zdot = rng.normal(size=(500, 3)), rng.uniform(size=500), rng.normal(size=(500, 3))
    lib = Library.reference(3)
    batches = [(z[i : i + 128], t[i : i + 128], zdot[i : i + 128]) for i in range(0, 500, 128)]
    streamed = GramStats.from_library(lib, batches, device="cpu", chunk_size=50)
    theta = lib.transform(z, t)
    np.testing.assert_allclose(streamed.gram.numpy(), theta.T @ theta, rtol=1e-12)
    np.testing.assert_allclose(streamed.cross.numpy(), theta.T @ zdot, rtol=1e-12)


def test_rss_and_r2_from_stats_match_direct(planted_stats):
    theta, Y, stats = planted_stats
    coef = STLSQ(threshold=0.1).fit_gram(stats).coef_
    pred = theta @ coef.T
    np.testing.assert_allclose(stats.rss(coef), ((Y - pred) ** 2).sum(0), rtol=1e-6)
    np.testing.assert_allclose(stats.r2(coef), r2_score(Y, pred), atol=1e-10)
    np.testing.assert_allclose(rmse(Y, pred), np.sqrt(((Y - pred) ** 2).mean(0)))
    np.testing.assert_allclose(stats.r2(coef[[2]], dims=[2]), r2_score(Y, pred)[[2]], atol=1e-10)


@pytest.mark.gpu
def test_gram_path_on_cuda_matches_cpu(planted_stats):
    theta, Y, stats = planted_stats
    gpu = GramStats.from_arrays(theta, Y, chunk_size=300, device="cuda")
    assert gpu.device.type == "cuda"
    np.testing.assert_allclose(gpu.gram.cpu().numpy(), stats.gram.numpy(), rtol=1e-10)
    np.testing.assert_allclose(
        STLSQ(threshold=0.1).fit_gram(gpu).coef_,
        STLSQ(threshold=0.1).fit_gram(stats).coef_,
        atol=1e-8,
    )


def test_fail_loudly(planted_stats):
    theta, Y, stats = planted_stats
    with pytest.raises(ValueError, match="threshold must be"):
        STLSQ(threshold=-1)
    with pytest.raises(ValueError, match="alpha must be"):
        STLSQ(alpha=float("nan"))
    with pytest.raises(ValueError, match=r"theta_chunk must have shape \(c, 34\)"):
        stats.update(np.zeros((2, 5)), np.zeros((2, 3)))
    bad = theta.copy()
    bad[:, 4] = 0.0
    with pytest.raises(ValueError, match=r"column\(s\) \[4\] are identically zero"):
        STLSQ(normalize_columns=True).fit_gram(GramStats.from_arrays(bad, Y, device="cpu"))
    with pytest.raises(ValueError, match="NaN/inf"):
        STLSQ().fit_gram(GramStats.from_arrays(np.full_like(theta, np.nan), Y, device="cpu"))
    with pytest.raises(ValueError, match="regularizer must be"):
        SR3(regularizer="L2")
    with pytest.raises(ValueError, match="relax_coeff_nu must be"):
        SR3(relax_coeff_nu=0)


@pytest.mark.parametrize("regularizer,normalize", [("L0", False), ("L0", True), ("L1", False)])
def test_sr3_direct_and_gram_paths_match_pysindy(planted_stats, regularizer, normalize):
    theta, Y, stats = planted_stats
    ours = SR3(threshold=0.3, relax_coeff_nu=0.5, regularizer=regularizer, normalize_columns=normalize)
    lam = 0.3**2 / (2 * 0.5) if regularizer == "L0" else 0.3 / 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = (
            pysindy.SR3(
                reg_weight_lam=lam,
                relax_coeff_nu=0.5,
                regularizer=regularizer,
                max_iter=100,
                tol=1e-8,
                normalize_columns=normalize,
                unbias=True,
            )
            .fit(theta, Y)
            .coef_
        )
    np.testing.assert_array_equal(ours.fit(theta, Y).coef_, ref)
    gram = ours.fit_gram(stats).coef_  # the square-root reduction: same optimisation, p rows instead of n
    np.testing.assert_array_equal(gram != 0, ref != 0)
    np.testing.assert_allclose(gram, ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ours.fit_gram(stats, dims=[2]).coef_[0], ref[2], rtol=0, atol=1e-8)


def test_sr3_sweep_and_bagging_use_the_gram_path():
    theta, Y, W, names, groups = planted(d=3, n=3000, noise=0.1, seed=1, n_groups=20)
    train = GramStats.from_arrays(theta[:2000], Y[:2000], device="cpu")
    heldout = GramStats.from_arrays(theta[2000:], Y[2000:], device="cpu")
    for dim in range(3):
        sweep = sweep_thresholds(train, heldout, dim, SR3(normalize_columns=True), n_thresholds=20, tol=0.01)
        np.testing.assert_array_equal(sweep.chosen_coef != 0, W[:, dim] != 0)
        np.testing.assert_allclose(sweep.chosen_coef[W[:, dim] != 0], W[W[:, dim] != 0, dim], rtol=0.02)
    per_group = group_stats(theta[:2000], Y[:2000], groups[:2000] % 10)
    bag = bagging_gram(per_group, SR3(threshold=0.3), n_bootstrap=10, seed=3)
    assert np.all(bag.inclusion_probability[W.T != 0] == 1.0)


# ------------------------------------------------------------------ (b) known dynamics


def _trajectories(rhs, x0s, t_end, n_t):
    """Integrate several initial conditions; returns states (n, d) and times (n,)."""
    ts = np.linspace(0.0, t_end, n_t)
    zs, times = [], []
    for x0 in x0s:
        sol = solve_ivp(rhs, (0.0, t_end), x0, t_eval=ts, method="DOP853", rtol=1e-10, atol=1e-12)
        zs.append(sol.y.T)
        times.append(ts)
    return np.concatenate(zs), np.concatenate(times)


def linear_system():
    A = np.array([[-0.1, 2.0], [-2.0, -0.1]])
    lib = Library([Polynomial(2)], n_state=2)
    true = {0: {"z0": -0.1, "z1": 2.0}, 1: {"z0": -2.0, "z1": -0.1}}
    return lib, (lambda t, x: A @ x), [[2.0, 0.0], [0.0, -1.5], [1.0, 1.0]], 10.0, true, 0.05


def lorenz_scaled():
    # X = 10 z: z0' = 10 (z1 - z0), z1' = 28 z0 - 10 z0 z2 - z1, z2' = 10 z0 z1 - 8/3 z2
    def rhs(t, x):
        return [
            10 * (x[1] - x[0]),
            28 * x[0] - 10 * x[0] * x[2] - x[1],
            10 * x[0] * x[1] - 8 / 3 * x[2],
        ]

    true = {
        0: {"z0": -10.0, "z1": 10.0},
        1: {"z0": 28.0, "z1": -1.0, "z0 z2": -10.0},
        2: {"z0 z1": 10.0, "z2": -8 / 3},
    }
    lib = Library([Polynomial(2)], n_state=3)
    return lib, rhs, [[-0.8, 0.8, 2.7], [0.5, 1.0, 2.0], [1.0, -0.5, 3.0]], 2.0, true, 0.5


def cubic_oscillator():
    def rhs(t, x):
        return [-0.1 * x[0] ** 3 + 2 * x[1] ** 3, -2 * x[0] ** 3 - 0.1 * x[1] ** 3]

    true = {0: {"z0^3": -0.1, "z1^3": 2.0}, 1: {"z0^3": -2.0, "z1^3": -0.1}}
    lib = Library([Polynomial(3)], n_state=2)
    return lib, rhs, [[1.5, 0.0], [0.0, 1.0], [-1.0, 0.7]], 10.0, true, 0.05


def time_dependent():
    # z0' = -(1 + 2t) z0 + 0.5 t^2,  z1' = -0.5 z1 + t z0 + 0.3 exp(-z0^2)
    def rhs(t, x):
        return [
            -(1 + 2 * t) * x[0] + 0.5 * t**2,
            -0.5 * x[1] + t * x[0] + 0.3 * np.exp(-(x[0] ** 2)),
        ]

    true = {
        0: {"z0": -1.0, "z0 t": -2.0, "t^2": 0.5},
        1: {"z1": -0.5, "z0 t": 1.0, "exp(-z0^2)": 0.3},
    }
    x0s = [[2.0, -1.0], [-1.5, 0.5], [0.5, 2.0], [1.0, 1.0], [-2.0, -2.0]]
    return Library.reference(2), rhs, x0s, 1.0, true, 0.1


SYSTEMS = [linear_system, lorenz_scaled, cubic_oscillator, time_dependent]


def _check_recovery(lib, coef, true, rtol):
    names = lib.get_feature_names()
    for dim, terms in true.items():
        found = {names[k]: coef[dim, k] for k in np.flatnonzero(coef[dim])}
        assert set(found) == set(terms), f"z{dim}: found {sorted(found)}, expected {sorted(terms)}"
        for name, value in terms.items():
            assert found[name] == pytest.approx(value, rel=rtol), (dim, name)


@pytest.mark.parametrize("system", SYSTEMS, ids=[s.__name__ for s in SYSTEMS])
def test_recovers_known_dynamics_exact_derivatives(system):
    lib, rhs, x0s, t_end, true, threshold = system()
    z, t = _trajectories(rhs, x0s, t_end, 400)
    zdot = np.stack([rhs(ti, zi) for ti, zi in zip(t, z)])  # exact derivatives
    theta = lib.transform(z, t)
    stats = GramStats.from_arrays(theta, zdot, device="cpu")
    fast = STLSQ(threshold=threshold, alpha=0.0).fit_gram(stats).coef_
    _check_recovery(lib, fast, true, rtol=1e-6)
    ref = pysindy_stlsq(theta, zdot, threshold=threshold, alpha=0.0)
    np.testing.assert_allclose(fast, ref, atol=1e-8, rtol=0)


def test_recovers_lorenz_finite_differences():
    lib, rhs, x0s, t_end, true, threshold = lorenz_scaled()
    n_t = 4001
    zs, zdots = [], []
    for x0 in x0s:
        z, t = _trajectories(rhs, [x0], t_end, n_t)
        zs.append(z)
        zdots.append(np.gradient(z, t, axis=0, edge_order=2))  # O(dt^2), dt = 5e-4
    z, zdot = np.concatenate(zs), np.concatenate(zdots)
    theta = lib.transform(z)
    stats = GramStats.from_arrays(theta, zdot, device="cpu")
    fast = STLSQ(threshold=threshold, alpha=0.05).fit_gram(stats).coef_
    _check_recovery(lib, fast, true, rtol=1e-2)
    ref = pysindy_stlsq(theta, zdot, threshold=threshold, alpha=0.05)
    np.testing.assert_allclose(fast, ref, atol=1e-8, rtol=0)


# ----------------------------------------------------------------- (c) threshold sweep


def test_threshold_sweep_picks_true_sparsity():
    theta, Y, W, names, _ = planted(d=3, n=3000, noise=0.1, seed=1)
    train = GramStats.from_arrays(theta[:2000], Y[:2000], device="cpu")
    heldout = GramStats.from_arrays(theta[2000:], Y[2000:], device="cpu")
    for dim in range(3):
        sweep = sweep_thresholds(train, heldout, dim, STLSQ(alpha=0.05), n_thresholds=30, tol=0.01)
        assert sweep.n_terms[sweep.chosen] == np.count_nonzero(W[:, dim])
        np.testing.assert_array_equal(sweep.chosen_coef != 0, W[:, dim] != 0)
        assert sweep.pareto[sweep.chosen]
        assert sweep.n_terms.max() > sweep.n_terms[sweep.chosen]  # the grid reached denser models
        rows = sweep.table()
        assert len(rows) == 30 and sum(r["chosen"] for r in rows) == 1
        assert rows[sweep.chosen]["threshold"] == sweep.chosen_threshold


def test_threshold_sweep_explicit_grid_and_tolerance():
    theta, Y, W, names, _ = planted(d=3, n=3000, noise=0.1, seed=1)
    train = GramStats.from_arrays(theta[:2000], Y[:2000])
    heldout = GramStats.from_arrays(theta[2000:], Y[2000:])
    grid = [1e-3, 0.1, 0.6, 1.1, 5.0]
    strict = sweep_thresholds(train, heldout, 1, thresholds=grid, tol=0.0)
    loose = sweep_thresholds(train, heldout, 1, thresholds=grid, tol=0.9)
    assert strict.r2_heldout[strict.chosen] == strict.r2_heldout.max()
    assert loose.n_terms[loose.chosen] <= strict.n_terms[strict.chosen]


# ------------------------------------------------------------------------- (d) bagging


def test_bagging_by_trajectory_groups():
    theta, Y, W, names, groups = planted(d=3, n=2000, noise=0.3, seed=2, n_groups=20)
    opt = STLSQ(threshold=0.2, alpha=0.05)
    per_group = group_stats(theta, Y, groups)
    res = bagging_gram(per_group, opt, n_bootstrap=20, seed=7)
    true = W.T != 0
    assert res.coefs.shape == (20, 3, theta.shape[1]) and res.resample == "group"
    assert (res.inclusion_probability[true] >= 0.95).all()
    assert res.inclusion_probability[~true].mean() < 0.05
    np.testing.assert_allclose(res.coef_mean[true], W.T[true], rtol=0.1)
    assert (res.coef_std[true] > 0).all()
    again = bagging_gram(per_group, opt, n_bootstrap=3, seed=7)
    np.testing.assert_array_equal(again.coefs, res.coefs[:3])  # same seed, same resamples
    other = bagging_gram(per_group, opt, n_bootstrap=3, seed=8)
    assert not np.array_equal(other.coefs, res.coefs[:3])
    # per-group statistics summed from partial ones (one per trajectory block, as the Ray tasks make) give the same ensemble
    blocks = [np.arange(len(Y)) % 2 == k for k in range(2)]  # every group has rows in both blocks
    parts = [group_stats(theta[rows], Y[rows], groups[rows]) for rows in blocks]
    merged = [a.merge(b) for a, b in zip(*parts)]
    np.testing.assert_allclose(bagging_gram(merged, opt, n_bootstrap=5, seed=7).coefs, res.coefs[:5], atol=1e-10)


def test_bagging_with_one_sample_per_group_flags_noise_terms():
    theta, Y, W, names, _ = planted(d=3, n=1000, noise=0.3, seed=4)
    per_sample = group_stats(theta, Y, np.arange(len(Y)))  # every sample its own group: the sample bootstrap
    res = bagging_gram(per_sample, STLSQ(threshold=0.3, alpha=0.05), n_bootstrap=25, seed=0, dims=[0, 2])
    true = W.T[[0, 2]] != 0
    assert res.dims == [0, 2]
    assert (res.inclusion_probability[true] == 1.0).all()
    # Noise terms are rare; the most frequent ones are nearly collinear pairs such as
    # (z0 t, z0 t^2) with cancelling coefficients (~1/3 of resamples here): bagging
    # exposes exactly that instability, and no noise term is always selected.
    assert res.inclusion_probability[~true].mean() < 0.05
    assert res.inclusion_probability[~true].max() < 0.5


def test_reference_library_d16_gram_path():
    """The production configuration: 1035 terms, planted model in two of 16 dimensions."""
    rng = np.random.default_rng(5)
    z, t = rng.normal(size=(3000, 16)), rng.uniform(size=3000)
    lib = Library.reference(16)
    names = lib.get_feature_names()
    W = np.zeros((lib.n_terms, 16))
    W[names.index("z5"), 5] = -1.0
    W[names.index("z5 t"), 5] = -2.0
    W[names.index("exp(-t z3)"), 3] = 0.5
    W[names.index("z3 z7"), 3] = 0.8
    batches = [(z[i : i + 1000], t[i : i + 1000], None) for i in range(0, 3000, 1000)]
    batches = [(zb, tb, lib.transform(zb, tb) @ W) for zb, tb, _ in batches]
    stats = GramStats.from_library(lib, batches, device="cpu", chunk_size=500)
    coef = STLSQ(threshold=0.1, alpha=0.05).fit_gram(stats, dims=[3, 5]).coef_
    np.testing.assert_array_equal(coef != 0, W[:, [3, 5]].T != 0)
    np.testing.assert_allclose(coef, W[:, [3, 5]].T, atol=1e-6)
