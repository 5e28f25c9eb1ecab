"""Encode the train and test splits with the run's autoencoder, for the DiT.

    python training/encode_latents.py --config configs/local.yaml [key=value ...]

Writes ``runs/<name>/latents/{train,test}.safetensors`` (``latents`` (N, T, C) float32, raw, and
``labels`` (N,)), ``runs/<name>/latent_stats.safetensors`` (``mean``/``std`` broadcastable to
(T, C)) and ``runs/<name>/latents/meta.json``.

Normalisation (latent-diffusion-mnist.md, "Latent Normalization"): the conv latent uses one
mean/std per channel over all samples and token positions, shape (1, 6); the 16-D VAE latent
has no shared channel structure, so each coordinate gets its own, shape (16, 1).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import torch

from configs.cli import parse_cli, run_cli
from configs.io import atomic_write_text, file_sha256, resolve_device
from configs.lock import acquire_stage_lock
from configs.progress import progress
from models.artifacts import load_autoencoder, save_latent_stats, save_latents
from training.stage import load_split


@torch.no_grad()
def encode_split(model: torch.nn.Module, images: torch.Tensor, batch_size: int, label: str = "") -> torch.Tensor:
    """(N, 1, 28, 28) -> (N, T, C) float32 on the CPU, with progress (``label`` names it; '' for none)."""
    out, n = [], images.shape[0]
    with progress(n if label else 0, f"latents: {label}", unit="images") as bar:
        for i in range(0, n, batch_size):
            out.append(model.encode(images[i : i + batch_size]).float().cpu())
            bar.update(min(batch_size, n - i))
    return torch.cat(out)


def latent_stats(z: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of train latents (N, T, C), per channel (conv) or per coordinate (vae16)."""
    dims = (0, 1) if kind == "conv" else (0,)
    mean = z.double().mean(dim=dims, keepdim=True)[0]  # (1, C) or (T, C)
    std = z.double().std(dim=dims, keepdim=True)[0]
    return mean.float(), std.clamp_min(1e-6).float()


def main(argv: Sequence[str] | None = None) -> None:
    cfg = parse_cli(argv, __doc__)
    run_dir = cfg.run.dir
    device = resolve_device("auto")
    model, meta = load_autoencoder(run_dir, device)
    acquire_stage_lock(run_dir, "latents")  # one job per folder and stage, until this process ends
    ae_digest = file_sha256(run_dir / "ae.safetensors")
    out = run_dir / "latents"
    out.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for split in ("train", "test"):
        t0 = time.perf_counter()
        print(f"latents: {split}: reading {cfg.data.shards}", flush=True)
        images, labels = load_split(cfg, split, device)
        print(
            f"latents: {split}: encoding {images.shape[0]} images with the {meta['kind']} autoencoder on {device}",
            flush=True,
        )
        z = encode_split(model, images, cfg.latents.batch_size, label=split)
        shapes[split] = list(z.shape)
        print(f"latents: {split}: {list(z.shape)} in {time.perf_counter() - t0:.1f} s", flush=True)
        save_latents(out / f"{split}.safetensors", z, labels.cpu().long(), ae_digest, meta["kind"])
        if split == "train":
            mean, std = latent_stats(z, meta["kind"])
    # Stats last: their presence marks a complete encoding for the DiT stage.
    stats = save_latent_stats(run_dir, mean, std, ae_digest, meta["kind"])
    info = {
        "kind": meta["kind"],
        "latent_shape": meta["latent_shape"],
        "shapes": shapes,
        "ae_sha256": ae_digest,
        "mean": mean.squeeze().tolist(),
        "std": std.squeeze().tolist(),
    }
    atomic_write_text(out / "meta.json", json.dumps(info, indent=1))
    print(f"latents: train {shapes['train']}, test {shapes['test']} -> {out}; stats {stats}")


if __name__ == "__main__":
    run_cli(main)
