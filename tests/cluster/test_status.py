"""``cluster.submit status`` after slurmctld has forgotten a job: the state comes from sacct.

slurmctld keeps a finished job for MinJobAge (300 s in the CI's Slurm), too long to wait in a test.
The forgetting is stood in for by an ``scontrol`` on PATH that answers as slurmctld does for a purged
job; the job itself, sbatch and sacct are the real Slurm's (the CI's has no accounting database, so
sacct reads the job-completion log: ``sacct -c``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import SMOKE, wait_jobs
from tests.conftest import REPO

pytestmark = pytest.mark.slurm


def status(run_root: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.submit", "status", "--config", str(SMOKE), f"run.root={run_root}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_status_falls_back_to_sacct(slurm, tmp_path):
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--job-name=smoke-score", f"--output={tmp_path}/%j.out", "--wrap", "exit 3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    wait_jobs([job_id], timeout=120)
    slurm_dir = tmp_path / "smoke" / "slurm"
    slurm_dir.mkdir(parents=True)
    records = [
        {"job_id": job_id, "stage": "score", "run": "smoke"},
        {"job_id": "999999", "stage": "sindy", "run": "smoke"},
    ]
    (slurm_dir / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    live = status(tmp_path, env).splitlines()
    assert live[1].split()[:3] == [job_id, "score", "FAILED"]  # slurmctld still knows it

    purged = tmp_path / "bin"
    purged.mkdir()
    (purged / "scontrol").write_text('#!/bin/sh\necho "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n')
    (purged / "scontrol").chmod(0o755)
    env["PATH"] = f"{purged}:{env['PATH']}"
    lines = status(tmp_path, env).splitlines()
    assert lines[1].split()[:3] == [job_id, "score", "FAILED"] and "3:0" in lines[1].split()
    assert lines[2].split()[:3] == ["999999", "sindy", "GONE"]  # neither scontrol nor sacct knows it


def test_multinode_pipeline_scores_the_samples():
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.submit", "pipeline", "--config", "configs/multinode.yaml", "--dry-run"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    stages = [line.split()[3] for line in proc.stdout.splitlines() if line.startswith("# ===== stage ")]
    assert stages == ["train-ae", "encode", "train-dit", "score", "sindy"]
