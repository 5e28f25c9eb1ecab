"""The report's "Use the equations" section: its three lines run against a report folder written here (a tiny
equations.json of a known linear system) and reproduce the system's solution; the coordinates sentence."""

from __future__ import annotations

import json
import re

import numpy as np

from analysis.report.usage import usage_lines
from analysis.sindy.library import Library

RATE = np.array([-2.0, 0.5])  # dz_i/dt = RATE_i z_i


def write_report(folder, rate=RATE) -> Library:
    """A report folder whose equations.json holds dz_i/dt = rate_i z_i in the reference library of d = len(rate)."""
    lib = Library.reference(len(rate))
    names = lib.get_feature_names("text")
    dims = []
    for i, c in enumerate(rate):
        k = names.index(f"z{i}")
        terms = [{"index": k, "name": names[k], "coef": float(c)}]
        dims.append({"dim": i, "terms": terms, "unrestricted": {"terms": terms}})
    eq = {
        "format": "latent-sindy.equations/1",
        "library": lib.spec(),
        "n_terms": len(names),
        "term_names": names,
        "dims": dims,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "equations.json").write_text(json.dumps(eq))
    return lib


def code_of(lines: list[str]) -> str:
    text = "\n".join(lines)
    return re.search(r"```python\n(.*?)\n```", text, re.S).group(1)


def test_the_three_lines_load_and_simulate_the_report(tmp_path):
    lib = write_report(tmp_path / "report")
    T = 20
    lines = usage_lines(str(tmp_path / "report"), lib.uses_time, T, "the 2 latent coordinates themselves")
    code = code_of(lines)
    assert len(code.splitlines()) == 3
    state_T = np.array([1.0, -0.5])
    scope = {"state_T": state_T}
    exec(code, scope)  # noqa: S102 - the report's own example, run as a user would
    states = scope["states"]
    t = np.linspace(1, 0, T + 1)
    exact = state_T * np.exp(RATE * (t[:, None] - 1))  # from t = 1 back to t = 0
    assert states.shape == (T + 1, 2)
    np.testing.assert_allclose(states, exact, rtol=1e-4, atol=1e-6)
    assert "latent's own coordinates" in "\n".join(lines)


def test_mode_coordinates_say_where_c_and_m_are(tmp_path):
    lines = usage_lines("runs/x/report", False, 10, "the 2 linear modes ...; C (rows) and m in coordinates.safetensors")
    text = "\n".join(lines)
    assert "u = C (z - m)" in text and "coordinates.safetensors" in text and "u=lambda" not in text
    pca = "\n".join(
        usage_lines("runs/x/report", True, 10, "the first 2 principal components (loadings in pca.safetensors)")
    )
    assert "pca.safetensors" in pca and "u=lambda s: np.array([s])" in pca


def test_load_coordinates_maps_latents_and_simulates_in_them(tmp_path):
    """A report in mode coordinates: the user's latent z_T goes in through coords.states, the simulated modes come
    back through coords.inverse and match the latent solution z(t) = C^T u(t) + m."""
    from analysis.job.coordinate_choice import save_coordinates
    from analysis.report.usage import load_coordinates
    from analysis.sindy.coordinates import Coordinates

    folder = tmp_path / "report"
    lib = write_report(folder)
    assert load_coordinates(folder).kind == "latent" and np.array_equal(load_coordinates(folder).components, np.eye(2))
    angle = 0.3
    c = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    m = np.array([0.1, -0.2])
    save_coordinates(Coordinates("modes", m, c), folder / "coordinates.safetensors")
    coords = load_coordinates(folder)
    assert coords.kind == "modes"
    np.testing.assert_array_equal(coords.components, c)
    np.testing.assert_array_equal(coords.mean, m)

    T = 20
    lines = usage_lines(str(folder), lib.uses_time, T, "...; C (rows) and m in coordinates.safetensors")
    assert f'coords = load_coordinates("{folder}")' in "\n".join(lines)
    z_T = np.array([0.7, 0.4])
    scope = {"state_T": coords.states(z_T)}
    exec(code_of(lines), scope)  # noqa: S102 - the report's own example
    z = coords.inverse(scope["states"])
    t = np.linspace(1, 0, T + 1)
    u_exact = coords.states(z_T) * np.exp(RATE * (t[:, None] - 1))
    np.testing.assert_allclose(z, u_exact @ c + m, rtol=1e-4, atol=1e-6)


def test_damaged_coordinates_file_is_one_line(tmp_path):
    import pytest

    from analysis.report.usage import load_coordinates
    from configs.errors import UserError

    folder = tmp_path / "report"
    write_report(folder)
    (folder / "coordinates.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="coordinates.safetensors is not a safetensors file") as e:
        load_coordinates(folder)
    assert "\n" not in str(e.value)
