"""The job under a real Ray head: `ray job submit` against `ray start --head`, and `ray submit` with the
local-provider cluster launcher over ssh on loopback (cluster/ray/local.yaml; sshd from setup_sshd.sh).

Each test's head gets free ports and its own --temp-dir; it is stopped by PID (kill_marked), never by
`ray stop`, which would stop every Ray process on this shared machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.analysis_job.conftest import JOB, copy_run, kill_marked, smoke
from tests.conftest import REPO, free_port, run_entry

RAY = str(Path(sys.executable).parent / "ray")
# Ray 2.60 enables token auth for a head started while ~/.ray/auth_token exists; its CLI clients only
# send the token when told to.
AUTH = {"RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").is_file() else {}


def _report_ok(run_dir: Path) -> None:
    for name in ("report.md", "equations.json", "equations.tex", "samples_vs_sindy.png", "pareto.png"):
        assert (run_dir / "report" / name).is_file(), name
    eq = json.loads((run_dir / "report" / "equations.json").read_text())
    assert len(eq["dims"]) == 16 and all("r2_heldout" in r for r in eq["dims"])


@pytest.mark.slow
def test_ray_job_submit(trained_run, tmp_path):
    root = copy_run(trained_run, tmp_path / "r")
    port, dash, agent = free_port(), free_port(), free_port()
    temp = f"/tmp/rj{uuid.uuid4().hex[:8]}"  # short: Ray's unix socket paths must stay < 108 bytes
    try:
        run_entry(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                f"--dashboard-port={dash}",
                # Not Ray's fixed default 52365: another Ray on this machine (a job's private ray.init, a
                # parallel test) may hold it, and the agent that takes submissions would never serve.
                f"--dashboard-agent-listen-port={agent}",
                "--num-cpus=2",
                "--disable-usage-stats",
                f"--temp-dir={temp}",
                "--dashboard-host=127.0.0.1",
            ],
            timeout=120,
            env=AUTH,
        )
        address = f"http://127.0.0.1:{dash}"
        submit = [RAY, "job", "submit", "--address", address, "--", sys.executable, JOB, *smoke(root)]
        proc = _submit_when_an_agent_is_up(submit)
        assert "joined" in proc.stdout and "sindy: report" in proc.stdout, proc.stdout[-2000:]
        _report_ok(root / "smoke")
    finally:
        kill_marked(temp)


def _submit_when_an_agent_is_up(submit: list[str], wait_s: float = 120) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head answers "No available agent to submit job, please try again later":
    the dashboard agent of a head just started registers some seconds after `ray start` returns (longer on a
    loaded machine), and until then the head refuses submissions without having accepted the job."""
    deadline = time.time() + wait_s
    while True:
        proc = run_entry(submit, timeout=400, env=AUTH, check=False)
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, f"{submit} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def sshd():
    script = Path(__file__).with_name("setup_sshd.sh")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"sshd for the local-provider cluster could not be started: {proc.stderr.strip()[-300:]}")
    yield


@pytest.mark.slow
def test_ray_submit_local_provider(sshd, trained_run, tmp_path):
    root = copy_run(trained_run, tmp_path / "r")
    port = free_port()
    temp = f"/tmp/rs{uuid.uuid4().hex[:8]}"
    # The shipped YAML with this test's port and temp dir, and without its `ray stop` (see its header).
    text = (REPO / "cluster" / "ray" / "local.yaml").read_text()
    assert "  - ray stop\n" in text and "--port=6379" in text
    text = text.replace("  - ray stop\n", "").replace(
        "--port=6379", f"--port={port} --temp-dir={temp} --include-dashboard=false"
    )
    text = text.replace("cluster_name: latent-sindy-local", f"cluster_name: ci-{port}")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(text)
    try:
        run_entry([RAY, "up", "-y", "--no-config-cache", str(cluster)], timeout=180)
        proc = run_entry(
            [
                RAY,
                "submit",
                str(cluster),
                str(REPO / "analysis" / "sindy_job.py"),
                *smoke(root),
                f"sindy.ray_address=127.0.0.1:{port}",
            ],
            timeout=400,
        )
        assert f"joined 127.0.0.1:{port}" in proc.stdout + proc.stderr
        _report_ok(root / "smoke")
    finally:
        kill_marked(temp)
