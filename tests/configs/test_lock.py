"""One job per run folder and stage (configs/lock.py, issue 19): a second job is told who holds the lock (host,
pid, start time) and stops with exit code 2; the lock of a killed job is stale and taken over."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from configs.lock import StageLocked, acquire_stage_lock
from tests.conftest import REPO, refusal_line

HOLD = "import sys, time; from configs.lock import acquire_stage_lock; acquire_stage_lock(sys.argv[1], sys.argv[2]); print('held', flush=True); time.sleep(300)"


def hold_in_child(run_dir: Path, stage: str) -> subprocess.Popen:
    """A real second process that takes the lock and keeps it until killed."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), stage], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_second_job_is_told_who_holds_the_lock_and_a_killed_holder_is_taken_over(tmp_path, capfd) -> None:
    run = tmp_path / "runs" / "x"
    child = hold_in_child(run, "sindy")
    try:
        with pytest.raises(StageLocked) as info:
            acquire_stage_lock(run, "sindy")
        msg = str(info.value)
        assert f"host {socket.gethostname()} pid {child.pid} (started 20" in msg and "stage sindy" in msg, msg
        assert "\n" not in msg
        # Another stage of the same folder is free.
        with acquire_stage_lock(run, "dit") as other:
            assert other.stale is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The killed job's record stays, but the kernel released its lock: taken over, and said so.
    assert json.loads((run / ".locks" / "sindy.lock").read_text())["pid"] == child.pid
    lock = acquire_stage_lock(run, "sindy")
    assert lock.stale is not None and lock.stale["pid"] == child.pid
    assert f"pid {child.pid}" in capfd.readouterr().err
    assert json.loads((run / ".locks" / "sindy.lock").read_text())["pid"] == os.getpid()
    assert acquire_stage_lock(run, "sindy") is lock  # the same process asking again gets its own lock
    lock.release()
    assert (run / ".locks" / "sindy.lock").read_text() == ""  # a clean exit leaves no holder record
    with acquire_stage_lock(run, "sindy") as again:
        assert again.stale is None


def test_without_flock_the_record_decides(tmp_path, monkeypatch) -> None:
    """File systems without flock (ENOLCK): a dead pid on this host is stale, a live one or another host's holds."""
    import configs.lock as lock_module

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    path = tmp_path / ".locks" / "score.lock"
    path.parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    for record, held in (
        ({"host": here, "pid": dead.pid, "started_utc": "2026-01-01T00:00:00Z"}, False),
        ({"host": here, "pid": os.getppid(), "started_utc": "2026-01-01T00:00:00Z"}, True),
        ({"host": "other-node", "pid": 1, "started_utc": "2026-01-01T00:00:00Z"}, True),
    ):
        path.write_text(json.dumps(record))
        if held:
            with pytest.raises(StageLocked, match=f"host {record['host']} pid {record['pid']}.*delete"):
                acquire_stage_lock(tmp_path, "score")
        else:
            with acquire_stage_lock(tmp_path, "score") as lock:
                assert lock.stale == record


def test_encode_latents_refuses_a_folder_another_job_encodes(tmp_path) -> None:
    """The real entry point: one line naming the holder, exit 2, nothing written."""
    from models.artifacts import save_weights
    from models.autoencoder import build_autoencoder

    run = tmp_path / "runs" / "smoke"
    run.mkdir(parents=True)
    save_weights(build_autoencoder("vae16", 1.0), run / "ae.safetensors")
    (run / "ae.json").write_text(json.dumps({"kind": "vae16", "latent_shape": [16, 1], "kl_weight": 1.0}))
    child = hold_in_child(run, "latents")
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "training/encode_latents.py",
                "--config",
                "configs/smoke.yaml",
                f"run.root={tmp_path / 'runs'}",
                f"data.shards={tmp_path / 'none'}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        child.kill()
        child.wait()
    line = refusal_line(proc)
    assert f"pid {child.pid}" in line and "stage latents is running" in line, line
    assert not (run / "latents").exists()


def test_a_normal_exit_leaves_no_stale_record(tmp_path, capfd) -> None:
    code = "import sys; from configs.lock import acquire_stage_lock; acquire_stage_lock(sys.argv[1], 'ae'); sys.exit(3)"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO)
    assert proc.returncode == 3 and (tmp_path / ".locks" / "ae.lock").read_text() == ""
    with acquire_stage_lock(tmp_path, "ae") as lock:
        assert lock.stale is None
    assert "took over" not in capfd.readouterr().err
