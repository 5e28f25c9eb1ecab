"""The `slurm:` section of the config: Slurm submission (python -m cluster.submit)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from configs.checks import _at_most, _check, _non_negative, _one_line, _positive

# Slurm partition/account/qos names, constraint expressions and single sbatch options as #SBATCH
# values (sbatch splits #SBATCH lines on whitespace and interprets quotes).
SLURM_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
SLURM_NAMES_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}(,[A-Za-z0-9_][A-Za-z0-9._+-]{0,127})*")
CONSTRAINT_RE = re.compile(r"[A-Za-z0-9_.:*&|,!\[\]()-]{1,512}")
SBATCH_ARG_RE = re.compile(r"--?[A-Za-z][A-Za-z0-9-]*(=[^\s'\"`$\\\x00-\x1f\x7f]+)?")


@dataclass
class SlurmConfig:
    """Slurm submission (python -m cluster.submit); see cluster/slurm/ for the job templates."""

    partition: str = ""
    """Partition (empty: the cluster's default)."""
    account: str = ""
    """Account charged for the jobs (empty: the user's default)."""
    qos: str = ""
    """Quality of service (empty: the default)."""
    time: str = ""
    """Wall-clock limit per job run, e.g. 04:00:00 or 1-12:00:00 (empty: the partition's default).
    A job that reaches it is requeued and resumes, so it bounds one run, not the whole stage."""
    mem: str = ""
    """Memory per node, e.g. 64G (0: all of it; empty: the partition's default)."""
    constraint: str = ""
    """Node features (sbatch --constraint), e.g. a100|h100."""
    nodes: int = 1
    """Nodes for training and Ray jobs."""
    gpus_per_node: int = 0
    """GPUs per node (0: CPU-only job)."""
    cpu_processes_per_node: int = 1
    """CPU-only jobs (gpus_per_node = 0): training processes per node, one Slurm task each; they form
    a gloo group (2 on one node = a real two-rank run). GPU jobs run one process per GPU instead."""
    cpus_per_task: int = 0
    """CPU cores per Slurm task: per node in GPU jobs (one task runs all the node's GPU processes),
    per process in CPU-only jobs (0: the cluster's default)."""
    accelerate_config: str = "configs/accelerate/multi_gpu.yaml"
    """Accelerate config of GPU training jobs: configs/accelerate/multi_gpu.yaml (DDP) or
    configs/accelerate/deepspeed_zero2.yaml (DeepSpeed ZeRO-2). CPU-only jobs use DDP over gloo."""
    python: str = ""
    """Interpreter the jobs run (absolute path; empty: the one running cluster.submit)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines every job runs first, e.g. ["module load cuda/12.4", "source ~/env/bin/activate"]."""
    log_dir: str = ""
    """Folder for the sbatch logs (empty: <run dir>/slurm). Logs are appended to across requeues."""
    signal_seconds: int = 120
    """Seconds before the time limit Slurm sends USR1 to the batch script (checkpoint and requeue)."""
    requeue: bool = True
    """Requeue a job that was stopped by a signal before it finished (it resumes from its checkpoint)."""
    main_process_port: int = 0
    """Rendezvous port of multi-process training on the first node (0: a free port picked at job start)."""
    ray_port: int = 0
    """Port of the Ray head's GCS on the first node (0: a free port picked at job start)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra sbatch options, one per item, e.g. ["--exclusive", "--mail-type=END"]."""
    pipeline: list[str] = field(default_factory=lambda: ["train-ae", "encode", "train-dit", "score", "sindy"])
    """Stages `python -m cluster.submit pipeline` chains with --dependency=afterok, in this order."""

    def __post_init__(self) -> None:
        _positive("slurm", nodes=self.nodes, cpu_processes_per_node=self.cpu_processes_per_node)
        _non_negative(
            "slurm",
            gpus_per_node=self.gpus_per_node,
            cpus_per_task=self.cpus_per_task,
            signal_seconds=self.signal_seconds,
            main_process_port=self.main_process_port,
            ray_port=self.ray_port,
        )
        _check(
            self.main_process_port < 65536 and self.ray_port < 65536,
            f"slurm ports must be < 65536, got main_process_port={self.main_process_port} ray_port={self.ray_port}",
        )
        # Generous bounds that still catch a slipped digit before sbatch queues an impossible job.
        _at_most("slurm", 4096, nodes=self.nodes)
        _at_most("slurm", 64, gpus_per_node=self.gpus_per_node)
        _at_most("slurm", 1024, cpu_processes_per_node=self.cpu_processes_per_node, cpus_per_task=self.cpus_per_task)
        _at_most("slurm", 65535, signal_seconds=self.signal_seconds)  # sbatch --signal's own limit
        time_re = (
            r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)"
        )
        _check(
            self.time == "" or re.fullmatch(time_re, self.time) is not None,
            f"slurm.time must be a Slurm time limit like 04:00:00 or 1-12:00:00, got {self.time!r}",
        )
        _check(
            self.mem == "" or re.fullmatch(r"\d+[KMGT]?", self.mem) is not None,
            f"slurm.mem must be a size like 64G or 0 (all of the node), got {self.mem!r}",
        )
        # These go into #SBATCH lines: a newline there would end the comment and run the rest as
        # shell, and sbatch stops reading #SBATCH lines after it. Slurm's own names are plain words.
        for key, value, pattern, example in (
            ("partition", self.partition, SLURM_NAMES_RE, "gpu or gpu,cpu"),
            ("account", self.account, SLURM_NAME_RE, "proj123"),
            ("qos", self.qos, SLURM_NAME_RE, "normal"),
            ("constraint", self.constraint, CONSTRAINT_RE, "a100|h100 or [rack1*2&rack2*4]"),
        ):
            _check(
                value == "" or pattern.fullmatch(value) is not None,
                f"slurm.{key} must look like {example} (letters, digits and Slurm's operators only), got {value!r}",
            )
        _check(
            self.python == "" or self.python.startswith("/"),
            f"slurm.python must be an absolute path (jobs start in other shells), got {self.python!r}",
        )
        for key, value in (
            ("python", self.python),
            ("log_dir", self.log_dir),
            ("accelerate_config", self.accelerate_config),
        ):
            _one_line(f"slurm.{key}", value)
        stages = ("train-ae", "encode", "train-dit", "score", "sindy")
        _check(
            len(self.pipeline) > 0 and all(s in stages for s in self.pipeline),
            f"slurm.pipeline must be a non-empty list of {stages}, got {list(self.pipeline)}",
        )
        _check(
            len(set(self.pipeline)) == len(self.pipeline), f"slurm.pipeline lists a stage twice: {list(self.pipeline)}"
        )
        for arg in self.sbatch_args:
            _check(
                SBATCH_ARG_RE.fullmatch(arg) is not None,
                f"slurm.sbatch_args items must be single sbatch options like --exclusive or --mail-type=END "
                f"(no spaces, quotes, '$', backticks, backslashes or control characters), got {arg!r}",
            )
        for line in self.setup:
            _one_line("slurm.setup items", line)
