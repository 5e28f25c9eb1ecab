"""The config you can see: ``python -m configs show``, the unknown-key message, the entry points' --help."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from configs.errors import UserError
from configs.keys import key_docs
from configs.schema import Config, load_config, to_dict
from tests.conftest import refusal_line

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_show_prints_the_resolved_config_with_docs():
    proc = run("-m", "configs", "show", "--config", "configs/local.yaml", "sindy.n_trajectories=123", "ae.lr=0.01")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # It loads back as YAML and is the resolved config: defaults <- local.yaml <- overrides.
    expected = to_dict(load_config(REPO / "configs/local.yaml", ["sindy.n_trajectories=123", "ae.lr=0.01"]))
    assert yaml.safe_load(out) == expected
    lines = out.splitlines()
    assert "  n_trajectories: 123  # Trajectories generated from the run's EMA DiT." in lines
    assert "sindy:  # configs/sindy.py (SindyConfig)" in lines
    assert "slurm:  # configs/slurm.py (SlurmConfig)" in lines
    assert "  library:  # configs/sindy.py (SindyLibraryConfig)" in lines
    # Every leaf key has a doc: a field without one shows up here.
    undocumented = [k for k, d in key_docs(Config).items() if not d.doc]
    assert undocumented == []
    # A subclass that only changes a default inherits the base class's doc (dit.lr from OptimConfig).
    assert key_docs(Config)["dit.lr"].doc == "Peak learning rate of AdamW."


def test_make_run_assignments_unchanged():
    """The Makefile evals this line; `show` must not change it."""
    proc = run("-m", "configs", "--config", "configs/local.yaml")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "shards=data/mnist rundir=runs/local classifier=data/classifier/mnist_cnn.safetensors\n"


@pytest.mark.parametrize(
    ("override", "section_file", "suggestion"),
    [
        ("sindy.n_trajectorie=5", "the sindy section is in configs/sindy.py", "sindy.n_trajectories"),
        ("sindy.library.familes=[time]", "the sindy section is in configs/sindy.py", "sindy.library.families"),
        ("slurm.gpus=8", "the slurm section is in configs/slurm.py", "slurm.gpus_per_node"),
        ("slurm.n_trajectories=5", "the slurm section is in configs/slurm.py", "sindy.n_trajectories"),
        ("dit.lrr=1e-3", "the dit section is in configs/schema.py", "dit.lr"),
        ("resum=auto", "sections and top-level keys are in configs/schema.py", "resume"),
    ],
)
def test_unknown_key_names_the_section_and_the_closest_key(override, section_file, suggestion):
    with pytest.raises(UserError) as err:
        load_config(REPO / "configs/smoke.yaml", [override])
    key = override.split("=")[0]
    assert str(err.value).startswith(f"unknown config key '{key}' ({section_file}; ")
    assert f"did you mean '{suggestion}'?" in str(err.value)


def test_an_entry_point_says_the_unknown_key_in_one_line():
    proc = run("training/train_dit.py", "--config", "configs/smoke.yaml", "dit.lrr=1e-3")
    line = refusal_line(proc)
    assert line.startswith(
        "train_dit.py: error: unknown config key 'dit.lrr' (the dit section is in configs/schema.py; "
    )
    assert "did you mean 'dit.lr'?" in line


def test_unknown_key_in_a_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sindy:\n  library:\n    poly_degre: 3\n")
    proc = run("-m", "configs", "show", "--config", str(bad))
    assert proc.returncode == 2
    assert "did you mean 'sindy.library.poly_degree'?" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_help_keeps_formatting_and_says_where_the_keys_are():
    proc = run("analysis/sindy_job.py", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # The stage table of the docstring stays a table (RawDescriptionHelpFormatter), not one paragraph.
    assert "\n    1. trajectories " in out and "\n    2. fits " in out and "\n    3. report " in out
    for text in ("python -m configs show --config FILE", "configs/sindy.py", "configs/slurm.py", "configs/schema.py"):
        assert text in out
    for script in ("training/train_ae.py", "training/train_dit.py", "training/encode_latents.py"):
        assert "python -m configs show" in run(script, "--help").stdout
    assert "configs/slurm.py     slurm.*" in run("-m", "cluster.submit", "--help").stdout
