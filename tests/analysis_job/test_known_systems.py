"""The SINDy job on systems whose equations are known, through its public input (an .npz) and with its
default fit settings (configs/smoke.yaml shrinks the bagging; its shorter threshold path is put back here):
Lorenz-63 with exact derivatives, DDIM on Gaussian data with the exact eps*, DDIM on a two-mode mixture; the
pysindy export of the report; bad inputs (one line, exit 2, before any work). Data: benchmarks/known_systems.py."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from benchmarks import known_systems as ks
from configs.sindy import SindyConfig
from tests.analysis_job.conftest import JOB, job_refusal, smoke
from tests.conftest import refusal_line, run_entry

# The default threshold path (configs/sindy.py), which configs/smoke.yaml shortens.
DEFAULT_PATH = (f"sindy.n_thresholds={SindyConfig().n_thresholds}",)
# A term linear in z times a function of t only: "z3", "z3 t^2", or a pure time function / constant.
Z_LINEAR = re.compile(r"^(1|z\d+|t(\^\d+)?|z\d+ t(\^\d+)?)$")


@pytest.fixture(scope="module")
def ray_session():
    """One private Ray instance for the module: the job joins it (ray_utils.connect: already connected)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def run_job(tmp_path, data: dict, *extra: str) -> dict:
    from analysis import sindy_job

    npz = tmp_path / "data.npz"
    ks.save_npz(npz, data)
    sindy_job.main(smoke(tmp_path, f"sindy.trajectories={npz}", "sindy.compare_targets=false", *DEFAULT_PATH, *extra))
    return json.loads((tmp_path / "smoke" / "report" / "equations.json").read_text())


def test_lorenz_exact_terms_and_pysindy_round_trip(tmp_path, ray_session, capsys):
    data = ks.lorenz()
    eq = run_job(tmp_path, data)
    assert eq["coordinate_choice"]["chosen"] == "latent", eq["coordinate_choice"]  # its own coordinates: 7 terms
    for r, truth in zip(eq["dims"], ks.LORENZ_TERMS):
        got = {t["name"]: t["coef"] for t in r["terms"]}
        assert set(got) == set(truth), (r["dim"], got)
        for name, c in truth.items():
            assert abs(got[name] / c - 1) < 1e-3, (name, got[name], c)
        assert len(r["r2_heldout_windows"]) == 5 and all(w["r2_heldout"] > 0.999999 for w in r["r2_heldout_windows"])
    assert (
        "the mixture family is left out of the library: " in (tmp_path / "smoke" / "report" / "report.md").read_text()
    )

    from analysis.sindy.export import load_pysindy, xi_from_report
    from analysis.sindy.library import Library

    model = load_pysindy(tmp_path / "smoke" / "report")
    capsys.readouterr()
    model.print()
    printed = capsys.readouterr().out.splitlines()
    md = (tmp_path / "smoke" / "report" / "report.md").read_text()
    for j, line in enumerate(printed):  # one formatter: pysindy prints the report's own right-hand sides
        assert f"dz{j}/dt = {line.split(' = ', 1)[1]}" in md
    # The usage names this report's own folder (runs/<name>/report links to the latest of them).
    assert "## Use the equations" in md and re.search(r'model = load_pysindy\("runs/smoke/reports/[0-9a-f]{12}"\)', md)
    assert "the states are the normalised latent's own coordinates" in md
    lib = Library.from_spec(eq["library"])
    z, t = data["trajectories"][0], data["t"]
    pred = model.predict(z, u=t[:, None])
    assert np.max(np.abs(pred - lib.transform(z, t) @ xi_from_report(eq).T)) < 1e-10
    sim = model.simulate(z[0], t=t[:101], u=lambda s: np.array([s]))
    assert np.max(np.abs(sim - z[:101])) < 1e-3 * np.max(np.abs(z[:101]))


