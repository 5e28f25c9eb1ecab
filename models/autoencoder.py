"""Autoencoders that give the diffusion model its latent space.

- ``ConvAE``: the reference plain autoencoder (docs/REFERENCES.md, "Latent diffusion for MNIST",
  section 1): Conv(1->32, stride 2) -> ReLU -> Conv(32->6, stride 2) gives (B, 6, 7, 7), read as
  49 tokens of 6; a mirrored transposed-conv decoder produces logits; BCE-with-logits.
- ``VAE16``: a 16-D variational autoencoder (Kingma & Welling 2014) as in the SINDy study
  (docs/REFERENCES.md); its latent is 16 tokens of 1.

Both share one interface: ``encode(x) -> (B, N, C)`` latent tokens, ``decode(z) -> (B, 1, 28, 28)``
logits, ``forward(x, generator) -> (loss, metrics)``, and ``latent_shape == (N, C)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvAE(nn.Module):
    """Plain convolutional autoencoder, 28x28 -> 7x7x6 (no KL: the latent is unconstrained)."""

    kind = "conv"
    latent_shape = (49, 6)

    def __init__(self, hidden: int = 32, latent_channels: int = 6) -> None:
        super().__init__()
        self.latent_channels = latent_channels
        self.latent_shape = (49, latent_channels)
        # kernel 4 / stride 2 / padding 1 halves the side exactly: 28 -> 14 -> 7.
        self.encoder = nn.Sequential(
            nn.Conv2d(1, hidden, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, latent_channels, 4, stride=2, padding=1),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(latent_channels, hidden, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, 1, 4, stride=2, padding=1),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) in [0, 1] -> latent tokens (B, 49, C), token index = row * 7 + col."""
        h = self.encoder(x)  # (B, C, 7, 7)
        return h.flatten(2).transpose(1, 2)  # (B, 49, C)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 49, C) -> logits (B, 1, 28, 28)."""
        h = z.transpose(1, 2).reshape(z.shape[0], self.latent_channels, 7, 7)
        return self.decoder(h)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Training loss (through ``forward`` so that DDP and autocast wrappers see it).

        Returns the mean per-pixel BCE-with-logits of the reconstruction and its metrics.
        """
        logits = self.decode(self.encode(x))
        bce = F.binary_cross_entropy_with_logits(logits.float(), x.float())
        return bce, {"bce": bce.detach()}


class VAE16(nn.Module):
    """Convolutional VAE with a 16-D Gaussian latent; ``encode`` returns the posterior mean."""

    kind = "vae16"

    def __init__(self, latent_dim: int = 16, hidden: int = 32, kl_weight: float = 1.0) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.latent_shape = (latent_dim, 1)
        self.kl_weight = kl_weight
        self.encoder = nn.Sequential(
            nn.Conv2d(1, hidden, 4, stride=2, padding=1),
            nn.ReLU(),  # (B, h, 14, 14)
            nn.Conv2d(hidden, 2 * hidden, 4, stride=2, padding=1),
            nn.ReLU(),  # (B, 2h, 7, 7)
            nn.Flatten(),
            nn.Linear(2 * hidden * 49, 256),
            nn.ReLU(),
            nn.Linear(256, 2 * latent_dim),  # mean, log-variance
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 256),
            nn.ReLU(),
            nn.Linear(256, 2 * hidden * 49),
            nn.ReLU(),
            nn.Unflatten(1, (2 * hidden, 7, 7)),
            nn.ConvTranspose2d(2 * hidden, hidden, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(hidden, 1, 4, stride=2, padding=1),
        )

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, 28, 28) -> mean, log-variance, each (B, latent_dim)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) -> posterior mean as tokens (B, latent_dim, 1)."""
        return self.posterior(x)[0].unsqueeze(-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim, 1) or (B, latent_dim) -> logits (B, 1, 28, 28)."""
        return self.decoder(z.reshape(z.shape[0], self.latent_dim))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """Training loss, the negative ELBO per pixel: mean BCE + kl_weight * KL / 784.

        The reparameterisation noise is drawn from ``generator`` so that a run (and its resume)
        is reproducible.
        """
        mu, logvar = self.posterior(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        logits = self.decode(z)
        bce = F.binary_cross_entropy_with_logits(logits.float(), x.float())
        # KL(q(z|x) || N(0, I)) per image, summed over latent dims (Kingma & Welling 2014, App. B).
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)).mean().float()
        loss = bce + self.kl_weight * kl / x[0].numel()
        return loss, {"bce": bce.detach(), "kl": kl.detach()}


def build_autoencoder(kind: str, kl_weight: float = 1.0) -> nn.Module:
    """Build an autoencoder by kind ('conv' or 'vae16')."""
    if kind == "conv":
        return ConvAE()
    if kind == "vae16":
        return VAE16(kl_weight=kl_weight)
    raise ValueError(f"unknown autoencoder kind {kind!r}: use 'conv' or 'vae16'")
