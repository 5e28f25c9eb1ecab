"""Shared plumbing of the training entry points: Accelerator, LR schedule, signals and preemption.

The checkpoint store is training/checkpoints.py. Checkpoints are Accelerate ``save_state`` folders written under a temporary name and renamed
into place once every rank has written its part, so a run killed mid-save never leaves a
folder that ``resume=auto`` would pick up. The last file written into a checkpoint is
``checkpoint.sha256`` (``sha256sum -c`` format) over every other file, all fsynced first: a
folder without it, or whose files no longer match it (a truncated copy, a disk error), is
skipped by ``resume=auto`` in favour of the previous intact one. Our own state (step
counters, per-rank noise generators, EMA) is stored as JSON and safetensors beside
Accelerate's files rather than through ``register_for_checkpointing``, which pickles and
loads with ``weights_only=False``.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from configs.cli import LAUNCH_DIR_ENV
from configs.schema import OptimConfig

"""Written last into every checkpoint: ``<sha256>  <relative path>`` per file."""

PREEMPTED_EXIT = 75
"""Exit code of a stage that checkpointed and stopped for a signal (preemption, time limit)
before it finished: its final outputs are not written; rerun with ``resume=auto`` to continue.
75 is EX_TEMPFAIL of sysexits.h ("temporary failure, retry"), distinct from success (0),
a crash (1) and bad input (2)."""


def make_accelerator(opt: OptimConfig, run_dir: Path, cpu: bool | None = None) -> Accelerator:
    """One Accelerator per stage; TensorBoard logs go to ``run_dir/tb/<stage>``."""
    if cpu is None:
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    acc = Accelerator(
        mixed_precision=opt.mixed_precision,
        gradient_accumulation_steps=opt.grad_accum,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
        cpu=cpu,
    )
    return acc


def seed_everything(seed: int) -> None:
    # Model init draws from the global RNG, identically on every rank (DDP also broadcasts).
    set_seed(seed, deterministic=False)


def total_steps(opt: OptimConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, or epochs over the split."""
    if opt.max_steps > 0:
        return opt.max_steps
    return max(1, math.ceil(opt.epochs * batches_per_epoch / opt.grad_accum))


def make_optimizer(params, opt: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = bool(opt.fused_adamw and device.type == "cuda")
    return torch.optim.AdamW(
        params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, fused=fused or None
    )


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warmup to the peak LR, then cosine annealing to ``peak * min_ratio`` at ``total``.

    ``total`` and ``warmup`` count optimizer steps, and the training loop steps the scheduler
    once per optimizer step itself. Do not pass it through ``Accelerator.prepare``: Accelerate's
    wrapper steps it once per *process* per optimizer step (it assumes the schedule was sized
    for one process), which on N processes ran the schedule N times too fast.
    """

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore_scheduler(scheduler, step: int) -> None:
    """Put ``scheduler`` (and its optimizer's LR) where it is after ``step`` optimizer steps.

    The schedule is a pure function of the step (LambdaLR has no other state), so checkpoints
    do not store it; this also makes the LR of a resumed run independent of how it was saved.
    """
    with warnings.catch_warnings():
        # torch warns that the scheduler steps before the optimizer: here that is the point.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`", category=UserWarning)
        scheduler.last_epoch = step - 1
        scheduler.step()


class StopFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's preemption warning) or the launcher's stop file; the loop
    checkpoints and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        launch_dir = os.environ.get(LAUNCH_DIR_ENV)
        self._stop_file = Path(launch_dir) / "stop" if launch_dir else None

    def install(self) -> StopFlag:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)
        _stop_when_parent_dies()
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum

    def __bool__(self) -> bool:
        if self.signum is None and self._stop_file is not None and self._stop_file.exists():
            self.signum = signal.SIGUSR1
        return self.signum is not None


def _stop_when_parent_dies() -> None:
    """Ask Linux for SIGUSR1 when the launcher that started this worker dies.

    A signal that kills ``accelerate launch`` (its simple launcher does not handle SIGUSR1 or
    SIGTERM; torchrun's workers run in their own session) would otherwise orphan this worker,
    which would train on unseen. With PR_SET_PDEATHSIG it checkpoints and exits instead. Only
    under a launcher: a worker started from a shell (``nohup``, ``setsid``) must outlive it. The
    standard library has no binding for prctl, hence ctypes; elsewhere this is a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    ppid = os.getppid()
    try:
        parent = Path(f"/proc/{ppid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return
    if b"accelerate" not in parent and b"torch.distributed" not in parent and b"torchrun" not in parent:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGUSR1), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != ppid:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGUSR1)


def exit_preempted() -> None:
    """Leave a stage that checkpointed for a stop request without its final outputs.

    Under ``python -m training.launch`` the worker records the preemption in the launch folder
    and exits 0, because ``accelerate launch`` turns any nonzero worker exit into a traceback and
    exit 1; the wrapper then exits with PREEMPTED_EXIT. Run directly, it exits PREEMPTED_EXIT.
    """
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    if launch_dir and Path(launch_dir).is_dir():
        (Path(launch_dir) / f"preempted.{os.getpid()}").touch()
        sys.exit(0)
    sys.exit(PREEMPTED_EXIT)
