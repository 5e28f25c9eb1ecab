"""The fit's coordinates (analysis/sindy/coordinates.py): the dynamics' linear modes and the affine map's round trip."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.sindy.coordinates import Coordinates, linear_modes


def _affine_system(n: int, d: int = 6, steps: int = 8, seed: int = 0):
    """States and an exactly affine drift v = A_k z + b_k whose A_k share the eigenvectors Q (a Gaussian's drift)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.linspace(0.2, 3.0, d)
    z = rng.normal(size=(steps, n, d))
    a = [(q * (-(k + 1) / (lam + 0.1 * (k + 1)))) @ q.T - 0.5 * np.eye(d) for k in range(steps)]
    v = np.stack([z[k] @ a[k].T + rng.normal(size=d) for k in range(steps)])
    return z, v, q


def test_linear_modes_recover_the_shared_eigenvectors():
    z, v, q = _affine_system(n=40)
    m = linear_modes(z, v)
    assert m.shape == (6, 6) and np.allclose(m @ m.T, np.eye(6), atol=1e-10)
    overlap = np.abs(m @ q)  # a permutation matrix when the modes are Q's columns up to sign
    assert np.allclose(np.sort(overlap, axis=1)[:, -1], 1, atol=1e-8)
    assert np.all(m[np.arange(6), np.argmax(np.abs(m), axis=1)] > 0)  # the sign convention


def test_linear_modes_need_more_rows_than_unknowns():
    z, v, _ = _affine_system(n=7)  # d + 1 = 7 unknowns per step
    assert linear_modes(z, v) is None


@pytest.mark.parametrize("base", ["latent", "pca"])
def test_modes_after_a_base_round_trip(base):
    rng = np.random.default_rng(1)
    z0 = rng.normal(size=(50, 9))
    c = Coordinates.identity(9) if base == "latent" else Coordinates.fit_pca(z0, 5)
    m, _ = np.linalg.qr(rng.normal(size=(c.dim, c.dim)))
    modes = c.then_modes(m.T)
    assert modes.kind == "modes" and modes.base == base and modes.file_name == "coordinates.safetensors"
    u = modes.states(z0)
    assert np.allclose(u, c.states(z0) @ m, atol=1e-12)
    if base == "latent":
        assert modes.is_rotation and np.allclose(modes.inverse(u), z0, atol=1e-12)
    else:
        assert not modes.is_rotation and np.allclose(modes.inverse(u), c.inverse(c.states(z0)), atol=1e-12)
    assert "linear modes" in modes.describe()


def test_the_coordinate_choice_weighs_terms_pooled_and_worst_fit():
    from analysis.job.coordinate_choice import choose_coordinates

    def cand(terms, pooled, worst):
        return {"terms": terms, "unexplained": pooled, "worst": worst}

    # Gaussian-like: the modes are sparser and better on both counts
    assert choose_coordinates([cand(466, 0.017, 0.039), cand(154, 1.4e-4, 5.6e-4)], 0.05) == 1
    # mixture-like: the modes are sparser and better pooled, but one equation is worse: keep the own coordinates
    assert choose_coordinates([cand(390, 0.0022, 0.0097), cand(132, 0.0019, 0.0116)], 0.05) == 0
    # Lorenz-like: exact in both up to round-off: the fewer terms
    assert choose_coordinates([cand(7, 8e-16, 2e-15), cand(24, 1.5e-14, 4e-14)], 0.05) == 0
    assert choose_coordinates([cand(24, 8e-16, 2e-15), cand(7, 1.5e-14, 4e-14)], 0.05) == 1
    # each better on one count and neither within the tolerance on both: the own coordinates
    assert choose_coordinates([cand(300, 0.30, 0.50), cand(100, 0.20, 0.90)], 0.05) == 0
