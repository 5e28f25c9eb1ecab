"""Submit latent-sindy stages to Slurm, or show and cancel a run's jobs.

    python -m cluster.submit train-ae  --config configs/X.yaml [--nodes N --gpus-per-node G] [--dry-run] [key=value ...]
    python -m cluster.submit train-dit --config ...
    python -m cluster.submit encode    --config ...
    python -m cluster.submit score     --config ...    # FD-MNIST of the DiT's samples
    python -m cluster.submit sindy     --config ...
    python -m cluster.submit pipeline  --config ...    # slurm.pipeline stages chained with afterok
    python -m cluster.submit status    --config ...    # the run's jobs (squeue / scontrol)
    python -m cluster.submit cancel    --config ...

Job scripts are rendered from cluster/slurm/train.sh.in (training, encoding, scoring) and
cluster/slurm/ray.sh.in (equation discovery on Ray) with the ``slurm`` section of the config.
Every input is checked before sbatch runs: a bad one is one line on stderr and exit code 2.
Logs, the rendered scripts and the list of submitted jobs go to ``runs/<name>/slurm/``.
In a pipeline, the scoring stage (FD-MNIST, analysis/score_samples.py) follows train-dit as its
own job.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from configs.cli import OneLineParser, UserError, run_cli
from configs.schema import Config, load_config

REPO = Path(__file__).resolve().parents[1]

TEMPLATES = REPO / "cluster" / "slurm"
_UNSAFE_SBATCH = re.compile(r"[\s'\"`$\\\x00-\x1f\x7f]")
# Placeholders substituted without quoting must be plain words (the schema guarantees it; render
# checks again so that a looser schema can never turn into a shell injection).
_PLAIN_WORD = re.compile(r"[A-Za-z0-9._-]*")
_RAW_PLACEHOLDERS = ("stage", "run_name", "requeue", "signal_seconds", "main_process_port", "ray_port",
                     "gpus_per_node")


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
    from omegaconf import OmegaConf

    return str(OmegaConf.load(accelerate_config).get("distributed_type", "")).upper() == "DEEPSPEED"


def job_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides every job passes on, plus resume=auto (a requeued job must continue)."""
    for o in overrides:
        if o.split("=", 1)[0].strip() == "resume" and o.split("=", 1)[1].strip() != "auto":
            raise SubmitError(f"override {o!r}: Slurm jobs always run with resume=auto so that a requeued "
                              "job continues from its checkpoint; drop it (or use another run.name)")
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
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                        ("time", s.time), ("mem", s.mem), ("constraint", s.constraint)):
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
            raise SubmitError(f"#SBATCH {o!r} would contain {bad.group()!r}: job options cannot hold whitespace, "
                              "quotes, '$', backticks, backslashes or control characters; use a run.root / "
                              "slurm.log_dir / checkout path without them")
    return [f"#SBATCH {o}" for o in opts]


def _accelerate_launch(cfg: Config, stage: Stage, args: list[str]) -> tuple[str, str]:
    """The srun line of a training stage and the environment it needs."""
    s = cfg.slurm
    mp = getattr(cfg, stage.section).mixed_precision
    common = ['--num_machines "$SLURM_NNODES"', '--main_process_ip "$MAIN_ADDR"',
              '--main_process_port "$MAIN_PORT"', f"--mixed_precision {mp}", "--dynamo_backend no"]
    if s.gpus_per_node > 0:
        accel = [f"--config_file {shlex.quote(s.accelerate_config)}",
                 f'--num_processes "$((SLURM_NNODES * {s.gpus_per_node}))"', *common]
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
    lines = ['srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 '
             + " ".join(srun_cpus + ["--kill-on-bad-exit=1"]),
             """  bash -c 'trap "" USR1; exec "$PY" -m training.launch --machine_rank "$SLURM_NODEID" "$@"' accelerate-launch""",
             "  " + " ".join(accel[:2]),
             "  " + " ".join(accel[2:5]),
             "  " + " ".join(accel[5:]),
             "  " + " ".join([stage.script, *map(shlex.quote, args)])]
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
        values["launch"] = "srun --nodes=1 --ntasks=1 \"$PY\" " + " ".join([stage.script, *map(shlex.quote, args)])
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


