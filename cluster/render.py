"""Job scripts for Slurm: each stage rendered from cluster/slurm/*.sh.in with the ``slurm`` section of the
config, every value that reaches a ``#SBATCH`` line re-checked, and the script checked with ``bash -n``
before anything uses it (cluster/submit.py submits them).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from configs.cli import UserError
from configs.schema import Config

REPO = Path(__file__).resolve().parents[1]

TEMPLATES = REPO / "cluster" / "slurm"
_UNSAFE_SBATCH = re.compile(r"[\s'\"`$\\\x00-\x1f\x7f]")
# Placeholders substituted without quoting must be plain words (the schema guarantees it; render
# checks again so that a looser schema can never turn into a shell injection).
_PLAIN_WORD = re.compile(r"[A-Za-z0-9._-]*")
_RAW_PLACEHOLDERS = ("stage", "run_name", "requeue", "signal_seconds", "main_process_port", "ray_port", "gpus_per_node")


class SubmitError(UserError):
    """Input the user must fix before anything is submitted; the message names it and the fix."""


@dataclass(frozen=True)
class Stage:
    """One step of the flow as a Slurm job."""

    name: str
    script: str
    """Entry point, relative to the repository root."""
    launch: str
    """accelerate: one `accelerate launch` per node; single: one process; ray: Ray cluster + driver."""
    done: str
    """File the entry point writes last, only on completion (relative to the run folder)."""
    section: str = ""
    """Config section with the stage's mixed_precision (accelerate stages)."""


STAGES = {
    "train-ae": Stage("train-ae", "training/train_ae.py", "accelerate", "ae.json", "ae"),
    "encode": Stage("encode", "training/encode_latents.py", "single", "latents/meta.json"),
    "train-dit": Stage("train-dit", "training/train_dit.py", "accelerate", "dit.json", "dit"),
    "score": Stage("score", "analysis/score_samples.py", "single", "quality.json"),
    "sindy": Stage("sindy", "analysis/sindy_job.py", "ray", "report/report.md"),
}


# ----------------------------------------------------------------------------------------------
# Paths and the config


def repo_path(p: str | Path) -> Path:
    """Absolute path; relative ones are taken from the repository root, where the jobs run."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else REPO / p


def run_dir(cfg: Config) -> Path:
    return repo_path(cfg.run.root) / cfg.run.name


def log_dir(cfg: Config) -> Path:
    return repo_path(cfg.slurm.log_dir) if cfg.slurm.log_dir else run_dir(cfg) / "slurm"


def python_path(cfg: Config) -> str:
    # abspath, not resolve(): resolving a venv's python symlink would leave the venv.
    return cfg.slurm.python or os.path.abspath(sys.executable)


def is_deepspeed(accelerate_config: Path) -> bool:
    return str(OmegaConf.load(accelerate_config).get("distributed_type", "")).upper() == "DEEPSPEED"


def job_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides every job passes on, plus resume=auto (a requeued job must continue)."""
    for o in overrides:
        if o.split("=", 1)[0].strip() == "resume" and o.split("=", 1)[1].strip() != "auto":
            raise SubmitError(
                f"override {o!r}: Slurm jobs always run with resume=auto so that a requeued "
                "job continues from its checkpoint; drop it (or use another run.name)"
            )
    return [o for o in overrides if o.split("=", 1)[0].strip() != "resume"] + ["resume=auto"]


# ----------------------------------------------------------------------------------------------
# Rendering


def _sbatch_header(cfg: Config, stage: Stage) -> list[str]:
    s = cfg.slurm
    gpu = s.gpus_per_node > 0
    opts = [f"--job-name={cfg.run.name}-{stage.name}"]
    if stage.launch == "single":
        opts += ["--nodes=1", "--ntasks=1"]
        if gpu:
            opts.append("--gpus-per-node=1")
        if s.cpus_per_task:
            opts.append(f"--cpus-per-task={s.cpus_per_task}")
    else:
        opts.append(f"--nodes={s.nodes}")
        # GPU and Ray jobs: one task per node (accelerate launch / ray start start the rest);
        # CPU training: one task per process, so Slurm hands out a core to each.
        per_node = s.cpu_processes_per_node if (stage.launch == "accelerate" and not gpu) else 1
        opts.append(f"--ntasks-per-node={per_node}")
        if gpu:
            opts.append(f"--gpus-per-node={s.gpus_per_node}")
        if s.cpus_per_task:
            opts.append(f"--cpus-per-task={s.cpus_per_task}")
    for flag, value in (
        ("partition", s.partition),
        ("account", s.account),
        ("qos", s.qos),
        ("time", s.time),
        ("mem", s.mem),
        ("constraint", s.constraint),
    ):
        if value:
            opts.append(f"--{flag}={value}")
    logs = log_dir(cfg)
    opts += [f"--output={logs}/%x-%j.out", "--open-mode=append", f"--chdir={REPO}"]
    if s.signal_seconds > 0:
        opts.append(f"--signal=B:USR1@{s.signal_seconds}")
    opts.append("--requeue" if s.requeue else "--no-requeue")
    opts += list(s.sbatch_args)
    for o in opts:
        # sbatch splits #SBATCH lines on whitespace and interprets quotes, and a newline would end the
        # comment and run the rest as shell. The config schema already refuses such names and
        # options; this catches the paths (run.root, slurm.log_dir, the checkout) that end up here.
        bad = _UNSAFE_SBATCH.search(o)
        if bad:
            raise SubmitError(
                f"#SBATCH {o!r} would contain {bad.group()!r}: job options cannot hold whitespace, "
                "quotes, '$', backticks, backslashes or control characters; use a run.root / "
                "slurm.log_dir / checkout path without them"
            )
    return [f"#SBATCH {o}" for o in opts]


