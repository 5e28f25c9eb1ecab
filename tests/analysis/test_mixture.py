"""analysis.sindy.mixture: the closed-form eps* of a Gaussian mixture on known cases, EM model choice, the term family."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analysis.sindy.families import Polynomial
from analysis.sindy.library import Library
from analysis.sindy.mixture import GaussianMixtureEps, MixtureEps, fit_mixture


def _spd(rng, d):
    A = rng.normal(size=(d, d))
    return A @ A.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("ab", [0.999, 0.5, 1e-3])
def test_single_gaussian_gives_the_affine_formula(ab):
    rng = np.random.default_rng(0)
    d = 6
    mu, S = rng.normal(size=d), _spd(rng, d)
    a, s = np.sqrt(ab), np.sqrt(1 - ab)
    z = rng.normal(size=(50, d)) * 2
    mix = GaussianMixtureEps(np.ones(1), mu[None], S[None])
    r, eps = mix.posterior_and_eps(z, a, s)
    want = s * np.linalg.solve(a**2 * S + s**2 * np.eye(d), (z - a * mu).T).T
    np.testing.assert_allclose(eps, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(r, 1.0)


@pytest.mark.parametrize("ab", [0.99, 0.3, 1e-3])
def test_two_mode_isotropic_mixture_gives_the_tanh_form(ab):
    """x0 ~ (N(m u, sig2 I) + N(-m u, sig2 I)) / 2: eps* = s (z - a m u tanh(a m u.z / v)) / v, v = a^2 sig2 + s^2."""
    rng = np.random.default_rng(1)
    d, m, sig2 = 5, 1.7, 0.2
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    a, s = np.sqrt(ab), np.sqrt(1 - ab)
    mix = GaussianMixtureEps(np.array([0.5, 0.5]), np.stack([m * u, -m * u]), np.stack([sig2 * np.eye(d)] * 2))
    z = rng.normal(size=(200, d)) * 1.5
    v = a**2 * sig2 + s**2
    want = s * (z - a * m * u * np.tanh(a * m * (z @ u) / v)[:, None]) / v
    np.testing.assert_allclose(mix.eps(z, a, s), want, rtol=1e-9, atol=1e-12)


def test_sharp_components_do_not_underflow():
    """Near t = 0 the components are sharp: densities underflow unless normalised in log space."""
    mix = GaussianMixtureEps(
        np.array([0.3, 0.7]), np.array([[-3.0, 0.0], [3.0, 0.0]]), np.stack([1e-4 * np.eye(2)] * 2)
    )
    r, eps = mix.posterior_and_eps(np.array([[0.1, 0.0], [30.0, 1.0]]), 0.9999, 0.01)
    assert np.all(np.isfinite(r)) and np.all(np.isfinite(eps))
    np.testing.assert_allclose(r.sum(axis=1), 1.0)
    assert r[0, 1] > 0.99 and r[1, 1] > 0.99


@pytest.mark.parametrize("ab", [0.99, 0.3, 1e-3])
def test_rotated_mixture_is_the_closed_form_in_rotated_coordinates(ab):
    """u = C x with C orthonormal: the rotated mixture's eps*(u) is C eps*(C^T u), its posteriors unchanged."""
    rng = np.random.default_rng(4)
    d = 5
    mix = GaussianMixtureEps(np.array([0.2, 0.5, 0.3]), rng.normal(size=(3, d)), np.stack([_spd(rng, d)] * 3))
    C, _ = np.linalg.qr(rng.normal(size=(d, d)))
    rot = mix.rotated(C)
    a, s = np.sqrt(ab), np.sqrt(1 - ab)
    z = rng.normal(size=(100, d)) * 1.5
    r0, e0 = mix.posterior_and_eps(z, a, s)
    r1, e1 = rot.posterior_and_eps(z @ C.T, a, s)
    np.testing.assert_allclose(r1, r0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(e1, e0 @ C.T, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="orthonormal"):
        mix.rotated(2 * C)


def test_fit_mixture_prefers_the_true_number_of_modes():
    rng = np.random.default_rng(2)
    centres = np.array([[-4, 0, 0], [4, 0, 0], [0, 4, 0]], dtype=float)
    x = centres[rng.integers(0, 3, 3000)] + rng.normal(size=(3000, 3)) * 0.5
    mix, rows, mixtures = fit_mixture(x[:2000], x[2000:], ks=(1, 3, 12), seed=0)
    assert [r["k"] for r in rows] == [1, 3, 12] and sum(r["chosen"] for r in rows) == 1
    assert rows[0]["loglik_heldout"] < rows[1]["loglik_heldout"]
    assert mix.K in (3, 12) and all(r["seconds"] >= 0 for r in rows)
    assert [m.K for m in mixtures] == [1, 3, 12] and mixtures[[r["chosen"] for r in rows].index(True)] is mix


def test_mixture_term_family_roundtrips_and_matches_the_closed_form():
    rng = np.random.default_rng(3)
    d, T = 3, 10
    mix = GaussianMixtureEps(np.array([0.4, 0.6]), rng.normal(size=(2, d)), np.stack([_spd(rng, d)] * 2))
    ab = np.linspace(0.01, 0.99, T)  # state order: noise first
    fam = MixtureEps.from_mixture(mix, ab, features=("eps", "posterior"))
    lib = Library([Polynomial(1), fam], n_state=d)
    assert lib.n_terms == 4 + d + 2
    assert lib.get_feature_names()[4:] == ["eps_mix0", "eps_mix1", "eps_mix2", "r_mix0", "r_mix1"]
    back = Library.from_spec(json.loads(json.dumps(lib.spec())))
    assert back == lib
    z = rng.normal(size=(7, d))
    k = 3
    t = 1 - k / T
    r, eps = mix.posterior_and_eps(z, np.sqrt(ab[k]), np.sqrt(1 - ab[k]))
    np.testing.assert_allclose(back.transform(z, t)[:, 4:], np.concatenate([eps, r], axis=1), rtol=1e-12)


def test_mixture_drift_feature_is_the_composed_closed_form():
    rng = np.random.default_rng(4)
    d, T = 3, 10
    mix = GaussianMixtureEps(np.array([0.5, 0.5]), rng.normal(size=(2, d)), np.stack([_spd(rng, d)] * 2))
    ab = np.linspace(0.01, 0.99, T)
    p, q = rng.normal(size=T), 10 * rng.normal(size=T)
    fam = MixtureEps.from_mixture(mix, ab, features=("drift",), p=p, q=q)
    lib = Library([fam], n_state=d)
    assert lib.get_feature_names() == ["drift_mix0", "drift_mix1", "drift_mix2"]
    assert Library.from_spec(json.loads(json.dumps(lib.spec()))) == lib
    z, k = rng.normal(size=(5, d)), 6
    _, eps = mix.posterior_and_eps(z, np.sqrt(ab[k]), np.sqrt(1 - ab[k]))
    np.testing.assert_allclose(lib.transform(z, 1 - k / T), p[k] * z + q[k] * eps, rtol=1e-12)
    with pytest.raises(ValueError, match="needs the sampler's p and q"):
        MixtureEps.from_mixture(mix, ab, features=("drift",))


def test_regime_columns_are_posteriors_times_states():
    from analysis.sindy.mixture import GaussianMixtureEps, MixtureEps

    rng = np.random.default_rng(0)
    mix = GaussianMixtureEps(np.array([0.3, 0.7]), rng.standard_normal((2, 3)), np.stack([np.eye(3)] * 2))
    ab = np.linspace(0.01, 0.99, 10)
    fam = MixtureEps.from_mixture(mix, ab, ("posterior", "regimes"))
    z, t = rng.standard_normal((5, 3)), np.full(5, 0.55)
    cols = fam._columns(z, t)
    assert fam.n_output_features(3) == 2 + 6 == cols.shape[1]
    r = cols[:, :2]
    assert np.allclose(r.sum(axis=1), 1.0)
    assert np.allclose(cols[:, 2:], (r[:, :, None] * z[:, None, :]).reshape(5, 6))
    assert fam.names(3)[2:5] == ["r_mix0 z0", "r_mix0 z1", "r_mix0 z2"]


def test_gaussian_feature_is_the_moment_matched_closed_form():
    from analysis.sindy.mixture import GaussianMixtureEps, MixtureEps, moment_matched

    rng = np.random.default_rng(1)
    means = rng.standard_normal((3, 2))
    covs = np.stack([np.eye(2) * v for v in (0.5, 1.0, 2.0)])
    mix = GaussianMixtureEps(np.array([0.2, 0.3, 0.5]), means, covs)
    # Moment matching checked against samples of the mixture.
    comp = rng.choice(3, size=200_000, p=mix.weights)
    x = means[comp] + rng.standard_normal((200_000, 2)) * np.sqrt(np.array([0.5, 1.0, 2.0])[comp])[:, None]
    g = moment_matched(mix)
    assert np.allclose(g.means[0], x.mean(axis=0), atol=0.02) and np.allclose(g.covariances[0], np.cov(x.T), atol=0.03)
    fam = MixtureEps.from_mixture(mix, np.linspace(0.01, 0.99, 10), ("gaussian",))
    z, t = rng.standard_normal((4, 2)), np.full(4, 0.35)
    k = 10 - int(np.ceil(0.35 * 10 - 1e-9))
    ab = np.linspace(0.01, 0.99, 10)[k]
    a, s = np.sqrt(ab), np.sqrt(1 - ab)
    C = a**2 * g.covariances[0] + s**2 * np.eye(2)
    want = s * np.linalg.solve(C, (z - a * g.means[0]).T).T
    assert np.allclose(fam._columns(z, t), want) and fam.names(2) == ["eps_gauss0", "eps_gauss1"]


def _labelled(mix, rng, T=20, per_state=300):
    """States z = a x0 + s e of the cosine-like levels a_k, s_k with the exact eps* of ``mix`` as the label."""
    ab = np.cos(0.5 * np.pi * (1 - np.arange(T) / T) * 0.98) ** 2  # state k: t = 1 - k/T, noisiest first
    a, s = np.sqrt(ab), np.sqrt(1 - ab)
    comp = rng.choice(mix.K, size=(T, per_state), p=mix.weights)
    L = np.linalg.cholesky(mix.covariances)
    x0 = mix.means[comp] + np.einsum("tnij,tnj->tni", L[comp], rng.normal(size=(T, per_state, mix.d)))
    z = a[:, None, None] * x0 + s[:, None, None] * rng.normal(size=x0.shape)
    k = np.repeat(np.arange(T), per_state)
    zf = z.reshape(-1, mix.d)
    return zf, mix.eps(zf, a[k], s[k]), k, a, s


def test_distilling_a_mixture_to_its_own_eps_recovers_it():
    """A moved start distilled to the exact eps* of a two-mode mixture reaches that eps* on fresh states
    (R^2 > 0.999), while the start explains far less; a zero-step distillation returns the start unchanged."""
    from analysis.sindy.mixture import distill_mixture

    rng = np.random.default_rng(3)
    true = GaussianMixtureEps(
        np.array([0.4, 0.6]),
        np.array([[1.5, 0.0, 0.5], [-1.0, 0.8, 0.0]]),
        np.stack([_spd(rng, 3), 0.5 * _spd(rng, 3)]),
    )
    start = GaussianMixtureEps(np.array([0.5, 0.5]), true.means * 0.5 + 0.3, np.stack([np.eye(3)] * 2))
    z, eps, k, a, s = _labelled(true, rng)
    got, info = distill_mixture(start, z, eps, k, a, s, iterations=1500, lr=1e-2, rows_per_state=200, seed=0)
    z2, eps2, k2, _, _ = _labelled(true, np.random.default_rng(4))

    def r2(m):
        pred = m.eps(z2, a[k2], s[k2])
        return 1 - ((pred - eps2) ** 2).sum() / ((eps2 - eps2.mean(0)) ** 2).sum()

    assert r2(start) < 0.95 and r2(got) > 0.999, (r2(start), r2(got))
    assert info["loss_end"] < 0.01 * info["loss_start"] and info["iterations"] == 1500 and info["rows"] == len(z)
    same, _ = distill_mixture(start, z, eps, k, a, s, iterations=0)
    np.testing.assert_allclose(same.means, start.means)
    np.testing.assert_allclose(same.covariances, start.covariances, atol=2e-6)
    np.testing.assert_allclose(same.weights, start.weights)


def test_distill_mixture_rejects_mismatched_inputs():
    from analysis.sindy.mixture import distill_mixture

    mix = GaussianMixtureEps(np.ones(1), np.zeros((1, 2)), np.eye(2)[None])
    a, s = np.ones(3) * 0.5, np.ones(3) * 0.8
    with pytest.raises(ValueError, match="is 2-D but the states are 3-D"):
        distill_mixture(mix, np.zeros((4, 3)), np.zeros((4, 3)), np.zeros(4, int), a, s)
    with pytest.raises(ValueError, match=r"z, eps \(n, d\)"):
        distill_mixture(mix, np.zeros((4, 2)), np.zeros((5, 2)), np.zeros(4, int), a, s)
    with pytest.raises(ValueError, match="needs labelled rows"):
        distill_mixture(mix, np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, int), a, s)
