"""The training stages take the run folder's lock before their first write (training/stage.py start_stage): a
second train_ae on a folder another job trains in stops with one line naming the holder and exit code 2."""

from __future__ import annotations

import sys

from data_pipeline.shards import prepare_shards
from tests.configs.test_lock import hold_in_child
from tests.conftest import REPO, run_entry


def test_second_train_ae_on_one_folder_stops_naming_the_holder(tmp_path):
    shards = tmp_path / "shards"
    prepare_shards(shards, shard_size=256, limit=512)
    run = tmp_path / "runs" / "smoke"
    child = hold_in_child(run, "ae")
    try:
        proc = run_entry(
            [
                sys.executable,
                str(REPO / "training" / "train_ae.py"),
                "--config",
                str(REPO / "configs" / "smoke.yaml"),
                f"run.root={tmp_path / 'runs'}",
                f"data.shards={shards}",
                "ae.max_steps=5",
            ],
            check=False,
        )
    finally:
        child.kill()
        child.wait()
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.strip().splitlines() if "error:" in line]
    assert len(errors) == 1 and f"pid {child.pid}" in errors[0] and "stage ae is running" in errors[0], proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [".locks"]  # no config, no TensorBoard, no checkpoint
    # With the holder gone, the same command trains (and reports the stale lock it took over).
    proc = run_entry(
        [
            sys.executable,
            str(REPO / "training" / "train_ae.py"),
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            f"run.root={tmp_path / 'runs'}",
            f"data.shards={shards}",
            "ae.max_steps=5",
        ]
    )
    assert f"pid {child.pid}" in proc.stderr and "no longer running" in proc.stderr
    assert (run / "ae.safetensors").is_file()
