"""The configurable library (analysis/sindy/: TimeSpline, TimeProduct, Tanh, CustomTerms, build_library),
the selection rule on unexplained variance (analysis/sindy/selection.py: choose_model) and the one equation formatter
(analysis/sindy/export.py: rhs_text)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.sindy.build import build_library, principal_directions
from analysis.sindy.custom_terms import CustomTerms
from analysis.sindy.export import rhs_text
from analysis.sindy.families import Tanh, TimeProduct, TimeSpline
from analysis.sindy.library import Library
from analysis.sindy.registry import FAMILIES, LIBRARY_FAMILIES
from analysis.sindy.selection import UV_FLOOR, choose_model


@pytest.fixture
def zt():
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 3)), rng.uniform(size=40)


def cfg(**kw):
    base = dict(
        preset="standard",
        families=["polynomial", "time", "time_state", "tanh"],
        poly_degree=2,
        time_basis="poly",
        time_degree=4,
        spline_basis=6,
        time_state_degree=1,
        tanh_on="coordinates",
        tanh_projections=2,
        tanh_scales=[0.5, 1.0],
        tanh_time_degree=1,
        terms=[],
    )
    return SimpleNamespace(**{**base, **kw})


def test_time_spline_is_a_partition_of_unity_without_its_first_function(zt):
    z, t = zt
    fam = TimeSpline(n_basis=6, degree=3)
    full = fam.basis(t)
    assert np.allclose(full.sum(axis=1), 1.0)
    assert np.allclose(fam.transform(z, t), full[:, 1:]) and fam.n_output_features(3) == 5
    with pytest.raises(ValueError, match="n_basis"):
        TimeSpline(n_basis=3, degree=3)


def test_time_product_columns_and_names(zt):
    z, t = zt
    fam = TimeProduct(degree=2, state_degree=1)
    cols = fam.transform(z, t)
    assert cols.shape == (40, 6)
    assert np.allclose(cols[:, 0], t * z[:, 0]) and np.allclose(cols[:, 5], t**2 * z[:, 2])
    assert fam.names(3)[:2] == ["z0 t", "z1 t"] and fam.names(3)[-1] == "z2 t^2"


def test_tanh_on_coordinates_and_projections(zt):
    z, t = zt
    fam = Tanh(scales=(0.5,), time_degree=1)
    assert fam.names(3) == [
        "tanh(z0/0.5)",
        "tanh(z1/0.5)",
        "tanh(z2/0.5)",
        "tanh(z0/0.5) t",
        "tanh(z1/0.5) t",
        "tanh(z2/0.5) t",
    ]
    assert np.allclose(fam.transform(z, t)[:, 4], np.tanh(z[:, 1] / 0.5) * t)
    u = principal_directions(z, 1)
    proj = Tanh(scales=(2.0,), projections=tuple(map(tuple, u)))
    assert np.allclose(proj.transform(z)[:, 0], np.tanh((z @ u[0]) / 2))
    assert not proj.uses_time and Library.from_spec(Library([proj], 3).spec()) == Library([proj], 3)


def test_custom_terms_follow_the_grammar_and_never_eval(zt):
    z, t = zt
    fam = CustomTerms(terms=("z0 * z1", "exp(-t) * z2", "tanh(2 * z0) ** 2", "1.5"))
    cols = fam.transform(z, t)
    assert np.allclose(cols[:, 0], z[:, 0] * z[:, 1]) and np.allclose(cols[:, 1], np.exp(-t) * z[:, 2])
    assert np.allclose(cols[:, 2], np.tanh(2 * z[:, 0]) ** 2) and np.allclose(cols[:, 3], 1.5)
    assert np.allclose(fam.transform(torch.from_numpy(z), torch.from_numpy(t)).numpy(), cols)
    for bad in ("__import__('os')", "z0.real", "open(1)", "z0 if t else z1", "[z0]", "lambda: 1", "exp(z0, z1)"):
        with pytest.raises(ValueError, match="grammar"):
            CustomTerms(terms=(bad,))
    with pytest.raises(ValueError, match="uses z5"):
        CustomTerms(terms=("z5",)).transform(z, t)


def test_build_library_presets_families_and_unknown_names(zt):
    z, t = zt
    assert build_library(cfg(preset="reference"), 3) == Library.reference(3)
    lib = build_library(cfg(), 3)
    kinds = [f.kind for f, _ in lib.family_slices()]
    assert kinds == ["Polynomial", "TimePolynomial", "TimeProduct", "Tanh"]
    assert lib.n_terms == 10 + 4 + 12 + 12 and lib.transform(z, t).shape == (40, lib.n_terms)
    spline = build_library(cfg(time_basis="spline", time_degree=3), 3, (0.0, 2.0))
    assert "B5(t)" in spline.get_feature_names()
    with pytest.raises(ValueError, match="unknown library families"):
        build_library(cfg(families=["polynomial", "fourier"]), 3)
    with pytest.raises(ValueError, match="principal directions"):
        build_library(cfg(tanh_on="principal"), 3)


def test_rule_is_relative_to_unexplained_variance_with_a_round_off_floor():
    thr = np.arange(4.0)
    # R^2 0.98 best: 0.979 (uv +5%) qualifies at tol 0.05, 0.975 (uv +25%) does not.
    assert choose_model(np.array([40, 20, 10, 5]), np.array([0.98, 0.979, 0.975, 0.9]), thr, 0.05) == 1
    # Exact data: uv 1e-28 vs 1e-20 both below the floor, so the sparser one wins.
    exact = 1 - np.array([1e-28, 1e-20, 0.5, 0.9])
    assert choose_model(np.array([14, 7, 5, 1]), exact, thr, 0.05) == 1 and UV_FLOOR > 1e-20
    # A budget restricts the pool; the best within it sets the reference.
    assert choose_model(np.array([40, 20, 10, 5]), np.array([0.99, 0.98, 0.979, 0.9]), thr, 0.05, max_terms=25) == 2


def test_one_formatter_for_text_and_latex():
    names, latex = ["1", "z0", "z0 z1"], ["1", "z_{0}", "z_{0} z_{1}"]
    assert rhs_text([2.5, -10.0, 1.2e-5], names) == "2.5 - 10 z0 + 1.2e-05 z0 z1"
    assert rhs_text([0.0, -1.0, 0.0], names) == "-1 z0" and rhs_text([0, 0, 0], names) == "0"
    assert rhs_text([2.5, -10.0, 1.2e-5], latex, "latex") == r"2.5 - 10\, z_{0} + 1.2 \cdot 10^{-5}\, z_{0} z_{1}"


def test_forward_stepwise_path_is_nested_least_squares():
    from analysis.sindy.gram import GramStats
    from analysis.sindy.optimizers import ForwardStepwise
    from analysis.sindy.selection import sweep_thresholds

    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 30))
    w = np.zeros(30)
    w[[2, 7, 11]] = [1.5, -2.0, 0.7]
    y = X @ w + 1e-3 * rng.normal(size=400)
    st = GramStats.from_arrays(X[:300], y[:300], device="cpu")
    path = ForwardStepwise(6).fit_gram(st).path_[0]
    supports = [set(np.flatnonzero(c)) for c in path]
    assert [len(s) for s in supports] == [1, 2, 3, 4, 5, 6] and supports[2] == {2, 7, 11}
    assert all(a < b for a, b in zip(supports, supports[1:]))
    ls = np.linalg.lstsq(X[:300][:, [2, 7, 11]], y[:300], rcond=None)[0]
    assert np.allclose(path[2][[2, 7, 11]], ls, atol=1e-10)
    ho = GramStats.from_arrays(X[300:], y[300:], device="cpu")
    sw = sweep_thresholds(st, ho, 0, n_thresholds=5, max_terms=4)
    assert set(np.flatnonzero(sw.chosen_coef)) == {2, 7, 11} and sw.n_terms[sw.chosen] <= 4


def test_the_config_knows_exactly_the_registry_families():
    from configs.sindy import LIBRARY_FAMILY_NAMES

    assert LIBRARY_FAMILY_NAMES == tuple(LIBRARY_FAMILIES)
    kinds = {k for ks in LIBRARY_FAMILIES.values() for k in ks}
    assert kinds <= set(FAMILIES), kinds - set(FAMILIES)
