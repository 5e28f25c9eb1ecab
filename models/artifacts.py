"""Run artifacts of a run folder: saving and loading the trained autoencoder, the DiT, the
latent statistics and the encoded latents, with the checks that they belong together.

Weights are safetensors written atomically (configs.io); each loader raises UserError naming
the missing or mismatched file and the stage that writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from configs.cli import UserError
from configs.io import atomic_save_safetensors, file_sha256, read_safetensors
from models.autoencoder import build_autoencoder
from models.dit import DiT, DiTConfig
from models.schedules import schedule_for


def save_weights(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Final weights as safetensors (float32, CPU), written atomically."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_save_safetensors(sd, path, metadata)


def save_latents(path: Path, latents: torch.Tensor, labels: torch.Tensor, ae_sha256: str, kind: str) -> None:
    """One encoded split (``latents`` raw (N, T, C), ``labels`` (N,)), tagged with the autoencoder
    that encoded it (``load_latent_data`` checks the tag)."""
    atomic_save_safetensors(
        {"latents": latents.contiguous(), "labels": labels.contiguous()}, path, {"ae_sha256": ae_sha256, "kind": kind}
    )


def save_latent_stats(run_dir: Path, mean: torch.Tensor, std: torch.Tensor, ae_sha256: str, kind: str) -> Path:
    """``run_dir/latent_stats.safetensors``: the normalisation of the train latents."""
    path = run_dir / "latent_stats.safetensors"
    atomic_save_safetensors(
        {"mean": mean.contiguous(), "std": std.contiguous()}, path, {"ae_sha256": ae_sha256, "kind": kind}
    )
    return path


def load_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    return read_safetensors(path, missing=f"{path} not found: train the {what} first")


def load_autoencoder(run_dir: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The trained autoencoder of a run folder (eval mode) and its ae.json metadata."""
    meta_file = run_dir / "ae.json"
    if not meta_file.is_file():
        raise UserError(f"{meta_file} not found: run training/train_ae.py for this run first")
    meta = json.loads(meta_file.read_text())
    model = build_autoencoder(meta["kind"], meta.get("kl_weight", 1.0))
    try:
        model.load_state_dict(load_weights(run_dir / "ae.safetensors", "autoencoder"))
    except RuntimeError as e:
        raise UserError(
            f"{run_dir / 'ae.safetensors'} does not match a {meta['kind']} autoencoder: {str(e).splitlines()[0]}"
        ) from None
    return model.to(device).eval(), meta


@dataclass
class LatentData:
    """Normalised training latents of a run and what produced them."""

    train: torch.Tensor
    """(N, T, C) float32, normalised: (z - mean) / std."""
    mean: torch.Tensor
    """Broadcastable to (T, C)."""
    std: torch.Tensor
    kind: str
    ae_sha256: str


def load_latent_stats(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    stats = run_dir / "latent_stats.safetensors"
    if not stats.is_file():
        raise UserError(
            f"latent stats {stats} not found: run `python training/encode_latents.py --config ...` for this run first"
        )
    s = load_weights(stats, "latent stats")
    if set(s) != {"mean", "std"}:
        raise UserError(f"{stats} must hold 'mean' and 'std', found {sorted(s)}")
    return s["mean"], s["std"]


def load_latent_data(run_dir: Path, expect_kind: str) -> LatentData:
    """Load and check the encoded train split of ``run_dir`` against its autoencoder.

    Raises:
        UserError: missing stats or latents, an autoencoder of another kind than the config
            asks for, latents whose shape differs from the autoencoder's, or stale latents.
    """
    meta_file = run_dir / "ae.json"
    if not meta_file.is_file():
        raise UserError(f"{meta_file} not found: train the autoencoder of this run first")
    meta = json.loads(meta_file.read_text())
    if meta["kind"] != expect_kind:
        raise UserError(
            f"config has ae.kind={expect_kind} but {run_dir}/ae.json holds a {meta['kind']} "
            f"autoencoder (latent {meta['latent_shape']}); set ae.kind={meta['kind']} or use another run"
        )
    mean, std = load_latent_stats(run_dir)
    train_file = run_dir / "latents" / "train.safetensors"
    if not train_file.is_file():
        raise UserError(f"{train_file} not found: run training/encode_latents.py for this run first")
    data = load_weights(train_file, "latents")
    z = data["latents"]
    shape = list(z.shape[1:])
    if shape != list(meta["latent_shape"]):
        raise UserError(
            f"latents in {train_file} have shape {shape} but the autoencoder's latent is "
            f"{meta['latent_shape']}; re-run training/encode_latents.py"
        )
    try:
        torch.broadcast_shapes(mean.shape, std.shape, tuple(shape))
    except RuntimeError:
        raise UserError(f"latent stats of shape {list(mean.shape)} do not fit latents {shape}") from None
    ae_sha = file_sha256(run_dir / "ae.safetensors")
    with safe_open(str(train_file), "pt") as f:
        written_for = (f.metadata() or {}).get("ae_sha256")
    if written_for != ae_sha:
        raise UserError(
            f"{train_file} was encoded by another autoencoder than {run_dir}/ae.safetensors; "
            "re-run training/encode_latents.py"
        )
    return LatentData(train=(z - mean) / std, mean=mean, std=std, kind=meta["kind"], ae_sha256=ae_sha)


def load_denoiser(run_dir: Path, device: torch.device | str = "cpu", ema: bool = True):
    """The trained DiT of a run folder (EMA weights by default), its schedule and dit.json.

    Returns:
        (model in eval mode, models.schedules.Schedule on ``device``, metadata dict).

    Raises:
        UserError: no trained DiT in the folder, or weights that do not fit the recorded architecture.
    """
    meta_file = run_dir / "dit.json"
    weights = run_dir / ("dit_ema.safetensors" if ema else "dit.safetensors")
    if not meta_file.is_file() or not weights.is_file():
        raise UserError(
            f"{run_dir} has no trained DiT ({meta_file.name} / {weights.name} missing): run "
            "training/train_dit.py for this run first"
        )
    meta = json.loads(meta_file.read_text())
    arch = dict(meta["dit_config"])
    if arch.get("grid") is not None:
        arch["grid"] = tuple(arch["grid"])
    model = DiT(DiTConfig(**arch))
    try:
        model.load_state_dict(load_weights(weights, "DiT"))
    except RuntimeError as e:
        raise UserError(f"{weights} does not match the architecture in {meta_file}: {str(e).splitlines()[0]}") from None
    schedule = schedule_for(meta["kind"], meta["schedule_kind"], meta["timesteps"]).to(device)
    return model.to(device).eval(), schedule, meta