def _accelerate_launch(cfg: Config, stage: Stage, args: list[str]) -> tuple[str, str]:
    """The srun line of a training stage and the environment it needs."""
    s = cfg.slurm
    mp = getattr(cfg, stage.section).mixed_precision
    common = [
        '--num_machines "$SLURM_NNODES"',
        '--main_process_ip "$MAIN_ADDR"',
        '--main_process_port "$MAIN_PORT"',
        f"--mixed_precision {mp}",
        "--dynamo_backend no",
    ]
    if s.gpus_per_node > 0:
        accel = [
            f"--config_file {shlex.quote(s.accelerate_config)}",
            f'--num_processes "$((SLURM_NNODES * {s.gpus_per_node}))"',
            *common,
        ]
        srun_cpus = []  # the one task per node has the job's --cpus-per-task
        env = ""
    else:
        # CPU: the ACCELERATE_USE_CPU + --multi_gpu recipe is the one that forms a real gloo group
        # (`--cpu --num_processes N` runs one process; see docs/REFERENCES.md). The node's task
        # runs all its processes, so it takes all the cores the job holds there.
        if s.nodes * s.cpu_processes_per_node > 1:
            accel = ["--multi_gpu", f'--num_processes "$((SLURM_NNODES * {s.cpu_processes_per_node}))"', *common]
        else:  # accelerate refuses --multi_gpu with one process
            accel = ["--cpu", "--num_processes 1", *common]
        srun_cpus = ['--cpus-per-task="$SLURM_CPUS_ON_NODE"']
        env = "export ACCELERATE_USE_CPU=true"
    # One task per node runs `accelerate launch` for that node; the machine rank is the node's
    # index, known only inside the task. training.launch (accelerate launch that keeps the stage's
    # exit code) installs its own handler and the accelerate launcher it starts ignores USR1, so
    # the preemption signal leaves them running while the workers checkpoint and exit; the task
    # then exits 75 (preempted), which train.sh.in requeues.
    lines = [
        'srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 '
        + " ".join(srun_cpus + ["--kill-on-bad-exit=1"]),
        """  bash -c 'trap "" USR1; exec "$PY" -m training.launch --machine_rank "$SLURM_NODEID" "$@"' accelerate-launch""",
        "  " + " ".join(accel[:2]),
        "  " + " ".join(accel[2:5]),
        "  " + " ".join(accel[5:]),
        "  " + " ".join([stage.script, *map(shlex.quote, args)]),
    ]
    return " \\\n".join(lines), env


def render(cfg: Config, stage_name: str, config_path: Path, overrides: Sequence[str]) -> str:
    """The batch script of one stage.

    Args:
        cfg: the loaded config (its ``slurm`` section shapes the job).
        stage_name: a key of STAGES.
        config_path: the YAML file, passed to the entry point as an absolute path.
        overrides: the user's dotted overrides, passed on (plus resume=auto).

    Raises:
        SubmitError: an unknown stage or a template placeholder without a value.
    """
    if stage_name not in STAGES:
        raise SubmitError(f"unknown stage {stage_name!r}; choose one of {sorted(STAGES)}")
    stage = STAGES[stage_name]
    s = cfg.slurm
    args = ["--config", str(config_path), *job_overrides(overrides)]
    values = {
        "sbatch": "\n".join(_sbatch_header(cfg, stage)),
        "stage": stage.name,
        "run_name": cfg.run.name,
        "repo": shlex.quote(str(REPO)),
        "python": shlex.quote(python_path(cfg)),
        "run_dir": shlex.quote(str(run_dir(cfg))),
        "done_file": shlex.quote(str(run_dir(cfg) / stage.done)),
        "requeue": "1" if s.requeue else "0",
        "signal_seconds": str(s.signal_seconds),
        "setup": "\n".join(["# slurm.setup", *s.setup]) if s.setup else "",
        "main_process_port": str(s.main_process_port),
        "ray_port": str(s.ray_port),
        "gpus_per_node": str(s.gpus_per_node),
        "args": " ".join(map(shlex.quote, args)),
        "env": "",
        "launch": "",
    }
    if stage.launch == "accelerate":
        values["launch"], values["env"] = _accelerate_launch(cfg, stage, args)
    elif stage.launch == "single":
        values["launch"] = 'srun --nodes=1 --ntasks=1 "$PY" ' + " ".join([stage.script, *map(shlex.quote, args)])
    for key in _RAW_PLACEHOLDERS:
        if not _PLAIN_WORD.fullmatch(values[key]):
            raise SubmitError(f"{key}={values[key]!r} is not a plain word and cannot go into a job script unquoted")
    template = (TEMPLATES / ("ray.sh.in" if stage.launch == "ray" else "train.sh.in")).read_text()
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values.get(m.group(1), m.group(0)), template)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise SubmitError(f"template placeholders without a value: {sorted(set(left))} (cluster/slurm/)")
    check_syntax(text, stage.name)
    return text


def check_syntax(text: str, stage_name: str) -> None:
    """``bash -n`` on a rendered script: a slurm.setup line with an unclosed quote or bracket would
    otherwise be found only when the job runs (and swallow the lines after it).

    Raises:
        SubmitError: bash's first complaint.
    """
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["syntax error"])[0]
        raise SubmitError(f"the {stage_name} job script is not valid bash ({first}); check slurm.setup")
