"""Common failures in every config-driven entry point are one line on stderr and exit code 2:
a YAML syntax error in the config file, an override whose value is not YAML, a hostile run name,
and a corrupt shard met by the streaming loader in the middle of training."""

from __future__ import annotations

import sys

import pytest

from data_pipeline.shards import prepare_shards
from tests.conftest import REPO, run_entry

ENTRY_POINTS = {
    "train_ae": [sys.executable, str(REPO / "training" / "train_ae.py")],
    "train_dit": [sys.executable, str(REPO / "training" / "train_dit.py")],
    "encode_latents": [sys.executable, str(REPO / "training" / "encode_latents.py")],
    "sindy_job": [sys.executable, str(REPO / "analysis" / "sindy_job.py")],
    "cluster.submit": [sys.executable, "-m", "cluster.submit", "train-ae", "--dry-run"],
}


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_yaml_syntax_error_is_one_line(tmp_path, entry):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: smoke\n  root: [runs\nae:\n  lr: 1e-3\n")  # unclosed flow sequence
    proc = run_entry([*ENTRY_POINTS[entry], "--config", str(bad)], check=False)
    line = _one_error_line(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{bad}:4:3: YAML syntax error: did not find expected ',' or ']'" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


# All entry points share parse_cli/load_config: one training entry point (torch import, seconds)
# and the submit CLI are enough here.
@pytest.mark.parametrize("entry", ["train_ae", "cluster.submit"])
@pytest.mark.parametrize(
    "override, needle",
    [
        ('slurm.setup=["a" b]', "the value is not valid YAML"),
        ("run.name=x$(id>PWNED)", "run.name must be 1-100 characters"),
        ("run.name=..", "run.name must be 1-100 characters"),
    ],
    ids=["not-yaml", "name-subst", "name-dotdot"],
)
def test_bad_override_is_one_line_in_every_entry_point(tmp_path, entry, override, needle):
    proc = run_entry(
        [*ENTRY_POINTS[entry], "--config", str(REPO / "configs" / "smoke.yaml"), f"run.root={tmp_path}", override],
        check=False,
    )
    line = _one_error_line(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert needle in line, line
    assert not any(tmp_path.iterdir()) and not (REPO / "PWNED").exists()


def test_corrupt_shard_mid_training_is_one_line(tmp_path):
    """The streaming loader meets a truncated shard after training has started (the memory loader
    would read everything up front): train_ae stops with the shard's name, not a traceback."""
    shards = tmp_path / "shards"
    prepare_shards(shards, shard_size=256, limit=1024)
    victim = shards / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[:100_000])  # ~ the first 97 of its 256 samples survive
    proc = run_entry(
        [
            sys.executable,
            str(REPO / "training" / "train_ae.py"),
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            f"run.root={tmp_path / 'runs'}",
            f"data.shards={shards}",
            "data.loader=stream",
            "ae.max_steps=40",
        ],
        check=False,
    )
    line = _one_error_line(proc)
    assert line.startswith("train_ae.py: error:") and str(victim) in line, line
    assert not (tmp_path / "runs" / "smoke" / "ae.safetensors").exists()


def test_expected_error_through_the_launch_wrapper_is_one_line_exit_2(tmp_path):
    """`make run` trains through python -m training.launch: a worker's expected error must reach the
    caller as its one line and exit 2, not as accelerate's CalledProcessError traceback and exit 1."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: [x\n")
    proc = run_entry(
        [
            sys.executable,
            "-m",
            "training.launch",
            "--config_file",
            str(REPO / "configs" / "accelerate" / "cpu.yaml"),
            "--num_cpu_threads_per_process",
            "1",
            str(REPO / "training" / "train_ae.py"),
            "--config",
            str(bad),
        ],
        check=False,
    )
    line = _one_error_line(proc)
    assert line.startswith("train_ae.py: error:") and "YAML syntax error" in line, line


def test_make_run_with_a_bad_config_stops_in_one_line(tmp_path):
    """make run reads its paths from the config first: a bad config stops it there, in one line."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: [x\n")
    proc = run_entry(["make", "--no-print-directory", "run", f"CONFIG={bad}", f"PY={sys.executable}"], check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert lines == [
        f"make run: error: {bad}:3:1: YAML syntax error: did not find expected ',' or ']' "
        "(while parsing a flow sequence)"
    ], proc.stderr
    assert "Traceback" not in proc.stderr and "== 1/5" not in proc.stdout
