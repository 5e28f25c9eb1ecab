"""Which Ray the SINDy job uses (analysis/ray_utils.connect): only a cluster the user named.

Every connection is made in a fresh subprocess (ray.init is once per process) with real Ray
instances: a private ray.init() of another process and a `ray start --head` of this test, each
with its own --temp-dir and ports, stopped by PID (kill_marked), never by `ray stop`, which would
stop every Ray process on this shared machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from analysis.job.ray_utils import choose_address
from tests.analysis_job.conftest import JOB, copy_run, kill_marked, smoke
from tests.conftest import REPO, free_port, refusal_line, run_entry

RAY = str(Path(sys.executable).parent / "ray")
AUTH = {"RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").is_file() else {}

# Connect as the job does, report where to, disconnect; errors as the job reports them (run_cli).
CONNECT = """
import json, sys
sys.path.insert(0, {repo!r})
from analysis.job import ray_utils
from configs.cli import run_cli
{patch}
def main(argv):
    how = ray_utils.connect(sys.argv[1], 1)
    import ray
    ctx = ray.get_runtime_context()
    print("CONNECTED " + json.dumps({{"how": how, "gcs": ctx.gcs_address, "node": ctx.get_node_id()}}), flush=True)
    ray.shutdown()
run_cli(main)
"""


def _env(**set_: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(set_)
    return env


def connect(address: str, env: dict, patch: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CONNECT.format(repo=str(REPO), patch=patch), address],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def connected(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("CONNECTED "))
    return json.loads(line[len("CONNECTED ") :])


def _port(gcs: str) -> int:
    return int(gcs.rsplit(":", 1)[1])


def test_choose_address_names_only_what_the_user_named():
    assert choose_address("", "", False) == ("local", "")
    assert choose_address("local", "10.0.0.1:6379", False) == ("local", "sindy.ray_address")
    assert choose_address("", "10.0.0.1:6379", False) == ("10.0.0.1:6379", "$RAY_ADDRESS")
    assert choose_address("", "10.0.0.1:6379", True) == ("10.0.0.1:6379", "$RAY_ADDRESS")
    assert choose_address("", "", True) == ("auto", "ray submit")
    assert choose_address("h:1", "10.0.0.1:6379", True) == ("h:1", "sindy.ray_address")


@pytest.fixture(scope="module")
def ray_head():
    """A `ray start --head` of this module: (GCS port, temp dir); stopped by PID afterwards."""
    port = free_port()
    temp = f"/tmp/rc{uuid.uuid4().hex[:8]}"  # short: Ray's unix socket paths must stay < 108 bytes
    try:
        run_entry(
            [
                RAY,
                "start",
                "--head",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={temp}",
            ],
            timeout=180,
            env=AUTH,
        )
        yield port, temp
    finally:
        kill_marked(temp)


@pytest.fixture
def private_init():
    """Another process's private ray.init(), alive until the test ends: its GCS address."""
    temp = f"/tmp/rp{uuid.uuid4().hex[:8]}"
    code = (
        "import sys, ray; ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1]); "
        "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read(); ray.shutdown()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, temp], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        gcs = proc.stdout.readline().strip()
        assert gcs, "the private ray.init() did not start"
        yield gcs
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        kill_marked(temp)


@pytest.mark.slow
def test_unnamed_instances_are_not_joined(ray_head, private_init):
    """With a `ray start` head and another process's ray.init() running, "" starts its own instance."""
    head_port, _ = ray_head
    info = connected(connect("", _env()))
    assert info["how"].startswith("started a private Ray instance"), info
    assert _port(info["gcs"]) not in (head_port, _port(private_init)), (info, head_port, private_init)


@pytest.mark.slow
def test_named_head_is_joined_and_local_overrides_ray_address(ray_head):
    head_port, _ = ray_head
    env = _env(RAY_ADDRESS=f"127.0.0.1:{head_port}", **AUTH)
    joined = connected(connect("", env))
    assert joined["how"] == f"joined $RAY_ADDRESS=127.0.0.1:{head_port}" and _port(joined["gcs"]) == head_port
    again = connected(connect(f"127.0.0.1:{head_port}", _env(**AUTH)))
    assert again["node"] == joined["node"]  # the head's node, by both names
    own = connected(connect("local", env))
    assert own["how"].startswith("started a private Ray instance"), own
    assert _port(own["gcs"]) != head_port and own["node"] != joined["node"]


def test_unreachable_or_malformed_address_fails_in_one_line():
    t0 = time.monotonic()
    line = refusal_line(connect("127.0.0.1:1", _env()))
    assert "no Ray cluster answers at sindy.ray_address=127.0.0.1:1" in line
    line = refusal_line(connect("", _env(RAY_ADDRESS="127.0.0.1:1")))
    assert "no Ray cluster answers at $RAY_ADDRESS=127.0.0.1:1" in line
    assert time.monotonic() - t0 < 90  # two interpreter starts (ray + torch imports); the probes take ms
    assert "is not a Ray address" in refusal_line(connect("http//nope", _env()))


def test_a_port_that_is_not_a_ray_head_gives_up_in_bounded_time():
    """Something answers TCP but is no GCS: ray.init would wait for minutes; the job gives up."""
    srv = socket.create_server(("0.0.0.0", 0))  # every interface: Ray dials this node's IP for 127.0.0.1
    port = srv.getsockname()[1]
    conns: list = []
    threading.Thread(target=lambda: [conns.append(srv.accept()) for _ in range(1000)], daemon=True).start()
    try:
        t0 = time.monotonic()
        proc = connect(f"127.0.0.1:{port}", _env(), patch="ray_utils.JOIN_TIMEOUT_S = 10", timeout=150)
        # Ray logs its connection attempts before giving up; the job's own message is one line, last.
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert "could not join Ray at sindy.ray_address=" in line and "within 10 s" in line, line
        assert time.monotonic() - t0 < 120
    finally:
        srv.close()


def test_job_with_unreachable_address_stops_before_any_stage(trained_run, tmp_path):
    root = copy_run(trained_run, tmp_path)
    proc = run_entry([sys.executable, JOB, *smoke(root, "sindy.ray_address=127.0.0.1:1")], check=False, timeout=180)
    line = refusal_line(proc)
    assert line.startswith("sindy_job.py: error: no Ray cluster answers at sindy.ray_address=127.0.0.1:1"), line
    assert not (root / "smoke" / "sindy").exists()
