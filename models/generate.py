"""Images from a trained latent DiT: DDPM samples in the normalised latent space, decoded.

One function shared by the DiT's training (sample grids in TensorBoard) and the scoring stage
(analysis/score_samples.py), so that the scored samples are the ones training would draw.
"""

from __future__ import annotations

import torch

from models.diffusion import sample
from models.schedules import Schedule


@torch.no_grad()
def decode_samples(
    ema_model: torch.nn.Module,
    schedule: Schedule,
    ae,
    mean: torch.Tensor,
    std: torch.Tensor,
    n: int,
    seed: int,
    device,
    batch: int = 2048,
) -> torch.Tensor:
    """DDPM samples of the (EMA) denoiser decoded to images.

    Args:
        ema_model: eps model on ``device``, in eval mode.
        schedule: the schedule it was trained with, on ``device``.
        ae: the run's autoencoder (``latent_shape`` (T, C) and ``decode`` to logits).
        mean, std: latent statistics, broadcastable to (T, C); samples are un-normalised with them.
        n: number of images; drawn ``batch`` at a time from one generator seeded with ``seed``.

    Returns:
        (n, 1, 28, 28) float in [0, 1].
    """
    g = torch.Generator(device=device).manual_seed(seed)
    shape = tuple(ae.latent_shape)
    out = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        z = sample(ema_model, schedule, (b, *shape), sampler="ddpm", generator=g, device=device).x0
        out.append(torch.sigmoid(ae.decode(z * std + mean).float()))
    return torch.cat(out)
