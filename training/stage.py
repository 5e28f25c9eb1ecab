"""Helpers the stages share: data in memory, checkpoint digests, the start of a stage.

The run folder's artefacts (weights, latents) are saved and loaded by models.artifacts."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from configs.cli import UserError
from configs.lock import acquire_stage_lock
from configs.schema import Config, OptimConfig, config_digest, save_config, to_dict, to_yaml
from data_pipeline.loader import load_split_in_memory
from training.checkpoints import preflight_resume

# Cadence fields change how often things are written, not what is computed: a run may be
# resumed with other values for them.
_CADENCE = (
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "image_every",
    "sample_every",
    "num_samples",
    "eval_samples",
)


def optim_digest(section: OptimConfig, seed: int) -> str:
    """Digest of everything that changes the training computation of a stage."""
    d = {k: v for k, v in to_dict(section).items() if k not in _CADENCE}
    d["seed"] = seed
    return config_digest(d)


def param_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's parameters and buffers (bit-exact replica comparison)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_split(cfg: Config, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split: images float32 (N, 1, 28, 28) in [0, 1] and labels (N,) on ``device``.

    Raises:
        UserError: missing, empty or corrupted shards (the message names the folder or shard).
    """
    try:
        return load_split_in_memory(cfg.data.shards, split, device=device, on_error=cfg.data.on_error)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        raise UserError(str(e).strip().splitlines()[0]) from None


def load_images(cfg: Config, split: str, device: torch.device) -> torch.Tensor:
    return load_split(cfg, split, device)[0]


def start_stage(acc, cfg: Config, stage: str, digest: str) -> tuple[Path, Path | None]:
    """Take the stage's lock, check ``resume`` against its checkpoints, then save the config and open TensorBoard.

    Runs before the first training step and before anything is written, so a resume that
    cannot be honoured (another configuration, a fresh start over old checkpoints) leaves the
    run folder as it was. TensorBoard events past the resumed step (logged by the interrupted
    run after its last checkpoint) are purged, so each step reads back once.

    Returns:
        The stage's checkpoint folder ``runs/<name>/checkpoints/<stage>`` and the checkpoint to
        resume from (None for a fresh start).

    Raises:
        configs.lock.StageLocked: another job runs this stage in this run folder (one line naming it, exit 2).
    """
    ckpt_root = cfg.run.dir / "checkpoints" / stage
    if acc.is_main_process:
        # One job per folder and stage; held until the process ends (configs/lock.py).
        acquire_stage_lock(cfg.run.dir, stage)

    def warn(line: str) -> None:
        if acc.is_main_process:
            print(line, file=sys.stderr, flush=True)

    ckpt, step = preflight_resume(cfg.resume, ckpt_root, digest, warn)
    if acc.is_main_process:
        save_config(cfg, cfg.run.dir)
    # purge_step: readers drop this stage's earlier events from that step on (all of them on a
    # fresh start, which may reuse a folder whose checkpoints were deleted).
    acc.init_trackers(stage, init_kwargs={"tensorboard": {"purge_step": step + 1 if ckpt else 0}})
    if acc.is_main_process:
        writer = acc.get_tracker("tensorboard", unwrap=True)
        writer.add_text("config", f"```\n{to_yaml(cfg)}\n```", 0)
        log_hparams(writer, stage_hparams(cfg, stage, acc.num_processes), HPARAM_METRICS[stage])
    return ckpt_root, ckpt


# The scalars the HParams tab shows beside each run's hyperparameters (tags this run logs; the
# dit's eval/* come from analysis/score_samples.py, which writes them into the same tb/dit).
HPARAM_METRICS = {
    "ae": ("train/loss", "eval/test_bce", "eval/test_mse"),
    "dit": ("train/loss", "eval/fd_mnist", "eval/mean_confidence"),
}


def stage_hparams(cfg: Config, stage: str, num_processes: int) -> dict[str, bool | int | float | str]:
    """The hyperparameters of a training stage, flat: its config section, the seed, the latent kind,
    and what the processes make of the per-process batch (global batch, processes)."""
    section = getattr(cfg, stage)
    values = {f"{stage}.{k}": v for k, v in to_dict(section).items() if k not in _CADENCE}
    values.update({"run.seed": cfg.run.seed, "ae.kind": cfg.ae.kind, "num_processes": num_processes})
    values["global_batch"] = section.batch_size * section.grad_accum * num_processes
    # The HParams plugin takes numbers, strings and booleans: lists (betas) become their text.
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in sorted(values.items())}


def log_hparams(writer, hparams: dict, metrics: Sequence[str]) -> None:
    """The HParams tab of this TensorBoard run: ``hparams`` and the ``metrics`` tags beside them.

    Written into the stage's own event folder with TensorBoard's hparams summaries (through
    torch.utils.tensorboard.summary.hparams). Accelerate's ``init_trackers(config=...)`` goes
    through ``SummaryWriter.add_hparams``, which writes them into a new timestamped sub-run per
    (re)start, where the HParams tab finds none of the stage's scalars.
    """
    # optional heavy dependency: tensorboard, only when the HParams are written
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    for summary in hparams_summaries(hparams, {m: None for m in metrics}):
        writer.file_writer.add_summary(summary)
    writer.flush()
