"""The benchmark scripts run end to end (tiny sizes) and write what they claim; no timing is asserted,
but the SINDy speed-up must compare like with like (equal n, equal coefficients)."""

from __future__ import annotations

import json

import pytest

from benchmarks import run_all


def _check(payload: dict) -> None:
    # (The baseline's ratio is its median over itself, 1.0 by construction: nothing to assert there.)
    assert payload["rows"]
    for r in payload["rows"]:
        assert r["median"] > 0 and r["min"] <= r["median"] <= r["max"]
        assert "FAILS" not in r["check"] and "DIFFERS" not in r["check"]


def _check_sindy(payload: dict) -> None:
    """The quoted speed-up compares pysindy and the Gram path on the same samples, whose coefficients
    agree; a row at another n is labelled as not comparable (the defect of an earlier table)."""
    base, same_n, *rest = payload["rows"]
    assert same_n["config"]["n"] == base["config"]["n"], "the speed-up must be measured at equal n"
    diff = float(same_n["check"].split("= ")[1].split(",")[0])
    assert diff < 1e-8 and "support equal" in same_n["check"], same_n["check"]
    assert (
        f"{same_n['ratio']:.1f}x pysindy per sample at equal n = {base['config']['n']:,}"
        in payload["targets"][0]["measured"]
    )
    for r in rest:
        assert r["config"]["n"] != base["config"]["n"] and "not like for like" in r["check"]


def test_run_all_quick(mnist_shards, tmp_path):
    results = run_all.main(["--quick", "--shards", str(mnist_shards), "--out-dir", str(tmp_path)])
    assert [r["benchmark"] for r in results] == ["data", "train_conv", "sampling_conv", "sampling_vae16", "sindy"]
    for r in results:
        _check(json.loads((tmp_path / f"{r['benchmark']}.json").read_text()))
    _check_sindy(json.loads((tmp_path / "sindy.json").read_text()))
    assert len(json.loads((tmp_path / "summary.json").read_text())) == 5


@pytest.mark.gpu
def test_gpu_variants_match_plain(tmp_path):
    """On a GPU: bf16/compile/CUDA-graph variants run and their trajectories match the plain sampler's."""
    from benchmarks import bench_sampling, bench_train

    _check(bench_sampling.main(["--kind", "vae16", "--repeats", "1", "--out", str(tmp_path / "s.json")]))
    _check(
        bench_train.main(["--steps", "2", "--repeats", "1", "--large-batch", "4096", "--out", str(tmp_path / "t.json")])
    )


@pytest.mark.parametrize("h", [0.0, 0.3])
def test_empirical_denoiser_is_the_mixture_of_its_points(h):
    """bench_window_costs' empirical denoiser is GaussianMixtureEps with a component h^2 I at every point, written
    apart only for speed: the two agree at every noise level, and with one point it is the point's exact
    posterior mean (x + c (z - a x), c = a h^2 / (a^2 h^2 + s^2))."""
    import numpy as np

    from analysis.sindy.mixture import GaussianMixtureEps
    from benchmarks.bench_window_costs import EmpiricalDenoiser

    rng = np.random.default_rng(0)
    pts, z = rng.standard_normal((7, 3)), rng.standard_normal((5, 3))
    a, s = np.array([0.1, 0.6, 0.99]), np.sqrt(1 - np.array([0.1, 0.6, 0.99]) ** 2)
    ours = EmpiricalDenoiser(pts, a, s, h)
    mix = GaussianMixtureEps(np.full(7, 1 / 7), pts, np.stack([h**2 * np.eye(3)] * 7))
    for k in range(3):
        np.testing.assert_allclose(ours(z, k), mix.eps(z, a[k], s[k]), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(ours(z, k, chunk_bytes=8 * 7 * 2), ours(z, k), rtol=1e-12)  # rows in chunks of 2
        one = EmpiricalDenoiser(pts[:1], a, s, h)
        c = a[k] * h**2 / (a[k] ** 2 * h**2 + s[k] ** 2)
        x0 = pts[0] + c * (z - a[k] * pts[0])
        np.testing.assert_allclose(one(z, k), (z - a[k] * x0) / s[k], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="bandwidth"):
        EmpiricalDenoiser(pts, a, s, -1.0)