# ----------------------------------------------------------------------------------------------
# Checks against the cluster (before sbatch)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _gres_gpus(gres: str) -> int:
    """GPUs in a sinfo %G field: "gpu:8", "gpu:a100:4(S:0-1)", "gpu:2,shard:4" or "(null)"."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def check_cluster(cfg: Config, stages: Sequence[Stage]) -> None:
    """Refuse a job the partition cannot run, before sbatch queues it forever.

    Raises:
        SubmitError: no sbatch, an unknown partition, more nodes, GPUs or cores than it has.
    """
    s = cfg.slurm
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise SubmitError("sbatch/sinfo not found on PATH: run this on a Slurm login node "
                          "(or use --dry-run to print the job script)")
    cmd = ["sinfo", "-h", "-o", "%P|%D|%c|%G"] + (["-p", s.partition] if s.partition else [])
    proc = _run(cmd)
    if proc.returncode != 0:
        raise SubmitError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    rows = [line.split("|") for line in proc.stdout.split("\n") if line.strip()]
    if not s.partition:  # the default partition is marked with '*'
        rows = [r for r in rows if r[0].endswith("*")] or rows
    if not rows:
        raise SubmitError(f"partition {s.partition!r} not found by sinfo; set slurm.partition to one of "
                          f"{_partitions()}")
    part = rows[0][0].rstrip("*")
    nodes = sum(int(r[1]) for r in rows)
    max_gpus = max(_gres_gpus(r[3]) for r in rows)
    max_cpus = max(int(r[2].rstrip("+")) for r in rows)
    gres = ",".join(sorted({r[3] for r in rows}))
    if s.gpus_per_node > max_gpus:
        raise SubmitError(f"slurm.gpus_per_node={s.gpus_per_node} but partition {part!r} has at most {max_gpus} "
                          f"GPUs per node (sinfo gres: {gres}); lower --gpus-per-node or choose another "
                          "partition with slurm.partition")
    if s.nodes > nodes:
        raise SubmitError(f"slurm.nodes={s.nodes} but partition {part!r} has {nodes} nodes; lower --nodes")
    if any(st.launch == "accelerate" for st in stages) and s.gpus_per_node == 0:
        need = s.cpu_processes_per_node * max(1, s.cpus_per_task)
        if need > max_cpus:
            raise SubmitError(f"slurm.cpu_processes_per_node={s.cpu_processes_per_node} x cpus_per_task="
                              f"{max(1, s.cpus_per_task)} needs {need} cores per node but partition {part!r} "
                              f"nodes have {max_cpus}; lower them")


def _partitions() -> list[str]:
    proc = _run(["sinfo", "-h", "-o", "%P"])
    return [p.rstrip("*") for p in proc.stdout.split()]


def check_inputs(cfg: Config, stages: Sequence[Stage]) -> None:
    """Local checks that need no cluster: files the jobs will read.

    Raises:
        SubmitError: naming the missing file and how to make it.
    """
    s = cfg.slurm
    py = python_path(cfg)
    if not os.access(py, os.X_OK):
        raise SubmitError(f"slurm.python={py!r} is not an executable; set it to the absolute path of the "
                          "environment's python")
    if any(st.launch == "accelerate" for st in stages) and s.gpus_per_node > 0:
        acc = repo_path(s.accelerate_config)
        if not acc.is_file():
            raise SubmitError(f"slurm.accelerate_config={s.accelerate_config!r} not found; use "
                              "configs/accelerate/multi_gpu.yaml (DDP) or configs/accelerate/deepspeed_zero2.yaml")
    elif any(st.launch == "accelerate" for st in stages) and repo_path(s.accelerate_config).is_file() \
            and is_deepspeed(repo_path(s.accelerate_config)):
        raise SubmitError(f"slurm.accelerate_config={s.accelerate_config!r} is DeepSpeed, which needs GPUs here: "
                          "set slurm.gpus_per_node > 0 or slurm.accelerate_config=configs/accelerate/multi_gpu.yaml")
    for st in stages:
        if not (REPO / st.script).is_file():
            raise SubmitError(f"stage {st.name}: {st.script} not found in {REPO}")
    first = stages[0]
    if first.name in ("train-ae", "encode"):
        manifest = repo_path(cfg.data.shards) / "manifest.json"
        if not manifest.is_file():
            raise SubmitError(f"data.shards={cfg.data.shards!r} has no manifest.json; prepare it first: "
                              f"python -m data_pipeline.prepare --out {cfg.data.shards}")


# ----------------------------------------------------------------------------------------------
# Submission and the run's job list


def jobs_file(cfg: Config) -> Path:
    return log_dir(cfg) / "jobs.jsonl"


def sbatch(script: str, cfg: Config, stage: Stage, dependency: str | None) -> str:
    """Queue one job; returns its id. The rendered script is kept next to the logs."""
    logs = log_dir(cfg)
    logs.mkdir(parents=True, exist_ok=True)  # slurmd does not create the --output folder
    path = logs / f"{stage.name}.sh"
    path.write_text(script)
    cmd = ["sbatch", "--parsable"]
    if dependency:
        # A failed stage cancels the ones waiting on it instead of leaving them pending forever.
        cmd += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    proc = _run(cmd + [str(path)])
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused the {stage.name} job: {proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().split(";")[0]
    path.replace(logs / f"{stage.name}-{job_id}.sh")
    with open(jobs_file(cfg), "a") as f:
        f.write(json.dumps({"job_id": job_id, "stage": stage.name, "run": cfg.run.name,
                            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "dependency": dependency}) + "\n")
    return job_id


def recorded_jobs(cfg: Config) -> list[dict]:
    f = jobs_file(cfg)
    if not f.is_file():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def job_state(job_id: str) -> dict[str, str]:
    """State of a job from slurmctld (``scontrol show job``); empty once it has been purged."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)


