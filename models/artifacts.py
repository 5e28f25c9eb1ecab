"""Run artifacts of a run folder: saving and loading the trained autoencoder, the DiT, the
latent statistics and the encoded latents, with the checks that they belong together.

Weights are safetensors written atomically (configs.io); each loader raises UserError naming
the missing or mismatched file and the stage that writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from configs.cli import UserError
from configs.io import atomic_save_safetensors, file_sha256, read_json, read_safetensors
from configs.text import shorten
from models.autoencoder import build_autoencoder
from models.dit import DiT, DiTConfig
from models.schedules import schedule_for

_AE_FIX = "; re-run training/train_ae.py for this run (or restore the file)"
_DIT_FIX = "; re-run training/train_dit.py for this run (or restore the file)"


def _field(meta: dict, key: str, kinds: type | tuple[type, ...], path: Path, fix: str):
    """``meta[key]``, checked to exist and to be of ``kinds``, else one line naming the file and field."""
    if key not in meta:
        raise UserError(f"{path}: field {key!r} is missing{fix}")
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise UserError(f"{path}: field {key!r} must be {names}, got {shorten(value, 100)}{fix}")
    return value


def _latent_shape(meta: dict, path: Path, fix: str) -> list[int]:
    shape = _field(meta, "latent_shape", list, path, fix)
    if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise UserError(f"{path}: field 'latent_shape' must be a list of positive ints, got {shorten(shape, 100)}{fix}")
    return shape


def read_ae_meta(run_dir: Path, missing: str | None = None) -> dict:
    """``run_dir/ae.json`` with the fields the loaders use checked (kind, latent_shape, kl_weight)."""
    path = run_dir / "ae.json"
    meta = read_json(
        path, missing=missing or f"{path} not found: run training/train_ae.py for this run first", hint=_AE_FIX
    )
    _field(meta, "kind", str, path, _AE_FIX)
    _latent_shape(meta, path, _AE_FIX)
    if "kl_weight" in meta:
        _field(meta, "kl_weight", (int, float), path, _AE_FIX)
    return meta


def read_dit_meta(run_dir: Path) -> dict:
    """``run_dir/dit.json`` with the fields the loaders use checked: kind, latent_shape, schedule_kind,
    timesteps and dit_config (every key a DiTConfig field). One line naming the file and field otherwise."""

    path = run_dir / "dit.json"
    meta = read_json(path, missing=f"{path} not found: run training/train_dit.py for this run first", hint=_DIT_FIX)
    _field(meta, "kind", str, path, _DIT_FIX)
    _latent_shape(meta, path, _DIT_FIX)
    _field(meta, "schedule_kind", str, path, _DIT_FIX)
    timesteps = _field(meta, "timesteps", int, path, _DIT_FIX)
    if timesteps < 1:
        raise UserError(f"{path}: field 'timesteps' must be >= 1, got {timesteps}{_DIT_FIX}")
    arch = _field(meta, "dit_config", dict, path, _DIT_FIX)
    known = {f.name for f in fields(DiTConfig)}
    unknown = sorted(set(arch) - known)
    if unknown:
        raise UserError(
            f"{path}: field 'dit_config' has unknown key {shorten(unknown[0], 100)} (known: {', '.join(sorted(known))}){_DIT_FIX}"
        )
    return meta


def dit_config_of(meta: dict, path: Path):
    """The DiTConfig that dit.json (read by :func:`read_dit_meta`) records, or one line naming the bad value."""

    arch = dict(meta["dit_config"])
    if arch.get("grid") is not None:
        arch["grid"] = tuple(arch["grid"]) if isinstance(arch["grid"], list) else arch["grid"]
    try:
        return DiTConfig(**arch)
    except (TypeError, ValueError) as exn:
        raise UserError(f"{path}: field 'dit_config' is invalid: {shorten(str(exn), 300)}{_DIT_FIX}") from None


def save_weights(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Final weights as safetensors (float32, CPU), written atomically."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_save_safetensors(sd, path, metadata)


def describe_nonfinite(arrays: dict, axes: tuple[str, ...] = ("step", "trajectory", "dimension")) -> str | None:
    """Where the first NaN or Inf of some named arrays (numpy or torch) is, as words, or None when all are finite.

    e.g. ``holds 3 NaN or Inf values in 'drift' (first at step 4, trajectory 2, dimension 3)``: what a refused
    trajectory block's message says.
    """

    for name, a in arrays.items():
        if a is None:
            continue
        a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        bad = ~np.isfinite(a)
        if bad.any():
            first = np.argwhere(bad)[0]
            where = ", ".join(f"{axis} {int(i)}" for axis, i in zip(axes, first))
            return f"holds {int(bad.sum())} NaN or Inf values in {name!r} (first at {where})"
    return None


def check_finite_latents(z: torch.Tensor, where: str) -> None:
    """Refuse latents (N, T, C) holding NaN or Inf: one line naming ``where``, the first sample and coordinate."""
    bad = ~torch.isfinite(z)
    if bad.any():
        sample, token, channel = (int(i) for i in bad.nonzero()[0])
        raise UserError(
            f"{where} holds {int(bad.sum())} NaN or Inf values (first: sample {sample}, token {token}, channel "
            f"{channel}): the autoencoder's weights or its input are broken; re-train with training/train_ae.py"
        )


def save_latents(path: Path, latents: torch.Tensor, labels: torch.Tensor, ae_sha256: str, kind: str) -> None:
    """One encoded split (``latents`` raw (N, T, C), ``labels`` (N,)), tagged with the autoencoder
    that encoded it (``load_latent_data`` checks the tag); non-finite latents are refused, not written."""
    check_finite_latents(latents, f"the latents for {path}")
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


def load_finite_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """:func:`load_weights`, refusing a file whose tensors hold NaN or Inf (one line naming the first tensor)."""
    state = load_weights(path, what)
    nonfinite = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if nonfinite:
        more = f" and {len(nonfinite) - 1} more" if len(nonfinite) > 1 else ""
        raise UserError(
            f"{path} holds NaN or Inf values (tensor {nonfinite[0]!r}{more}): the training diverged or the file "
            f"was damaged; train the {what} of this run again"
        )
    return state


def load_autoencoder(run_dir: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The trained autoencoder of a run folder (eval mode) and its ae.json metadata."""
    meta = read_ae_meta(run_dir)
    try:
        model = build_autoencoder(meta["kind"], meta.get("kl_weight", 1.0))
    except ValueError as e:
        raise UserError(f"{run_dir / 'ae.json'}: field 'kind': {shorten(str(e), 300)}{_AE_FIX}") from None
    weights = load_finite_weights(run_dir / "ae.safetensors", "autoencoder")  # truncated, corrupt or NaN: one line
    try:
        model.load_state_dict(weights)
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
    if not (torch.isfinite(s["mean"]).all() and torch.isfinite(s["std"]).all() and (s["std"] > 0).all()):
        raise UserError(f"{stats} holds NaN, Inf or a std <= 0; re-run training/encode_latents.py")
    return s["mean"], s["std"]


