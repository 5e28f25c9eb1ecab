"""The smoke flow as chained Slurm jobs (train-ae -> encode -> train-dit -> score, afterok), then the
equation-discovery driver on a Ray cluster started inside a Slurm job."""

from __future__ import annotations

import json

import pytest

from tests.cluster.conftest import log_text, recorded_jobs, smoke_args, submit, wait_jobs
from tests.conftest import REPO

pytestmark = pytest.mark.slurm

# As in tests/analysis_job: a 30-step DiT under the linear schedule keeps smoke trajectories O(1).
FLOW = ("dit.schedule=linear", "dit.eval_samples=0")


@pytest.fixture(scope="module")
def pipeline_run(slurm, tmp_path_factory, mnist_shards):
    root = tmp_path_factory.mktemp("slurm-pipeline")
    out = submit(
        "pipeline", "--stages", "train-ae,encode,train-dit,score", *smoke_args(root, mnist_shards, *FLOW)
    ).stdout
    run = root / "smoke"
    jobs = recorded_jobs(run)
    states = wait_jobs([j["job_id"] for j in jobs], 600, run / "slurm")
    return root, run, jobs, states, out


def test_pipeline_chains_the_stages_and_completes(pipeline_run):
    _, run, jobs, states, out = pipeline_run
    assert [j["stage"] for j in jobs] == ["train-ae", "encode", "train-dit", "score"]
    assert [j["dependency"] for j in jobs] == [None, jobs[0]["job_id"], jobs[1]["job_id"], jobs[2]["job_id"]]
    assert set(states.values()) == {"COMPLETED"}, (states, log_text(run))
    for name in (
        "config.yaml",
        "ae.safetensors",
        "latent_stats.safetensors",
        "dit.safetensors",
        "dit_ema.safetensors",
        "dit.json",
    ):
        assert (run / name).is_file(), name
    assert json.loads((run / "dit.json").read_text())["steps"] == 30
    assert json.loads((run / "quality.json").read_text())["quality"] is None  # FLOW: dit.eval_samples=0
    assert (run / "tb" / "dit").is_dir() and "TensorBoard: tensorboard --logdir" in out
    for j in jobs:
        assert (run / "slurm" / f"smoke-{j['stage']}-{j['job_id']}.out").is_file()


def test_ray_on_slurm_runs_the_equation_discovery(pipeline_run, mnist_shards):
    if not (REPO / "analysis" / "sindy_job.py").is_file():
        pytest.skip("analysis/sindy_job.py not present")
    root, run, _, states, _ = pipeline_run
    assert set(states.values()) == {"COMPLETED"}
    submit("sindy", "slurm.cpus_per_task=2", *smoke_args(root, mnist_shards, *FLOW))
    job = recorded_jobs(run)[-1]
    assert job["stage"] == "sindy"
    state = wait_jobs([job["job_id"]], 600, run / "slurm")
    log = log_text(run)
    assert state == {job["job_id"]: "COMPLETED"}, log[-5000:]
    assert "Ray cluster up: 1 nodes" in log and "stopping Ray" in log
    for name in ("report.md", "equations.json"):
        assert (run / "report" / name).is_file(), name
    # The driver joined the Slurm job's Ray cluster rather than starting its own instance.
    assert "joined $RAY_ADDRESS=" in (run / "report" / "report.md").read_text() + log
