"""The optimisation loop shared by train_ae.py and train_dit.py.

A stage gives the loss of a batch and optional hooks (EMA update, image logging, extra
checkpoint tensors); this loop owns gradient accumulation, clipping, the LR schedule,
rank-averaged logging, checkpoints, exact resume and the preemption stop.

Step accounting: ``state.step`` counts optimizer steps, each of ``grad_accum`` micro-batches of
``batch_size`` on each of the N processes; the LR schedule, EMA warm-up, ``checkpoint_every``,
``log_every`` and ``max_steps`` all count these, so they mean the same on 1 or N processes with
the same global batch. The device is synchronised only at log, checkpoint and stop-check steps.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from configs.schema import OptimConfig
from training.checkpoints import TrainState, clean_stale_tmp, load_checkpoint, save_checkpoint, set_aside_newer
from training.runtime import StopFlag, restore_scheduler

STOP_SYNC_EVERY = 10
"""On N processes the ranks agree on a stop request every this many steps (and at log steps):
an all-reduce every step would synchronise the device every step."""

LossFn = Callable[[tuple, torch.Generator], tuple[torch.Tensor, dict]]


@dataclass
class Hooks:
    """What a stage adds to the loop."""

    after_step: Callable[[int], None] | None = None
    """Called after every optimizer step with the step number (EMA update)."""
    log_images: Callable[[int, object], None] | None = None
    """Called on the main process every ``image_every`` steps with (step, SummaryWriter)."""
    extra_state: Callable[[], dict[str, torch.Tensor]] | None = None
    """Tensors saved with every checkpoint (EMA weights)."""
    load_extra: Callable[[dict[str, torch.Tensor]], None] | None = None
    """Restores what ``extra_state`` saved."""


@dataclass
class LoopResult:
    state: TrainState
    stopped_early: bool
    seconds: float
    last_loss: float = math.nan
    history: list[tuple[int, float]] = field(default_factory=list)


def _stream(batches, state: TrainState) -> Iterator[tuple]:
    """Endless batches across epochs, keeping ``state``'s position current."""
    while True:
        for batch in batches.epoch(state.epoch, state.batch_in_epoch):
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def tensorboard_writer(acc: Accelerator):
    """The SummaryWriter behind Accelerate's TensorBoard tracker (main process), else None."""
    if not acc.is_main_process:
        return None
    return acc.get_tracker("tensorboard", unwrap=True)


def run_loop(
    acc: Accelerator,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    batches,
    opt: OptimConfig,
    total: int,
    loss_fn: LossFn,
    ckpt_root: Path,
    ckpt: Path | None,
    seed: int,
    digest: str,
    hooks: Hooks,
    stop: StopFlag,
    desc: str,
) -> LoopResult:
    """Train until ``total`` optimizer steps (or a stop signal), checkpointing on the way.

    ``scheduler`` must be the plain torch scheduler, not one passed through ``acc.prepare``:
    this loop steps it exactly once per optimizer step.
    """
    generator = torch.Generator(device=acc.device).manual_seed(seed * 7919 + 1 + acc.process_index)
    state = TrainState(config_digest=digest)
    if ckpt is not None:
        state, extra = load_checkpoint(acc, ckpt, generator, digest)
        if hooks.load_extra:
            hooks.load_extra(extra)
        acc.print(f"resumed from {ckpt} at step {state.step}")
    restore_scheduler(scheduler, state.step)
    if acc.is_main_process:
        clean_stale_tmp(ckpt_root)
        for bad in set_aside_newer(ckpt_root, state.step):
            print(f"{desc}: set aside broken checkpoint as {bad}", file=sys.stderr)
    acc.wait_for_everyone()
    writer = tensorboard_writer(acc)
    samples_per_step = opt.batch_size * opt.grad_accum * acc.num_processes
    stream = _stream(batches, state)
    clip = opt.grad_clip if opt.grad_clip > 0 else float("inf")
    result = LoopResult(state=state, stopped_early=False, seconds=0.0)
    # Running sums stay on the device; they are read (a sync) only at log steps.
    loss_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
    gnorm_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
    window = 0
    t0 = t_log = time.perf_counter()
    # A carriage-return bar in a log file (Slurm, nohup) is one endless line: plain lines instead.
    interactive = sys.stderr.isatty()
    bar = tqdm(
        total=total,
        initial=state.step,
        desc=desc,
        dynamic_ncols=True,
        disable=not (interactive and acc.is_local_main_process),
    )
    while state.step < total:
        gnorm = None
        for _ in range(opt.grad_accum):
            batch = next(stream)
            with acc.accumulate(model):
                loss, _metrics = loss_fn(batch, generator)
                acc.backward(loss)
                if acc.sync_gradients:
                    gnorm = acc.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().double() / opt.grad_accum
        # Once per optimizer step whatever the number of processes (see cosine_with_warmup).
        scheduler.step()
        state.step += 1
        gnorm_sum += (
            gnorm.detach().double()
            if isinstance(gnorm, torch.Tensor)
            else (math.nan if gnorm is None else float(gnorm))
        )
        window += 1
        if hooks.after_step:
            hooks.after_step(state.step)
        bar.update(1)
        last = state.step >= total
        log_step = state.step % opt.log_every == 0 or last
        if log_step:
            # Every rank contributes its share: the logged loss is the mean over all ranks.
            mean_loss = (acc.reduce(loss_sum, "mean") / window).item()
            now = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            sps = samples_per_step * window / max(now - t_log, 1e-9)
            values = {"loss": mean_loss, "lr": lr, "grad_norm": gnorm_sum.item() / window, "samples_per_s": sps}
            acc.log({f"train/{k}": v for k, v in values.items()}, step=state.step)
            result.last_loss = mean_loss
            result.history.append((state.step, mean_loss))
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if not interactive and acc.is_main_process:
                print(
                    f"{desc}: step {state.step}/{total} loss {mean_loss:.4f} lr {lr:.3g} "
                    f"{sps:.0f} samples/s {now - t0:.0f} s",
                    flush=True,
                )
            loss_sum.zero_()
            gnorm_sum.zero_()
            window, t_log = 0, now
        if writer is not None and hooks.log_images and (state.step % opt.image_every == 0 or last):
            hooks.log_images(state.step, writer)
        stopping = bool(stop)
        if acc.num_processes > 1:
            # A signal may reach only some ranks, and at different steps; all must agree to
            # checkpoint and stop at the same step. The step numbers where they compare are the
            # same on every rank, so every rank enters each all-reduce.
            if log_step or state.step % STOP_SYNC_EVERY == 0:
                flag = torch.tensor(float(stopping), device=acc.device)
                stopping = bool(acc.reduce(flag, "sum").item() > 0)
            else:
                stopping = False
        if state.step % opt.checkpoint_every == 0 or last or stopping:
            extra = hooks.extra_state() if hooks.extra_state else None
            save_checkpoint(acc, ckpt_root, state, opt.keep_checkpoints, generator, extra)
        if stopping and not last:
            acc.print(f"{signal.Signals(stop.signum).name}: checkpointed at step {state.step}, exiting for requeue")
            result.stopped_early = True
            break
    bar.close()
    result.seconds = time.perf_counter() - t0
    return result
