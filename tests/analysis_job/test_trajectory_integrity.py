"""Trajectory blocks are checked against their manifest on reuse: the job regenerates a truncated
block (and the report comes out the same), a user-given manifest over a bad block is one line, exit 2."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from configs.io import file_sha256
from tests.analysis_job.conftest import JOB, copy_run, smoke
from tests.conftest import refusal_line, run_entry

# The blocks are what is checked here: one coordinate system and no bagging keep each of the three jobs short.
LEAN = ("sindy.ray_address=local", "sindy.coordinates=latent", "sindy.n_bootstrap=0")


def _without_timings(x):
    """equations.json less its wall-clock figures ("seconds" of the validation and mixture views)."""
    if isinstance(x, dict):
        return {k: _without_timings(v) for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [_without_timings(v) for v in x]
    return x


def _equations(run_dir) -> dict:
    eq = json.loads((run_dir / "report" / "equations.json").read_text())
    eq.pop("stage_times"), eq.pop("created")  # wall-clock seconds, timestamp
    return _without_timings(eq)


@pytest.mark.slow
def test_bad_blocks_are_regenerated_by_the_job_and_refused_when_given(trained_run, tmp_path):
    root = copy_run(trained_run, tmp_path / "job")
    run_dir = root / "smoke"
    job = [sys.executable, JOB, *smoke(root, *LEAN)]
    run_entry(job)
    first = _equations(run_dir)
    rollouts = dict(np.load(run_dir / "report" / "rollouts.npz"))
    (folder,) = (run_dir / "sindy" / "trajectories").iterdir()
    block = sorted(folder.glob("block-*.safetensors"))[-1]
    digest, data = file_sha256(block), block.read_bytes()

    # A truncated block under its manifest: found on the rerun, regenerated with one warning.
    block.write_bytes(data[: len(data) - 4096])
    proc = run_entry(job)
    warned = [ln for ln in proc.stderr.splitlines() if "warning" in ln]
    assert len(warned) == 1 and str(block) in warned[0] and "truncated or modified" in warned[0], proc.stderr[-3000:]
    assert file_sha256(block) == digest  # the same seeded block, bit for bit
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [b["sha256"] for b in manifest["blocks"] if b["file"] == block.name] == [digest]
    assert _equations(run_dir) == first
    again = np.load(run_dir / "report" / "rollouts.npz")
    for k, v in rollouts.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)
    assert "1 failed their check on reuse" in (run_dir / "report" / "report.md").read_text()

    # The same damage in trajectories passed in by the user cannot be repaired there: one line, exit 2.
    user = copy_run(trained_run, tmp_path / "user")
    given = [
        sys.executable,
        JOB,
        *smoke(user, *LEAN, f"sindy.trajectories={folder / 'manifest.json'}"),
    ]
    for damaged in (data[: len(data) - 4096], data[:100] + bytes([data[100] ^ 1]) + data[101:]):
        block.write_bytes(damaged)
        proc = run_entry(given, check=False, timeout=180)
        line = refusal_line(proc)
        assert "sindy: Ray" not in proc.stdout, proc.stdout[-2000:]  # refused before Ray started
        assert f"trajectory block {block}" in line and "truncated or modified" in line, line
    assert not (user / "smoke" / "sindy").exists()
    block.write_bytes(data)  # intact again: accepted as given
    run_entry(given)
    assert (user / "smoke" / "report" / "equations.json").is_file()
