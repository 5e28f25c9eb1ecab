"""The DiT-queried training rows and the sensitivity weighting through the real job on the smoke run (CPU)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest

from tests.analysis_job.conftest import JOB, copy_run, smoke
from tests.conftest import run_entry


def test_queries_and_sensitivity_weighting(trained_run, mnist_shards, tmp_path):
    root = copy_run(trained_run, tmp_path)
    run_dir = root / "smoke"
    shutil.copytree(trained_run / "smoke" / "latents", run_dir / "latents")  # the forward queries noise them
    common = smoke(
        root,
        "sindy.ray_address=local",
        f"data.shards={mnist_shards}",
        "sindy.fit_space=eps",
        "sindy.mixture_components=[1]",
        "sindy.mixture_samples=2000",
        "sindy.n_bootstrap=0",
        f"dit.classifier={tmp_path / 'none.safetensors'}",
    )
    run_entry([sys.executable, JOB, *common, "sindy.queries=40", "sindy.weighting=sensitivity"])
    eq = json.loads((run_dir / "report" / "equations.json").read_text())
    manifests = list((run_dir / "sindy" / "queries").glob("*/manifest.json"))
    assert len(manifests) == 1
    m = json.loads(manifests[0].read_text())
    assert m["n_trajectories"] == 40 and "forward-noised" in m["rows"] and len(m["blocks"]) == 2  # blocks of 32
    sens = eq["sensitivity"]
    assert len(sens["gain"]) == eq["timesteps"] and all(g > 0 for g in sens["gain"])
    assert np.mean(sens["weights"]) == pytest.approx(1.0) and sens["target"] == "eps"
    assert {"queries", "sensitivity"} <= set(eq["stage_times"])
    fit_dirs = sorted((run_dir / "sindy" / "fits").iterdir())
    # Without the levers the same data fits into other folders (the levers are part of the fit key): one more per
    # coordinate candidate.
    run_entry([sys.executable, JOB, *common])
    assert len(sorted((run_dir / "sindy" / "fits").iterdir())) == 2 * len(fit_dirs)
    y = json.loads((run_dir / "report" / "equations.json").read_text())["yardsticks"]
    assert "no MNIST classifier" in y["skipped"]["images"] and y["rows"][-1]["kind"] == "equations"


def test_queries_with_a_finite_difference_target_are_refused(trained_run, tmp_path):
    root = copy_run(trained_run, tmp_path)
    proc = run_entry(
        [sys.executable, JOB, *smoke(root, "sindy.ray_address=local", "sindy.queries=10", "sindy.target=central_diff")],
        check=False,
    )
    assert proc.returncode == 2 and "finite difference" in proc.stderr and "Traceback" not in proc.stderr
