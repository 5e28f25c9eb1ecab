"""Training jobs under a real single-node Slurm: a two-rank gloo group started by the multi-node
template, a partition without GPUs refusing a GPU job before sbatch, and preemption with
`scancel --signal=USR1 --batch` -> checkpoint -> requeue -> resume, bit-exact."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.cluster.conftest import in_queue, job_info, log_text, recorded_jobs, smoke_args, submit, wait_jobs

pytestmark = pytest.mark.slurm


def test_two_task_job_is_a_two_rank_group(slurm, tmp_path, mnist_shards):
    out = submit(
        "train-ae",
        "--nodes",
        "1",
        "--cpu-processes-per-node",
        "2",
        *smoke_args(tmp_path, mnist_shards, "ae.max_steps=12"),
    ).stdout
    run = tmp_path / "smoke"
    (job,) = recorded_jobs(run)
    assert f"job {job['job_id']}" in out and str(run / "slurm") in out
    assert wait_jobs([job["job_id"]], 300, run / "slurm") == {job["job_id"]: "COMPLETED"}
    meta = json.loads((run / "ae.json").read_text())
    assert meta["num_processes"] == 2 and meta["steps"] == 12
    assert len(meta["rank_param_sha256"]) == 2 and meta["rank_param_sha256"][0] == meta["rank_param_sha256"][1]
    log = log_text(run)
    assert "(1 x 2 tasks)" in log and "restart 0" in log and "x 2 processes" in log
    assert (run / "slurm" / f"train-ae-{job['job_id']}.sh").is_file()
    status = submit("status", *smoke_args(tmp_path, mnist_shards)).stdout
    assert job["job_id"] in status and "COMPLETED" in status


def test_gpu_job_on_a_cpu_partition_fails_before_sbatch(slurm, tmp_path, mnist_shards):
    proc = submit("train-dit", "--gpus-per-node", "1", *smoke_args(tmp_path, mnist_shards), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "slurm.gpus_per_node=1" in lines[0] and "at most 0 GPUs per node" in lines[0], (
        proc.stderr
    )
    assert not (tmp_path / "smoke" / "slurm" / "jobs.jsonl").exists()  # nothing was submitted
    proc = submit("train-ae", "--nodes", "3", *smoke_args(tmp_path, mnist_shards), check=False)
    assert proc.returncode == 2 and "slurm.nodes=3" in proc.stderr


def _steps_done(run_dir, total: int) -> int:
    found = re.findall(rf"step (\d+)/{total} ", log_text(run_dir))  # plain progress lines (no TTY)
    return max(map(int, found), default=0)


def test_preempted_job_requeues_resumes_and_matches_an_uninterrupted_run(slurm, tmp_path, mnist_shards):
    total = 150
    args = ("ae.max_steps=150", "ae.checkpoint_every=1000", "ae.log_every=10", "ae.image_every=1000")
    # The interrupted job and the reference share the 2-core node (one task each).
    submit("train-ae", *smoke_args(tmp_path / "cut", mnist_shards, *args))
    submit("train-ae", *smoke_args(tmp_path / "ref", mnist_shards, *args))
    cut, ref = tmp_path / "cut" / "smoke", tmp_path / "ref" / "smoke"
    (job,), (ref_job,) = recorded_jobs(cut), recorded_jobs(ref)
    jid = job["job_id"]

    deadline = time.time() + 240
    while _steps_done(cut, total) < 15:
        assert in_queue(jid) and time.time() < deadline, log_text(cut)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True)
    # The job requeues itself; skip Slurm's requeue delay once it is pending again.
    while job_info(jid).get("JobState") != "PENDING":
        assert time.time() < deadline, (job_info(jid), log_text(cut))
        time.sleep(0.5)
    time.sleep(2)  # a start in the same second as the requeue fails with "Job credential revoked"
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True)
    states = wait_jobs([jid, ref_job["job_id"]], 400, cut / "slurm")
    assert states == {jid: "COMPLETED", ref_job["job_id"]: "COMPLETED"}, (states, log_text(cut))

    log = log_text(cut)
    step = int(re.search(r"checkpointed at step (\d+), exiting for requeue", log).group(1))
    assert 15 <= step < total
    assert "got SIGUSR1" in log and "requeueing job" in log and "restart 1" in log
    assert f"resumed from {cut / 'checkpoints' / 'ae' / f'step_{step:08d}'} at step {step}" in log
    assert job_info(jid).get("Restarts") == "1"
    a, b = load_file(str(cut / "ae.safetensors")), load_file(str(ref / "ae.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after preemption + resume"
    assert json.loads((cut / "ae.json").read_text())["steps"] == total