def cmd_status(cfg: Config) -> int:
    jobs = recorded_jobs(cfg)
    if not jobs:
        print(f"no jobs recorded for run {cfg.run.name!r} ({jobs_file(cfg)})")
        return 0
    print(f"{'JOBID':>8}  {'STAGE':9}  {'STATE':12}  {'RESTARTS':8}  {'EXIT':6}  LOG")
    for j in jobs:
        info = job_state(j["job_id"])
        state = info.get("JobState", "GONE")  # slurmctld forgets finished jobs after MinJobAge
        print(f"{j['job_id']:>8}  {j['stage']:9}  {state:12}  {info.get('Restarts', '-'):8}  "
              f"{info.get('ExitCode', '-'):6}  {log_dir(cfg) / (cfg.run.name + '-' + j['stage'] + '-' + j['job_id'] + '.out')}")
    return 0


def cmd_cancel(cfg: Config) -> int:
    live = [j["job_id"] for j in recorded_jobs(cfg)
            if job_state(j["job_id"]).get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED",
                                                           "CONFIGURING", "COMPLETING", "REQUEUE_HOLD")]
    if not live:
        print(f"no queued or running jobs for run {cfg.run.name!r}")
        return 0
    proc = _run(["scancel", *live])
    if proc.returncode != 0:
        raise SubmitError(f"scancel {' '.join(live)} failed: {proc.stderr.strip()}")
    print(f"cancelled {' '.join(live)}")
    return 0


def cmd_submit(cfg: Config, stage_names: list[str], config_path: Path, overrides: list[str], dry_run: bool) -> int:
    stages = [STAGES[n] for n in stage_names]
    scripts = [render(cfg, n, config_path, overrides) for n in stage_names]
    if dry_run:
        for name, text in zip(stage_names, scripts):
            if len(scripts) > 1:
                print(f"# ===== stage {name} =====")
            print(text)
        return 0
    check_inputs(cfg, stages)
    check_cluster(cfg, stages)
    previous = None
    for stage, text in zip(stages, scripts):
        previous = sbatch(text, cfg, stage, previous)
        log = log_dir(cfg) / f"{cfg.run.name}-{stage.name}-{previous}.out"
        print(f"submitted {stage.name}: job {previous}  log {log}")
    print(f"run folder {run_dir(cfg)}; watch: python -m cluster.submit status --config {config_path}; "
          f"TensorBoard: tensorboard --logdir {run_dir(cfg) / 'tb'}")
    return 0


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m cluster.submit", description=__doc__.split("\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="\n".join(__doc__.split("\n")[1:]))
    p.add_argument("command", choices=[*STAGES, "pipeline", "status", "cancel"])
    p.add_argument("--config", required=True, help="YAML config (configs/smoke.yaml, gpu.yaml, multinode.yaml)")
    p.add_argument("--nodes", type=int, help="slurm.nodes")
    p.add_argument("--gpus-per-node", type=int, help="slurm.gpus_per_node (0: CPU-only)")
    p.add_argument("--cpu-processes-per-node", type=int, help="slurm.cpu_processes_per_node (CPU-only jobs)")
    p.add_argument("--partition", help="slurm.partition")
    p.add_argument("--time", help="slurm.time, e.g. 04:00:00")
    p.add_argument("--stages", help="pipeline only: comma-separated stages (slurm.pipeline), e.g. "
                   "train-ae,encode,train-dit (score follows train-dit)")
    p.add_argument("--dry-run", action="store_true", help="print the job script(s) instead of submitting")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. dit.max_steps=100")
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("nodes", "nodes"), ("gpus_per_node", "gpus_per_node"),
                      ("cpu_processes_per_node", "cpu_processes_per_node"), ("partition", "partition"),
                      ("time", "time")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"slurm.{key}={value}")
    if args.stages:
        if args.command != "pipeline":
            raise SubmitError("--stages applies to the pipeline command only")
        overrides.append(f"slurm.pipeline=[{args.stages}]")
    config_path = repo_path(args.config)
    if not config_path.is_file():
        raise SubmitError(f"config file not found: {args.config}")
    cfg = load_config(config_path, overrides)
    if args.command == "status":
        return cmd_status(cfg)
    if args.command == "cancel":
        return cmd_cancel(cfg)
    stage_names = list(cfg.slurm.pipeline) if args.command == "pipeline" else [args.command]
    return cmd_submit(cfg, stage_names, config_path, overrides, args.dry_run)


if __name__ == "__main__":
    run_cli(main, prog="cluster.submit")
