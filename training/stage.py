"""Helpers the stages share: data in memory, checkpoint digests, the start of a stage.

The run folder's artefacts (weights, latents) are saved and loaded by models.artifacts."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from configs.cli import UserError
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
        return load_split_in_memory(cfg.data.shards, split, device=device)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        raise UserError(str(e).strip().splitlines()[0]) from None


def load_images(cfg: Config, split: str, device: torch.device) -> torch.Tensor:
    return load_split(cfg, split, device)[0]


def start_stage(acc, cfg: Config, stage: str, digest: str) -> tuple[Path, Path | None]:
    """Check ``resume`` against the stage's checkpoints, then save the config and open TensorBoard.

    Runs before the first training step and before anything is written, so a resume that
    cannot be honoured (another configuration, a fresh start over old checkpoints) leaves the
    run folder as it was. TensorBoard events past the resumed step (logged by the interrupted
    run after its last checkpoint) are purged, so each step reads back once.

    Returns:
        The stage's checkpoint folder ``runs/<name>/checkpoints/<stage>`` and the checkpoint to
        resume from (None for a fresh start).
    """
    ckpt_root = cfg.run.dir / "checkpoints" / stage

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
        acc.get_tracker("tensorboard", unwrap=True).add_text("config", f"```\n{to_yaml(cfg)}\n```", 0)
    return ckpt_root, ckpt