@pytest.mark.slow
def test_gaussian_ddim_is_linear_in_z(tmp_path, ray_session):
    # With a dense Sigma the true drift couples all 16 coordinates (17 affine terms x 5 time functions = 85 per
    # dimension, over the budget of 30); along the dynamics' linear modes (Sigma's eigenvectors) it is uncoupled,
    # and sindy.coordinates=auto must find that, and keep it because it is both sparser and better held out.
    data = ks.gaussian_ddim(n=150)
    eq = run_job(tmp_path, data)
    choice = eq["coordinate_choice"]
    assert choice["chosen"] == "modes", choice
    for r in eq["dims"]:
        bad = [t["name"] for t in r["terms"] if not Z_LINEAR.match(t["name"])]
        assert not bad, (r["dim"], bad)
        assert r["r2_heldout"] >= 0.999 and r["n_terms"] <= eq["term_budget"], (r["dim"], r["r2_heldout"], r["n_terms"])
    # the modes are Sigma's eigenvectors (up to order and sign), saved beside the report
    from safetensors.numpy import load_file

    c = load_file(str(tmp_path / "smoke" / "report" / "coordinates.safetensors"))["components"]
    _, sigma = ks.gaussian_params(16, 0)
    off = c @ sigma @ c.T
    assert np.max(np.abs(off - np.diag(np.diag(off)))) < 1e-8 * np.max(np.abs(off))
    assert "modes" in (tmp_path / "smoke" / "report" / "report.md").read_text()


@pytest.mark.slow
def test_mixture_ddim_within_budget(tmp_path, ray_session):
    eq = run_job(tmp_path, ks.mixture_ddim(n=150))
    for r in eq["dims"]:
        assert r["n_terms"] <= 30 and r["r2_heldout"] >= 0.99, (r["dim"], r["n_terms"], r["r2_heldout"])


def test_missing_npz_is_file_not_found_in_one_line(tmp_path):
    proc = run_entry(
        [sys.executable, JOB, *smoke(tmp_path, f"sindy.trajectories={tmp_path / 'missing.npz'}")],
        check=False,
        timeout=300,
    )
    line = refusal_line(proc)
    assert "missing.npz: file not found" in line and "sampler drift" not in line


def test_bad_npz_inputs_are_one_line(tmp_path, capsys):
    data = ks.lorenz(n=4, steps=20)
    good = tmp_path / "good.npz"
    ks.save_npz(good, data)
    wrong = tmp_path / "wrong.npz"
    ks.save_npz(wrong, {**data, "velocities": data["velocities"][:, :-1]})
    assert "'velocities' must have the shape" in job_refusal(smoke(tmp_path, f"sindy.trajectories={wrong}"), capsys)
    states = tmp_path / "states.npz"
    ks.save_npz(states, {k: v for k, v in data.items() if k != "velocities"})
    assert "sindy.target=central_diff" in job_refusal(smoke(tmp_path, f"sindy.trajectories={states}"), capsys)
    assert "unknown family 'fourier'" in job_refusal(
        smoke(tmp_path, f"sindy.trajectories={good}", "sindy.library.families=[polynomial,fourier]"), capsys
    )
    assert "sindy.coordinates must be auto | latent | modes" in job_refusal(
        smoke(tmp_path, f"sindy.trajectories={good}", "sindy.coordinates=pca"), capsys
    )
    assert "is [mixture] only, but" in job_refusal(
        smoke(tmp_path, f"sindy.trajectories={good}", "sindy.library.families=[mixture]"), capsys
    )
    assert "sindy.term_budget must be > 0" in job_refusal(
        smoke(tmp_path, f"sindy.trajectories={good}", "sindy.term_budget=0"), capsys
    )
    assert "outside the grammar" in job_refusal(
        smoke(
            tmp_path,
            f"sindy.trajectories={good}",
            "sindy.library.families=[terms]",
            "sindy.library.terms=[__import__(0)]",
        ),
        capsys,
    )
    assert "uses z7" in job_refusal(
        smoke(tmp_path, f"sindy.trajectories={good}", "sindy.library.families=[terms]", "sindy.library.terms=[z7]"),
        capsys,
    )
    assert "sindy.poor_r2 must be <= 1" in job_refusal(smoke(tmp_path, "sindy.poor_r2=7"), capsys)
    assert "sindy.threshold_tol must be in 0..1" in job_refusal(smoke(tmp_path, "sindy.threshold_tol=5"), capsys)
