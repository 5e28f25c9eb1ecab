"""Submit latent-sindy stages to Slurm, or show and cancel a run's jobs.

    python -m cluster.submit train-ae  --config configs/X.yaml [--nodes N --gpus-per-node G] [--dry-run] [key=value ...]
    python -m cluster.submit train-dit --config ...
    python -m cluster.submit encode    --config ...
    python -m cluster.submit score     --config ...    # FD-MNIST of the DiT's samples
    python -m cluster.submit sindy     --config ...
    python -m cluster.submit pipeline  --config ...    # slurm.pipeline stages chained with afterok
    python -m cluster.submit status    --config ...    # the run's jobs (scontrol, then sacct)
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
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from cluster.render import (
    REPO,
    STAGES,
    Stage,
    SubmitError,
    is_deepspeed,
    log_dir,
    python_path,
    render,
    repo_path,
    run_dir,
)
from configs.cli import CONFIG_KEYS_HELP, OneLineParser, run_cli
from configs.schema import Config, load_config

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
        raise SubmitError(
            "sbatch/sinfo not found on PATH: run this on a Slurm login node (or use --dry-run to print the job script)"
        )
    cmd = ["sinfo", "-h", "-o", "%P|%D|%c|%G"] + (["-p", s.partition] if s.partition else [])
    proc = _run(cmd)
    if proc.returncode != 0:
        raise SubmitError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    rows = [line.split("|") for line in proc.stdout.split("\n") if line.strip()]
    if not s.partition:  # the default partition is marked with '*'
        rows = [r for r in rows if r[0].endswith("*")] or rows
    if not rows:
        raise SubmitError(
            f"partition {s.partition!r} not found by sinfo; set slurm.partition to one of {_partitions()}"
        )
    part = rows[0][0].rstrip("*")
    nodes = sum(int(r[1]) for r in rows)
    max_gpus = max(_gres_gpus(r[3]) for r in rows)
    max_cpus = max(int(r[2].rstrip("+")) for r in rows)
    gres = ",".join(sorted({r[3] for r in rows}))
    if s.gpus_per_node > max_gpus:
        raise SubmitError(
            f"slurm.gpus_per_node={s.gpus_per_node} but partition {part!r} has at most {max_gpus} "
            f"GPUs per node (sinfo gres: {gres}); lower --gpus-per-node or choose another "
            "partition with slurm.partition"
        )
    if s.nodes > nodes:
        raise SubmitError(f"slurm.nodes={s.nodes} but partition {part!r} has {nodes} nodes; lower --nodes")
    if any(st.launch == "accelerate" for st in stages) and s.gpus_per_node == 0:
        need = s.cpu_processes_per_node * max(1, s.cpus_per_task)
        if need > max_cpus:
            raise SubmitError(
                f"slurm.cpu_processes_per_node={s.cpu_processes_per_node} x cpus_per_task="
                f"{max(1, s.cpus_per_task)} needs {need} cores per node but partition {part!r} "
                f"nodes have {max_cpus}; lower them"
            )


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
        raise SubmitError(
            f"slurm.python={py!r} is not an executable; set it to the absolute path of the environment's python"
        )
    if any(st.launch == "accelerate" for st in stages) and s.gpus_per_node > 0:
        acc = repo_path(s.accelerate_config)
        if not acc.is_file():
            raise SubmitError(
                f"slurm.accelerate_config={s.accelerate_config!r} not found; use "
                "configs/accelerate/multi_gpu.yaml (DDP) or configs/accelerate/deepspeed_zero2.yaml"
            )
    elif (
        any(st.launch == "accelerate" for st in stages)
        and repo_path(s.accelerate_config).is_file()
        and is_deepspeed(repo_path(s.accelerate_config))
    ):
        raise SubmitError(
            f"slurm.accelerate_config={s.accelerate_config!r} is DeepSpeed, which needs GPUs here: "
            "set slurm.gpus_per_node > 0 or slurm.accelerate_config=configs/accelerate/multi_gpu.yaml"
        )
    for st in stages:
        if not (REPO / st.script).is_file():
            raise SubmitError(f"stage {st.name}: {st.script} not found in {REPO}")
    first = stages[0]
    if first.name in ("train-ae", "encode"):
        manifest = repo_path(cfg.data.shards) / "manifest.json"
        if not manifest.is_file():
            raise SubmitError(
                f"data.shards={cfg.data.shards!r} has no manifest.json; prepare it first: "
                f"python -m data_pipeline.prepare --out {cfg.data.shards}"
            )


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
        f.write(
            json.dumps(
                {
                    "job_id": job_id,
                    "stage": stage.name,
                    "run": cfg.run.name,
                    "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "dependency": dependency,
                }
            )
            + "\n"
        )
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


def accounted_state(job_id: str) -> dict[str, str]:
    """State and exit code of a finished job from ``sacct``, for jobs slurmctld has forgotten
    (it keeps a finished job only MinJobAge seconds, 300 by default). Asks the accounting
    database first, then the job-completion log (``sacct -c``, for clusters that keep only
    that); empty when neither knows the job."""
    for extra in ([], ["-c"]):
        proc = _run(["sacct", *extra, "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode"])
        if proc.returncode != 0:
            continue
        records = [f for f in (line.split("|") for line in proc.stdout.splitlines()) if len(f) == 3 and f[0] == job_id]
        if records:
            # The last record: a requeued job has one per run; State may read "CANCELLED by 0".
            _, state, exit_code = records[-1]
            return {"JobState": state.split()[0], "ExitCode": exit_code}
    return {}


def cmd_status(cfg: Config) -> int:
    jobs = recorded_jobs(cfg)
    if not jobs:
        print(f"no jobs recorded for run {cfg.run.name!r} ({jobs_file(cfg)})")
        return 0
    print(f"{'JOBID':>8}  {'STAGE':9}  {'STATE':12}  {'RESTARTS':8}  {'EXIT':6}  LOG")
    for j in jobs:
        # slurmctld forgets finished jobs after MinJobAge; sacct still knows them. GONE: nobody does.
        info = job_state(j["job_id"]) or accounted_state(j["job_id"])
        state = info.get("JobState", "GONE")
        print(
            f"{j['job_id']:>8}  {j['stage']:9}  {state:12}  {info.get('Restarts', '-'):8}  "
            f"{info.get('ExitCode', '-'):6}  {log_dir(cfg) / (cfg.run.name + '-' + j['stage'] + '-' + j['job_id'] + '.out')}"
        )
    return 0


def cmd_cancel(cfg: Config) -> int:
    live = [
        j["job_id"]
        for j in recorded_jobs(cfg)
        if job_state(j["job_id"]).get("JobState")
        in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "CONFIGURING", "COMPLETING", "REQUEUE_HOLD")
    ]
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
    print(
        f"run folder {run_dir(cfg)}; watch: python -m cluster.submit status --config {config_path}; "
        f"TensorBoard: tensorboard --logdir {run_dir(cfg) / 'tb'}"
    )
    return 0


# ----------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m cluster.submit",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:]) + "\n" + CONFIG_KEYS_HELP,
    )
    p.add_argument("command", choices=[*STAGES, "pipeline", "status", "cancel"])
    p.add_argument("--config", required=True, help="YAML config (configs/smoke.yaml, gpu.yaml, multinode.yaml)")
    p.add_argument("--nodes", type=int, help="slurm.nodes")
    p.add_argument("--gpus-per-node", type=int, help="slurm.gpus_per_node (0: CPU-only)")
    p.add_argument("--cpu-processes-per-node", type=int, help="slurm.cpu_processes_per_node (CPU-only jobs)")
    p.add_argument("--partition", help="slurm.partition")
    p.add_argument("--time", help="slurm.time, e.g. 04:00:00")
    p.add_argument(
        "--stages",
        help="pipeline only: comma-separated stages (slurm.pipeline), e.g. "
        "train-ae,encode,train-dit (score follows train-dit)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the job script(s) instead of submitting")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. dit.max_steps=100")
    return p.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    for flag, key in (
        ("nodes", "nodes"),
        ("gpus_per_node", "gpus_per_node"),
        ("cpu_processes_per_node", "cpu_processes_per_node"),
        ("partition", "partition"),
        ("time", "time"),
    ):
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
