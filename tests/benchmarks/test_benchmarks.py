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
