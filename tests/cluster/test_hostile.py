"""Hostile names and fields never reach a shell: each is refused with one line and exit code 2
before anything is written or queued (with --dry-run and against the real Slurm), and odd but
legal values (spaces, quotes, `$(...)` in a path, an override or a setup line) pass `bash -n`
and arrive in the job byte for byte, with nothing executed."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import SMOKE, recorded_jobs, submit, wait_jobs
from tests.conftest import REPO

M = "PWNED-" + uuid.uuid4().hex[:8]
"""The file every injection attempt below would create (in the repository, where jobs and the
submitting process run); it must never appear."""

# (dotted key, hostile value, fragment of the one-line error)
NAME_ERR = "run.name must be 1-100 characters of letters, digits"
HOSTILE = [
    ("run.name", f"x$(id>{M})", NAME_ERR),
    ("run.name", f"x`id>{M}`", NAME_ERR),
    ("run.name", "x'y", NAME_ERR),
    ("run.name", 'x"y', NAME_ERR),
    ("run.name", "x y", NAME_ERR),
    ("run.name", f"x\nid>{M}", NAME_ERR),
    ("run.name", "x;id", NAME_ERR),
    ("run.name", "..", NAME_ERR),
    ("run.name", ".", NAME_ERR),
    ("run.name", "a..b", NAME_ERR),
    ("run.name", "../escape", NAME_ERR),
    ("run.name", "-rf", NAME_ERR),
    ("run.root", f"/tmp/runs\nid>{M}", "run.root must not contain newlines"),
    ("data.shards", f"data/mnist\nid>{M}", "data.shards must not contain newlines"),
    ("slurm.partition", f"debug\nid>{M}", "slurm.partition must look like"),
    ("slurm.partition", f"debug$(id>{M})", "slurm.partition must look like"),
    ("slurm.partition", "debug --uid=0", "slurm.partition must look like"),
    ("slurm.account", "acct\n#SBATCH --uid=0", "slurm.account must look like"),
    ("slurm.account", "a'b", "slurm.account must look like"),
    ("slurm.qos", f"normal`id>{M}`", "slurm.qos must look like"),
    ("slurm.constraint", f"a100\nid>{M}", "slurm.constraint must look like"),
    ("slurm.constraint", "a100 --uid=0", "slurm.constraint must look like"),
    ("slurm.mem", f"4G\nid>{M}", "slurm.mem must be a size"),
    ("slurm.time", f"1:00:00\nid>{M}", "slurm.time must be a Slurm time limit"),
    ("slurm.python", f"/usr/bin/python3\nid>{M}", "slurm.python must not contain newlines"),
    ("slurm.log_dir", f"/tmp/logs\nid>{M}", "slurm.log_dir must not contain newlines"),
    (
        "slurm.accelerate_config",
        f"configs/accelerate/multi_gpu.yaml\nid>{M}",
        "slurm.accelerate_config must not contain newlines",
    ),
    ("slurm.sbatch_args", [f"--exclusive\nid>{M}"], "slurm.sbatch_args items must be single sbatch options"),
    ("slurm.sbatch_args", ["--comment=a b"], "slurm.sbatch_args items must be single sbatch options"),
    ("slurm.sbatch_args", [f"--comment=$(id>{M})"], "slurm.sbatch_args items must be single sbatch options"),
    ("slurm.sbatch_args", ["--comment='x'"], "slurm.sbatch_args items must be single sbatch options"),
    ("slurm.sbatch_args", ["exclusive"], "slurm.sbatch_args items must be single sbatch options"),
    ("slurm.setup", [f"echo ok\nid>{M}"], "slurm.setup items must not contain newlines"),
    ("slurm.setup", ["echo 'unclosed"], "job script is not valid bash"),
    ("slurm.setup", [f"echo $(id>{M}"], "job script is not valid bash"),
    # Legal for a local run, but sbatch would split the #SBATCH --output path at the space.
    ("run.root", "{tmp}/with space/runs", "would contain ' '"),
    # Names a stage looks up, and sizes, refused before anything is queued (issue 19).
    ("dit.preset", "huge", "dit.preset must be one of tiny | small | reference | large | xl, got 'huge'"),
    ("run.root", "{tmp}/" + "r" * 300, "run.root has a 300-byte component, more than the system's file name limit"),
    ("sindy.n_trajectories", 10**9, "sindy.n_trajectories=1000000000 needs about"),
]
# The ids leave out M's random part: pytest-xdist workers must collect the same test names.
IDS = [f"{k}={v!r}".replace(M, "PWNED")[:60] for k, v, _ in HOSTILE]


def _hostile_config(tmp_path: Path, key: str, value) -> Path:
    """smoke.yaml with run.root in tmp_path and ``key`` set to ``value`` (real newlines: a YAML file)."""
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg.setdefault("run", {})["root"] = str(tmp_path / "runs")
    cfg.setdefault("slurm", {})["log_dir"] = ""
    section, name = key.split(".")
    cfg.setdefault(section, {})[name] = value.format(tmp=tmp_path) if isinstance(value, str) else value
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _jobs_from(tmp_path: Path) -> list[str]:
    """Jobs slurmctld knows (queued, running or recently finished) whose script lies under tmp_path."""
    proc = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True)
    return [line.split()[0] for line in proc.stdout.splitlines() if str(tmp_path) in line]


def _assert_refused(proc: subprocess.CompletedProcess, expect: str, tmp_path: Path) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cluster.submit: error:"), proc.stderr
    assert expect in lines[0], lines[0]
    assert proc.stdout == ""  # no script printed (dry-run) or submitted
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.name != "hostile.yaml")
    assert written == [], f"written before the refusal: {written}"  # no run folder, no rendered script
    assert not (REPO / M).exists() and not (tmp_path / M).exists(), "an injected command ran"


@pytest.mark.parametrize("key, value, expect", HOSTILE, ids=IDS)
def test_hostile_field_is_refused_in_a_dry_run(tmp_path, key, value, expect):
    proc = submit("pipeline", "--config", str(_hostile_config(tmp_path, key, value)), "--dry-run", check=False)
    _assert_refused(proc, expect, tmp_path)


@pytest.mark.slurm
@pytest.mark.parametrize("key, value, expect", HOSTILE, ids=IDS)
def test_hostile_field_is_refused_before_sbatch(slurm, tmp_path, key, value, expect):
    proc = submit("train-ae", "--config", str(_hostile_config(tmp_path, key, value)), check=False)
    _assert_refused(proc, expect, tmp_path)
    assert _jobs_from(tmp_path) == [], "a job was queued"


@pytest.mark.slurm
@pytest.mark.parametrize(
    "args, expect",
    [
        ([f"run.name=x$(id>{M})"], NAME_ERR),  # the report's command line
        (["run.name=.."], NAME_ERR),
        (["--partition", f"debug$(id>{M})"], "slurm.partition must look like"),
        (["--time", f"1:00:00;id>{M}"], "slurm.time must be a Slurm time limit"),
        ([f"slurm.constraint=a100`id>{M}`"], "slurm.constraint must look like"),
    ],
    ids=["name-subst", "name-dotdot", "partition-flag", "time-flag", "constraint-backticks"],
)
def test_hostile_command_line_is_refused_before_sbatch(slurm, tmp_path, args, expect):
    proc = submit("train-ae", "--config", str(SMOKE), f"run.root={tmp_path / 'runs'}", *args, check=False)
    _assert_refused(proc, expect, tmp_path)
    assert _jobs_from(tmp_path) == [], "a job was queued"


def _odd_setup(tmp_path: Path, argv_out: Path) -> tuple[Path, Path, str, str]:
    """A config in a folder with a space, whose setup lines and an override are full of shell syntax,
    and a stand-in interpreter (also in that folder) that records what the job hands it."""
    odd_dir = tmp_path / "odd dir"
    odd_dir.mkdir()
    setup_value = f'two  spaces; $(id>{M}) `id>{M}` "dq" *'
    fake = odd_dir / "fake python"
    fake.write_text(
        "#!/bin/sh\n"
        "# Stands in for the interpreter: records its arguments and the setup's variable, then\n"
        "# writes the stage's completion file so the job ends COMPLETED.\n"
        'printf "%s\\0" "$@" > "$ARGV_OUT"\n'
        'printf "%s" "$ODD_SETUP" > "$ARGV_OUT.setup"\n'
        'mkdir -p "$(dirname "$DONE")" && touch "$DONE"\n'
    )
    fake.chmod(0o755)
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["run"]["root"] = str(tmp_path / "runs")
    cfg["slurm"] = {
        "python": str(fake),
        "main_process_port": 29517,
        "setup": [f"export ODD_SETUP='{setup_value}'", f"export DONE ARGV_OUT='{argv_out}'"],
    }
    config = odd_dir / "smoke copy.yaml"
    config.write_text(yaml.safe_dump(cfg))
    override = f"dit.classifier={tmp_path}/x y/$(id>{M})/`id>{M}`/'q' \"dq\"; echo *"
    return config, fake, override, setup_value


def test_odd_but_legal_values_render_valid_bash_for_every_stage(tmp_path):
    config, _, override, _ = _odd_setup(tmp_path, tmp_path / "argv")
    out = submit("pipeline", "--config", str(config), "--dry-run", override).stdout
    scripts = out.split("# ===== stage ")[1:]
    assert len(scripts) == 5  # slurm.pipeline's four stages and the scoring job after train-dit
    for text in scripts:
        script = tmp_path / "job.sh"
        script.write_text(text.split("\n", 1)[1])
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "export ODD_SETUP=" in text
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.slurm
def test_odd_but_legal_values_arrive_intact_in_a_real_job(slurm, tmp_path, mnist_shards):
    argv_out = tmp_path / "argv"
    config, _, override, setup_value = _odd_setup(tmp_path, argv_out)
    submit("encode", "--config", str(config), f"data.shards={mnist_shards}", override)
    run = tmp_path / "runs" / "smoke"
    (job,) = recorded_jobs(run)
    assert wait_jobs([job["job_id"]], 120, run / "slurm") == {job["job_id"]: "COMPLETED"}
    argv = argv_out.read_bytes().split(b"\0")[:-1]
    assert [a.decode() for a in argv] == [
        "training/encode_latents.py",
        "--config",
        str(config),
        f"data.shards={mnist_shards}",
        override,
        "resume=auto",
    ]
    assert Path(f"{argv_out}.setup").read_text() == setup_value
    assert not (REPO / M).exists() and not (tmp_path / M).exists(), "an injected command ran"
    script = run / "slurm" / f"encode-{job['job_id']}.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert os.path.isfile(run / "latents" / "meta.json")
