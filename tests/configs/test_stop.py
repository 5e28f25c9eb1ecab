"""configs/stop.py and configs.io.remove_temporaries: the pieces the SINDy job's preemption uses (issue 19)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from configs.io import remove_temporaries
from configs.stop import Stopped, StopSignals
from tests.conftest import REPO

CHILD = """
import sys, time
from configs.stop import Stopped, StopSignals
stops = StopSignals().install()
print("ready", flush=True)
try:
    with stops.deferred():
        for _ in range(50):  # a blocking call that must not be interrupted: the signal waits for its end
            time.sleep(0.1)
        print("deferred part finished", flush=True)
    print("not reached", flush=True)
except Stopped as e:
    print("stopped by", e.name, flush=True)
    sys.exit(75)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_inside_a_deferred_call_is_raised_when_it_returns(sig) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    child.send_signal(sig)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 75
    assert out.split("\n")[:2] == ["deferred part finished", f"stopped by {sig.name}"]


def test_outside_a_deferred_call_the_signal_raises_at_once() -> None:
    stops = StopSignals()
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        stops.install()
        with pytest.raises(Stopped, match="SIGUSR1"):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_remove_temporaries_takes_only_dot_tmp_leftovers(tmp_path) -> None:
    (tmp_path / "fits" / "k").mkdir(parents=True)
    keep = [tmp_path / "fits" / "k" / "dim-000.json", tmp_path / "fits" / "k" / "tmp-not-ours.json"]
    for f in keep:
        f.write_text("{}")
    junk = [tmp_path / "fits" / "k" / ".tmp-dim-001.json.123", tmp_path / ".tmp-report.9"]
    junk[0].write_text('{"dim"')
    junk[1].mkdir()
    (junk[1] / "plot.png").write_bytes(b"x")
    assert sorted(remove_temporaries(tmp_path)) == sorted(junk)
    assert all(f.exists() for f in keep) and not any(f.exists() for f in junk)
    assert remove_temporaries(tmp_path / "missing") == []


def test_remove_temporaries_of_one_writer_at_top_level(tmp_path) -> None:
    """In a run folder other stages write into, only the named writer's top-level temporaries go."""
    (tmp_path / "checkpoints").mkdir()
    others = [tmp_path / "checkpoints" / ".tmp-report.7", tmp_path / ".tmp-dit.safetensors.7"]
    ours = [tmp_path / ".tmp-report.7", tmp_path / ".tmp-report.8"]
    for f in others + ours:
        f.write_text("x")
    ours[1].unlink()
    ours[1].symlink_to("reports/abc")  # a link left by an interrupted switch: removed, not followed
    assert sorted(remove_temporaries(tmp_path, ".tmp-report.*", recursive=False)) == sorted(ours)
    assert all(f.exists() for f in others) and not any(os.path.lexists(f) for f in ours)
    with pytest.raises(ValueError):
        remove_temporaries(tmp_path, "report.*")
