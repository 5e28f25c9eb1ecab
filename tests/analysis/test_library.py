"""Tests for the SINDy library (analysis/sindy/library.py, families.py, terms.py): term counts, names, values,
numpy/torch parity, spec, pysindy."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pysindy
import pytest
import torch

from analysis.sindy.families import ExpNegSquare, ExpNegTimeState, Polynomial, TimePolynomial, TimeTimesState
from analysis.sindy.gram import GramStats
from analysis.sindy.library import Library, PysindyLibrary, reference_n_terms
from analysis.sindy.optimizers import STLSQ

FAMILIES = [
    Polynomial(3, include_bias=True),
    Polynomial(2, include_bias=False),
    TimePolynomial(2),
    TimeTimesState((1, 2)),
    ExpNegTimeState(),
    ExpNegSquare(),
]
FAMILY_IDS = [repr(f) for f in FAMILIES]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(7, 4)), rng.uniform(size=7)


@pytest.mark.parametrize("d", [1, 2, 3, 16])
def test_reference_term_count_formula(d):
    lib = Library.reference(d)
    expected = math.comb(d + 3, 3) + 2 + 4 * d
    assert lib.n_terms == expected == reference_n_terms(d) == lib.n_output_features(d)
    assert len(lib.get_feature_names()) == expected
    z = np.random.default_rng(d).normal(size=(3, d))
    assert lib.transform(z, 0.5).shape == (3, expected)


def test_reference_count_d16_is_1035():
    # 969 monomials of degree <= 3 in 16 variables + t, t^2 + 4 families of 16 terms.
    assert Library.reference(16).n_terms == 1035


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
@pytest.mark.parametrize("d", [1, 4])
def test_family_sizes_agree(family, d):
    z = np.random.default_rng(1).normal(size=(5, d))
    cols = family(z, np.linspace(0, 1, 5))
    assert cols.shape == (5, family.n_output_features(d))
    for style in ("text", "latex"):
        names = family.names(d, style=style)
        assert len(names) == family.n_output_features(d) == len(set(names))


@pytest.mark.parametrize("style", ["text", "latex"])
def test_names_unique(style):
    names = Library.reference(16).get_feature_names(style)
    assert len(names) == len(set(names)) == 1035


def test_text_and_latex_names():
    lib = Library.reference(6)
    text, latex = lib.get_feature_names("text"), lib.get_feature_names("latex")
    pairs = {
        "1": "1",
        "z3": "z_{3}",
        "z3^2 z5": "z_{3}^{2} z_{5}",
        "z0 z1 z2": "z_{0} z_{1} z_{2}",
        "z4^3": "z_{4}^{3}",
        "t": "t",
        "t^2": "t^{2}",
        "z3 t": "z_{3} t",
        "z3 t^2": "z_{3} t^{2}",
        "exp(-t z3)": "e^{-t z_{3}}",
        "exp(-z3^2)": "e^{-z_{3}^{2}}",
    }
    for t_name, l_name in pairs.items():
        assert latex[text.index(t_name)] == l_name
    assert text[:3] == ["1", "z0", "z1"]  # 0-based indices, bias first


def test_custom_variable_names():
    lib = Library([TimeTimesState((1,)), ExpNegTimeState()], n_state=2)
    assert lib.get_feature_names(state_names=["a", "b"], time_name="s") == [
        "a s",
        "b s",
        "exp(-s a)",
        "exp(-s b)",
    ]
    with pytest.raises(ValueError, match="state_names has 1"):
        lib.get_feature_names(state_names=["a"])


def test_transform_values_by_hand(data):
    z, t = data
    lib = Library.reference(4)
    theta = lib.transform(z, t)
    col = {name: theta[:, k] for k, name in enumerate(lib.get_feature_names())}
    expected = {
        "1": np.ones(7),
        "z2": z[:, 2],
        "z0^2": z[:, 0] ** 2,
        "z1 z3^2": z[:, 1] * z[:, 3] ** 2,
        "z0 z2 z3": z[:, 0] * z[:, 2] * z[:, 3],
        "z1^3": z[:, 1] ** 3,
        "t": t,
        "t^2": t**2,
        "z3 t": t * z[:, 3],
        "z2 t^2": t**2 * z[:, 2],
        "exp(-t z1)": np.exp(-t * z[:, 1]),
        "exp(-z3^2)": np.exp(-(z[:, 3] ** 2)),
    }
    for name, value in expected.items():
        np.testing.assert_allclose(col[name], value, rtol=1e-14, err_msg=name)


def test_polynomial_matches_pysindy_order_and_values(data):
    z, _ = data
    ours = Library([Polynomial(3)]).fit(z)
    ref = pysindy.PolynomialLibrary(degree=3).fit(z)
    np.testing.assert_allclose(ours.transform(z), ref.transform(z), rtol=1e-14)
    ref_names = [n.replace("x", "z") for n in ref.get_feature_names()]
    assert ours.get_feature_names() == ref_names


def test_family_transform_aligns_t_with_rows_when_n_equals_d():
    # t of shape (n,) must pair with rows, not broadcast against the d columns
    z, t = np.arange(9.0).reshape(3, 3) / 9, np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(ExpNegTimeState().transform(z, t), np.exp(-t[:, None] * z))
    np.testing.assert_allclose(TimeTimesState((2,)).transform(z, t), t[:, None] ** 2 * z)


@pytest.mark.parametrize("family", FAMILIES, ids=FAMILY_IDS)
def test_numpy_equals_torch(family, data):
    z, t = data
    a = family(z, t)
    b = family(torch.tensor(z), torch.tensor(t))
    assert isinstance(b, torch.Tensor) and b.dtype == torch.float64
    np.testing.assert_allclose(b.numpy(), a, rtol=1e-15, atol=0)


def test_library_numpy_equals_torch_and_float32_input(data):
    z, t = data
    lib = Library.reference(4)
    a = lib.transform(z, t)
    b = lib.transform(torch.tensor(z), torch.tensor(t))
    np.testing.assert_allclose(b.numpy(), a, rtol=1e-15, atol=0)
    c = lib.transform(torch.tensor(z, dtype=torch.float32), 0.25)  # scalar t broadcasts
    assert c.dtype == torch.float64 and c.shape == a.shape


@pytest.mark.gpu
def test_library_cuda_equals_cpu(data):
    z, t = data
    lib = Library.reference(4)
    out = lib.transform(torch.tensor(z, device="cuda"), torch.tensor(t, device="cuda"))
    assert out.device.type == "cuda"
    np.testing.assert_allclose(out.cpu().numpy(), lib.transform(z, t), rtol=1e-13)


def test_spec_roundtrip_through_json(data):
    z, t = data
    lib = Library([Polynomial(2, include_bias=False), TimeTimesState((1, 3)), ExpNegSquare()]).fit(z, t)
    spec = json.loads(json.dumps(lib.spec()))
    back = Library.from_spec(spec)
    assert back == lib
    np.testing.assert_array_equal(back.transform(z, t), lib.transform(z, t))
    assert Library.from_spec(Library.reference(16).spec()).n_terms == 1035


def test_fail_loudly():
    lib = Library.reference(3)
    with pytest.raises(ValueError, match="built for d=3"):
        lib.fit(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="t=None"):
        lib.transform(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"t must be a scalar"):
        lib.transform(np.zeros((2, 3)), np.zeros(5))
    with pytest.raises(ValueError, match="shape \\(n_samples, d\\)"):
        lib.transform(np.zeros(3), 0.0)
    with pytest.raises(ValueError, match="style must be one of"):
        lib.get_feature_names("html")
    with pytest.raises(ValueError, match="unknown term family kind 'Fourier'"):
        Library.from_spec({"format": lib.spec()["format"], "families": [{"kind": "Fourier"}]})
    with pytest.raises(ValueError, match="degree must be an int >= 1"):
        Polynomial(0)
    with pytest.raises(RuntimeError, match="state dimension"):
        _ = Library.reference().n_terms
    # time-free libraries do not need t
    assert Library([Polynomial(2)]).fit_transform(np.ones((2, 3))).shape == (2, 10)


# ----------------------------------------------------------------------- pysindy adapter


def _planted(d=2, n=400, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    t = np.sort(rng.uniform(size=n))  # pysindy.SINDy.fit wants increasing t
    lib = Library.reference(d)
    theta = lib.transform(z, t)
    names = lib.get_feature_names()
    W = np.zeros((lib.n_terms, d))
    W[names.index("z0"), 0] = -1.0
    W[names.index("z1 t"), 0] = 2.0
    W[names.index("t^2"), 1] = 0.5
    W[names.index("exp(-t z1)"), 1] = 1.5
    zdot = theta @ W + 1e-3 * rng.normal(size=(n, d))
    return lib, z, t, theta, zdot, W


def test_pysindy_adapter_time_as_control():
    lib, z, t, theta, zdot, W = _planted()
    feat = PysindyLibrary(Library.reference(), time_column=True)
    opt = pysindy.STLSQ(threshold=0.1, alpha=0.05)
    model = pysindy.SINDy(feature_library=feat, optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(z, t=t, x_dot=zdot, u=t, feature_names=["z0", "z1", "t"])
    np.testing.assert_array_equal(feat.transform(np.c_[z, t]), theta)
    ours = STLSQ(threshold=0.1, alpha=0.05).fit_gram(GramStats.from_arrays(theta, zdot, device="cpu")).coef_
    np.testing.assert_allclose(model.coefficients(), ours, atol=1e-8)
    np.testing.assert_array_equal(model.coefficients() != 0, W.T != 0)
    assert model.get_feature_names() == lib.get_feature_names()
    np.testing.assert_allclose(model.predict(z, u=t), theta @ model.coefficients().T, atol=1e-12)


def test_pysindy_adapter_time_as_state_column():
    lib, z, t, theta, zdot, W = _planted()
    feat = PysindyLibrary(Library.reference(), time_column=True)
    model = pysindy.SINDy(feature_library=feat, optimizer=pysindy.STLSQ(threshold=0.1))
    x, x_dot = np.c_[z, t], np.c_[zdot, np.ones(len(t))]  # t' = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, t=t, x_dot=x_dot)
    coef = model.coefficients()  # (d + 1, p)
    ours = STLSQ(threshold=0.1).fit_gram(GramStats.from_arrays(theta, x_dot, device="cpu")).coef_
    np.testing.assert_allclose(coef, ours, atol=1e-8)
    expected_t_row = np.zeros(lib.n_terms)
    expected_t_row[0] = 1.0  # t' = 1 * "1"
    np.testing.assert_allclose(coef[-1], expected_t_row, atol=1e-12)
    assert "exp(-u z1)" in feat.get_feature_names(["a", "z1", "u"])
    assert feat.get_feature_names(["a", "b", "s"])[-1] == "exp(-b^2)"


def test_pysindy_adapter_errors():
    with pytest.raises(ValueError, match="time_column=False"):
        PysindyLibrary(Library.reference(), time_column=False).fit(np.zeros((3, 2)))
    feat = PysindyLibrary(Library.reference(), time_column=True).fit(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="x has 4 columns"):
        feat.transform(np.zeros((3, 4)))
