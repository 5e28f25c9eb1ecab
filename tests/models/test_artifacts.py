"""Damaged run artifacts: a truncated or tampered dit.json / ae.json and truncated or NaN weights are one line
naming the file and the field (issue 19), never a JSONDecodeError, a TypeError or a wrong diagnosis."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from configs.cli import UserError
from models.artifacts import load_autoencoder, load_denoiser, save_weights
from models.autoencoder import build_autoencoder
from models.dit import build_dit


@pytest.fixture
def dit_run(tmp_path: Path) -> Path:
    """A run folder with a real (untrained) tiny vae16 DiT, laid out as training/train_dit.py writes it."""
    model = build_dit("tiny", 1, 16, rope="1d", abs_pos=True)
    for name in ("dit.safetensors", "dit_ema.safetensors"):
        save_weights(model, tmp_path / name)
    meta = {
        "preset": "tiny",
        "kind": "vae16",
        "latent_shape": [16, 1],
        "schedule": "cosine",
        "schedule_kind": "cosine",
        "timesteps": 50,
        "dit_config": dataclasses.asdict(model.cfg),
    }
    (tmp_path / "dit.json").write_text(json.dumps(meta, indent=1))
    return tmp_path


def test_an_intact_run_loads(dit_run: Path) -> None:
    model, schedule, meta = load_denoiser(dit_run)
    assert schedule.T == meta["timesteps"] == 50 and sum(p.numel() for p in model.parameters()) > 0


def _edit_meta(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        meta = json.loads((run / "dit.json").read_text())
        edit(meta)
        (run / "dit.json").write_text(json.dumps(meta))

    return apply


def _truncate(name: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])

    return apply


def _nan_weight(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(run / "dit_ema.safetensors"))
    key = sorted(state)[3]
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(run / "dit_ema.safetensors"))


DAMAGE = {
    "truncated_dit_json": (_truncate("dit.json"), r"dit\.json is truncated or not valid JSON"),
    "unknown_dit_config_key": (
        _edit_meta(lambda m: m["dit_config"].update(flux_capacitor=1)),
        r"dit\.json: field 'dit_config' has unknown key 'flux_capacitor'",
    ),
    "missing_timesteps": (_edit_meta(lambda m: m.pop("timesteps")), r"dit\.json: field 'timesteps' is missing"),
    "string_timesteps": (
        _edit_meta(lambda m: m.update(timesteps="50")),
        r"dit\.json: field 'timesteps' must be int, got '50'",
    ),
    "bad_dit_config_value": (
        _edit_meta(lambda m: m["dit_config"].update(hidden=-3)),
        r"dit\.json: field 'dit_config' is invalid: .*hidden",
    ),
    "unknown_kind": (_edit_meta(lambda m: m.update(kind="gan")), r"dit\.json: field 'kind'"),
    "a_list_not_an_object": (lambda run: (run / "dit.json").write_text("[1, 2]"), r"must hold a JSON object"),
    "truncated_weights": (
        _truncate("dit_ema.safetensors"),
        r"dit_ema\.safetensors is not a readable safetensors file \(truncated or corrupt",
    ),
    "nan_weights": (_nan_weight, r"dit_ema\.safetensors holds NaN or Inf values"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_dit_artifacts_are_one_line_naming_file_and_field(dit_run: Path, damage: str) -> None:
    apply, pattern = DAMAGE[damage]
    apply(dit_run)
    with pytest.raises(UserError, match=pattern) as info:
        load_denoiser(dit_run)
    msg = str(info.value)
    assert "\n" not in msg and "does not match the architecture" not in msg, msg


def test_damaged_ae_artifacts(tmp_path: Path) -> None:
    save_weights(build_autoencoder("vae16", 1.0), tmp_path / "ae.safetensors")
    (tmp_path / "ae.json").write_text(json.dumps({"kind": "vae16", "latent_shape": [16, 1], "kl_weight": 1.0}))
    assert isinstance(load_autoencoder(tmp_path)[0], torch.nn.Module)
    (tmp_path / "ae.json").write_text('{"kind": "vae16", "latent_sh')
    with pytest.raises(UserError, match=r"ae\.json is truncated or not valid JSON"):
        load_autoencoder(tmp_path)
    (tmp_path / "ae.json").write_text(json.dumps({"kind": 3, "latent_shape": [16, 1]}))
    with pytest.raises(UserError, match=r"ae\.json: field 'kind' must be str, got 3"):
        load_autoencoder(tmp_path)
    (tmp_path / "ae.json").write_text(json.dumps({"kind": "vae16", "latent_shape": [16, 1]}))
    data = (tmp_path / "ae.safetensors").read_bytes()
    (tmp_path / "ae.safetensors").write_bytes(data[:-100])
    with pytest.raises(UserError, match=r"ae\.safetensors is not a readable safetensors file \(truncated or corrupt"):
        load_autoencoder(tmp_path)


def test_non_finite_latents_are_neither_written_nor_read(tmp_path: Path) -> None:
    from configs.io import file_sha256
    from models.artifacts import load_latent_data, save_latent_stats, save_latents

    save_weights(build_autoencoder("vae16", 1.0), tmp_path / "ae.safetensors")
    (tmp_path / "ae.json").write_text(json.dumps({"kind": "vae16", "latent_shape": [16, 1]}))
    sha = file_sha256(tmp_path / "ae.safetensors")
    z = torch.randn(50, 16, 1)
    z[7, 3, 0] = float("inf")
    (tmp_path / "latents").mkdir()
    with pytest.raises(UserError, match=r"holds 1 NaN or Inf values \(first: sample 7, token 3, channel 0\)"):
        save_latents(tmp_path / "latents" / "train.safetensors", z, torch.zeros(50), sha, "vae16")
    assert not any((tmp_path / "latents").iterdir())
    # Written by something else (or damaged later): refused when read.
    from safetensors.torch import save_file

    save_file(
        {"latents": z, "labels": torch.zeros(50)}, str(tmp_path / "latents" / "train.safetensors"), {"ae_sha256": sha}
    )
    save_latent_stats(tmp_path, torch.zeros(1, 1), torch.ones(1, 1), sha, "vae16")
    with pytest.raises(UserError, match=r"train\.safetensors holds 1 NaN or Inf values"):
        load_latent_data(tmp_path, "vae16")
    z[7, 3, 0] = 0.0
    save_file(
        {"latents": z, "labels": torch.zeros(50)}, str(tmp_path / "latents" / "train.safetensors"), {"ae_sha256": sha}
    )
    assert load_latent_data(tmp_path, "vae16").train.shape == (50, 16, 1)
    save_latent_stats(tmp_path, torch.zeros(1, 1), torch.full((1, 1), float("nan")), sha, "vae16")
    with pytest.raises(UserError, match=r"latent_stats\.safetensors holds NaN, Inf or a std <= 0"):
        load_latent_data(tmp_path, "vae16")


def test_nan_autoencoder_weights_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_weights(build_autoencoder("vae16", 1.0), tmp_path / "ae.safetensors")
    (tmp_path / "ae.json").write_text(json.dumps({"kind": "vae16", "latent_shape": [16, 1]}))
    state = load_file(str(tmp_path / "ae.safetensors"))
    key = sorted(state)[0]
    state[key].view(-1)[-1] = float("-inf")
    save_file(state, str(tmp_path / "ae.safetensors"))
    with pytest.raises(UserError, match=rf"ae\.safetensors holds NaN or Inf values \(tensor '{key}'\)"):
        load_autoencoder(tmp_path)


def test_describe_nonfinite_names_array_and_position() -> None:
    import numpy as np

    from models.artifacts import describe_nonfinite

    z = np.zeros((5, 3, 4))
    drift = torch.zeros(4, 3, 4)
    assert describe_nonfinite({"z": z, "drift": drift, "eps": None}) is None
    drift[2, 1, 3] = float("nan")
    drift[3, 0, 0] = float("inf")
    assert describe_nonfinite({"z": z, "drift": drift}) == (
        "holds 2 NaN or Inf values in 'drift' (first at step 2, trajectory 1, dimension 3)"
    )
