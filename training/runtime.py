"""Shared plumbing of the training entry points: CLI, Accelerator, LR schedule, checkpoints.

Checkpoints are Accelerate ``save_state`` folders written under a temporary name and renamed
into place once every rank has written its part, so a run killed mid-save never leaves a
folder that ``resume=auto`` would pick up. Our own state (step counters, per-rank noise
generators, EMA) is stored as JSON and safetensors beside Accelerate's files rather than
through ``register_for_checkpointing``, which pickles and loads with ``weights_only=False``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import load_file, save_file

from training.config import Config, ConfigError, OptimConfig, load_config

CKPT_RE = re.compile(r"^step_(\d{8})$")


class UserError(RuntimeError):
    """An expected failure caused by input (missing files, mismatched runs): one-line message, exit 2."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints the whole usage block first; the house rule is one line naming the problem.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_cli(argv: Sequence[str] | None, description: str) -> Config:
    """``--config X.yaml key=value ...`` -> validated Config."""
    p = _OneLineParser(description=description)
    p.add_argument("--config", required=True, help="YAML config (configs/smoke.yaml, local.yaml, gpu.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ae.lr=1e-3 resume=auto")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides)


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run an entry point, turning expected errors into one line on stderr and exit code 2.

    Expected: bad config (including YAML syntax), UserError, a missing file, and the data
    pipeline's errors (a corrupt shard met by the streaming loader mid-training names the shard).
    """
    from data_pipeline.sources import DataPipelineError  # light: no torch, no webdataset

    try:
        main(argv)
    except (ConfigError, UserError, FileNotFoundError, DataPipelineError) as e:
        # A live progress bar has no newline yet: close it so the error gets a line of its own.
        bars = getattr(sys.modules.get("tqdm"), "tqdm", None)
        for bar in list(getattr(bars, "_instances", ())):
            bar.close()
        prog = Path(sys.argv[0]).name
        msg = " ".join(str(e).split("\n"))  # one line even when a library's message has several
        print(f"{prog}: error: {msg}", file=sys.stderr)
        sys.exit(2)


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
    return torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay,
                             fused=fused or None)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float):
    """Linear warmup to the peak LR, then cosine annealing to ``peak * min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class TrainState:
    """Where a run is: optimizer steps done and the position in the data stream."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    config_digest: str = ""


class StopFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's preemption warning); the loop checkpoints and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> "StopFlag":
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of killed saves are ignored)."""
    if not ckpt_root.is_dir():
        return []
    done = [p for p in ckpt_root.iterdir() if CKPT_RE.match(p.name) and (p / "train_state.json").is_file()]
    return sorted(done, key=lambda p: p.name)


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """Map the ``resume`` setting to a checkpoint folder (or None for a fresh start)."""
    found = list_checkpoints(ckpt_root)
    if resume == "none":
        if found:
            raise UserError(f"{ckpt_root} already holds checkpoints ({found[-1].name}); pass resume=auto to "
                            "continue, or pick another run.name")
        return None
    if resume == "auto":
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "train_state.json").is_file():
        raise UserError(f"resume={resume}: not a complete checkpoint folder (no train_state.json)")
    return path


def save_checkpoint(acc: Accelerator, ckpt_root: Path, state: TrainState, keep: int,
                    generator: torch.Generator, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Save model/optimizer/scheduler (Accelerate), our counters, this rank's generator and ``extra``.

    All ranks must call this (Accelerate's save_state is collective under DeepSpeed).
    """
    final = ckpt_root / f"step_{state.step:08d}"
    tmp = ckpt_root / f".tmp-step_{state.step:08d}"
    if acc.is_main_process:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    rank = acc.process_index
    save_file({"state": generator.get_state()}, str(tmp / f"generator_rank{rank}.safetensors"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if extra:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in extra.items()},
                      str(tmp / "extra.safetensors"))
        (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=1))
        if final.exists():  # re-saving the same step (e.g. end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def check_checkpoint(path: Path, expect_digest: str) -> TrainState:
    """Read a checkpoint's counters; refuse one written with another model/optimizer configuration."""
    state = TrainState(**json.loads((path / "train_state.json").read_text()))
    if state.config_digest and state.config_digest != expect_digest:
        raise UserError(f"checkpoint {path} was written with a different model/optimizer configuration "
                        f"(digest {state.config_digest} != {expect_digest}); resume it with its own "
                        "config.yaml or start a new run.name")
    return state


def preflight_resume(resume: str, ckpt_root: Path, expect_digest: str) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), checked before any output is written.

    Raises:
        UserError: ``resume`` cannot be honoured (see ``resolve_resume`` and ``check_checkpoint``).
    """
    path = resolve_resume(resume, ckpt_root)
    if path is not None:
        check_checkpoint(path, expect_digest)
    return path


def load_checkpoint(acc: Accelerator, path: Path, generator: torch.Generator,
                    expect_digest: str) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Restore what ``save_checkpoint`` wrote; refuses a checkpoint of a different configuration."""
    state = check_checkpoint(path, expect_digest)
    try:
        acc.load_state(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} does not fit this model: {first}") from None
    gfile = path / f"generator_rank{acc.process_index}.safetensors"
    if not gfile.is_file():
        raise UserError(f"{gfile} is missing: the checkpoint was written with fewer processes than this run")
    generator.set_state(load_file(str(gfile))["state"])
    extra_file = path / "extra.safetensors"
    extra = load_file(str(extra_file)) if extra_file.is_file() else {}
    return state, extra


def clean_stale_tmp(ckpt_root: Path) -> None:
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def save_weights(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Final weights as safetensors, written atomically."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=metadata)
    os.replace(tmp, path)