def load_latent_data(run_dir: Path, expect_kind: str) -> LatentData:
    """Load and check the encoded train split of ``run_dir`` against its autoencoder.

    Raises:
        UserError: missing stats or latents, an autoencoder of another kind than the config
            asks for, latents whose shape differs from the autoencoder's, or stale latents.
    """
    meta = read_ae_meta(run_dir, missing=f"{run_dir / 'ae.json'} not found: train the autoencoder of this run first")
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
    check_finite_latents(z, str(train_file))
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
        UserError: no trained DiT in the folder, a dit.json that is truncated or has a missing, mistyped or
            unknown field, weights that are truncated, hold NaN/Inf or do not fit the recorded architecture.
    """
    meta_file = run_dir / "dit.json"
    weights = run_dir / ("dit_ema.safetensors" if ema else "dit.safetensors")
    if not meta_file.is_file() or not weights.is_file():
        raise UserError(
            f"{run_dir} has no trained DiT ({meta_file.name} / {weights.name} missing): run "
            "training/train_dit.py for this run first"
        )
    meta = read_dit_meta(run_dir)
    try:
        schedule = schedule_for(meta["kind"], meta["schedule_kind"], meta["timesteps"]).to(device)
    except ValueError as e:
        raise UserError(f"{meta_file}: field 'kind' or 'schedule_kind': {shorten(str(e), 300)}{_DIT_FIX}") from None
    model = DiT(dit_config_of(meta, meta_file))
    state = load_finite_weights(weights, "DiT")  # truncated, corrupt or NaN: its own line
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights} does not match the architecture in {meta_file}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), schedule, meta
