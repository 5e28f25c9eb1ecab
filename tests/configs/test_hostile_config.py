"""Hostile or careless config values (issue 19): refused at config time with one short line and exit code 2, so
`make run` (which evals `python -m configs`) and `cluster.submit` stop before any work or queueing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from configs.checks import NAME_MAX, ConfigError
from configs.schema import DIT_PRESETS, LATENT_SIZES, load_config, trajectory_bytes
from tests.conftest import REPO, refusal_line

SMOKE = REPO / "configs" / "smoke.yaml"


def configs_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "configs", "--config", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_the_config_tables_match_the_models() -> None:
    from models.autoencoder import build_autoencoder
    from models.dit import PRESETS
    from models.schedules import LATENT_SCHEDULES

    assert tuple(PRESETS) == DIT_PRESETS
    for kind, (dim, steps) in LATENT_SIZES.items():
        n, c = build_autoencoder(kind, 1.0).latent_shape
        assert (n * c, steps) == (dim, LATENT_SCHEDULES[kind][1])


@pytest.mark.parametrize(
    "override, expect",
    [
        ("dit.preset=huge", "dit.preset must be one of tiny | small | reference | large | xl, got 'huge'"),
        (f"run.root=/tmp/{'x' * 5000}", "is 5014 characters long, more than 4096"),
        (f"run.root=/tmp/{'x' * (NAME_MAX + 1)}/runs", "run.root has a 256-byte component"),
        (f"data.shards={'d' * 300}", "data.shards has a 300-byte component"),
        (f"dit.classifier=c/{'c' * 300}.safetensors", "dit.classifier has a 312-byte component"),
        (f"sindy.trajectories={'t' * 400}.npz", "sindy.trajectories has a 404-byte component"),
        (f"resume={'k' * 256}", "resume has a 256-byte component"),
        ("sindy.n_trajectories=1000000000", "needs about 9.66e+03 GB of trajectory blocks"),
    ],
    ids=["preset", "50kB-root", "root-component", "shards", "classifier", "trajectories", "resume", "n_traj"],
)
def test_python_m_configs_refuses_with_one_short_line(override: str, expect: str) -> None:
    proc = configs_cli(str(SMOKE), override)
    line = refusal_line(proc)
    assert proc.stdout == "", proc.stdout  # nothing for make run to eval
    assert expect in line and len(line) < 800, line[:1000]


def test_huge_values_are_echoed_shortened(tmp_path: Path) -> None:
    # A 50 MB value in a file: refused as too long, echoed as 200 characters and a count.
    big = tmp_path / "big.yaml"
    big.write_text("run:\n  root: " + "r" * 600_000 + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(big)
    assert "run.root is 600000 characters long" in str(info.value) and len(str(info.value)) < 600
    # A config file over the size cap is not even parsed.
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"huge\.yaml is 2097155 bytes, more than 1048576"):
        load_config(huge)
    # A bad value of a checked kind echoes at most 200 characters of it.
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, ["ae.kind=" + "k" * 3000])
    assert "ae.kind must be" in str(info.value) and "characters)" in str(info.value) and len(str(info.value)) < 700


def test_the_disk_estimate_counts_blocks_already_there(tmp_path: Path) -> None:
    cfg = load_config(SMOKE, [f"run.root={tmp_path}"])
    per_trajectory = trajectory_bytes(cfg) / cfg.sindy.n_trajectories
    dim, steps = LATENT_SIZES[cfg.ae.kind]
    assert per_trajectory == (3 * (cfg.dit.timesteps or steps) + 1) * dim * 4
    # Given as a file, the trajectories are not generated: no estimate.
    load_config(SMOKE, [f"run.root={tmp_path}", "sindy.n_trajectories=1000000000", "sindy.trajectories=x.npz"])


def test_argument_errors_and_reported_errors_are_capped() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "configs", "--config", str(SMOKE), "--" + "x" * 100_000],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = refusal_line(proc)
    assert proc.stdout == "", proc.stdout
    assert "unrecognized arguments" in line and "characters)" in line and len(line) < 2200, line[:300]
    # Any UserError message (a library's, say) is cut to one line of at most about 2,000 characters.
    from configs.cli import UserError, call_cli

    def main(argv):
        raise UserError("boom " + "y" * 50_000)

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert call_cli(main, [], prog="p") == 2
    assert err.getvalue().startswith("p: error: boom yyy") and "(50005 characters)" in err.getvalue()
    assert len(err.getvalue()) < 2100
