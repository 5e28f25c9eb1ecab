"""Fixtures of the Slurm tests: a real single-node Slurm, submission through the CLI, job polling.

The session fixture ``slurm`` uses a Slurm that already answers ``sinfo``; otherwise it starts one
with .ci/setup_slurm.sh (root only, else the tests are skipped saying why) and stops what it
started at the end of the session with .ci/stop_slurm.sh.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SMOKE = REPO / "configs" / "smoke.yaml"


def _sinfo_ok() -> bool:
    if shutil.which("sinfo") is None:
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and any(s.startswith(("idle", "mixed", "allocated")) for s in proc.stdout.split())


@pytest.fixture(scope="session")
def slurm():
    """A responding single-node Slurm for the session (started here if needed)."""
    if _sinfo_ok():
        yield "running"
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not running and starting it (.ci/setup_slurm.sh) needs root")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / ".ci" / "setup_slurm.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not _sinfo_ok():
        pytest.skip(
            f".ci/setup_slurm.sh could not start Slurm (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
        )
    print(f"\n[slurm fixture] started Slurm in {time.perf_counter() - t0:.1f} s")
    try:
        yield "started"
    finally:
        subprocess.run(["bash", str(REPO / ".ci" / "stop_slurm.sh")], timeout=120)


def submit(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m cluster.submit ARGS`` from the repository root."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.submit", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, f"cluster.submit {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def smoke_args(root: Path, shards: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"run.root={root}", f"data.shards={shards}", *extra]


def recorded_jobs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "slurm" / "jobs.jsonl").read_text().splitlines()]


def job_info(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


def in_queue(job_id: str) -> bool:
    proc = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    return bool(proc.stdout.strip())


def wait_jobs(job_ids: list[str], timeout: float, logs: Path | None = None) -> dict[str, str]:
    """Poll squeue every 0.5 s until the jobs have left the queue; their final JobState."""
    deadline = time.time() + timeout
    while any(in_queue(j) for j in job_ids):
        if time.time() > deadline:
            subprocess.run(["scancel", *job_ids])
            tail = ""
            if logs is not None:
                tail = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(logs.glob("*.out")))
            pytest.fail(f"jobs {job_ids} still queued after {timeout} s\n{tail}")
        time.sleep(0.5)
    return {j: job_info(j).get("JobState", "GONE") for j in job_ids}


def log_text(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*.out")))
