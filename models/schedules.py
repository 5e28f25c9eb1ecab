"""Noise schedules of the discrete variance-preserving diffusion and the default schedule of each latent kind.

- Cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17) and the linear schedule of
  Ho et al. 2020 (beta from 1e-4 to 0.02).
- :class:`Schedule` derives every per-step coefficient the loss and the samplers use from the betas.

The step-index and time conventions are those of models/diffusion.py (its docstring), which trains with and
samples from these schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class Schedule:
    """Per-step coefficients of a discrete variance-preserving diffusion, all (T,) float64.

    Index t in 0..T-1 is the step the network sees. Everything is derived from ``betas``:
    ``alphas = 1 - betas``, ``alpha_bars = cumprod(alphas)``, ``alpha_bars_prev[t] = alpha_bars[t-1]``
    (1 at t = 0), ``posterior_variance = betas * (1 - alpha_bars_prev) / (1 - alpha_bars)``
    (DDPM eq. 7), and ``rates = -T log(1 - betas)``, the continuous VP rate beta(tau) on
    (t/T, (t+1)/T]. Kept in float64 and cast to the data's dtype on use.
    """

    name: str
    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bars: torch.Tensor
    alpha_bars_prev: torch.Tensor
    sqrt_alpha_bars: torch.Tensor
    sqrt_one_minus_alpha_bars: torch.Tensor
    posterior_variance: torch.Tensor
    rates: torch.Tensor

    @classmethod
    def from_betas(cls, name: str, betas: torch.Tensor) -> Schedule:
        """Build every derived coefficient from betas (T,), each in (0, 1)."""
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.dim() != 1 or betas.numel() < 2:
            raise ValueError(f"Schedule needs a 1-D betas tensor with T >= 2 entries, got shape {tuple(betas.shape)}.")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"Schedule {name!r}: every beta must lie in (0, 1); got min {betas.min().item():.3g}, "
                f"max {betas.max().item():.3g}. Check the schedule parameters."
            )
        alphas = 1.0 - betas
        alpha_bars = torch.cumprod(alphas, dim=0)
        alpha_bars_prev = torch.cat((torch.ones(1, dtype=torch.float64), alpha_bars[:-1]))
        return cls(
            name=name,
            betas=betas,
            alphas=alphas,
            alpha_bars=alpha_bars,
            alpha_bars_prev=alpha_bars_prev,
            sqrt_alpha_bars=alpha_bars.sqrt(),
            sqrt_one_minus_alpha_bars=(1.0 - alpha_bars).sqrt(),
            posterior_variance=betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars),
            rates=-betas.numel() * torch.log1p(-betas),
        )

    @property
    def T(self) -> int:
        """Number of diffusion steps."""
        return self.betas.numel()

    def to(self, device: torch.device | str) -> Schedule:
        """A copy with every tensor on ``device`` (saves a host-to-device copy per training step)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved.update({k: v.to(device) for k, v in moved.items() if isinstance(v, torch.Tensor)})
        return Schedule(**moved)


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"Number of diffusion steps T={T!r}: must be an int >= 2.")


def cosine_schedule(T: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17) without its singular terminal step.

    With f(u) = cos((u/N + s) / (1 + s) * pi/2)^2, Nichol's grid (N = T) ends at f(T) = 0, so
    the last beta is 1 and must be clamped (to 0.999): alpha_bar then drops 1000-fold in one
    step and the first reverse step multiplies any error of the noise prediction by
    sqrt(1000) ~ 32 (they clip x0 in pixel space; latents have no such range). We lay the T
    steps on a grid of N = T + 1 intervals and drop the last one, so step index t (0..T-1) ends
    at u = t + 1 and ``alpha_bar_t = f(t+1)/f(0)`` stays positive. This keeps the reference's
    behaviour (latent-diffusion-mnist.md: alpha_bar first near 1, last near 0) with betas
    ``1 - alpha_bar_t / alpha_bar_{t-1}`` (alpha_bar_{-1} = 1) clamped to [0, max_beta]; the
    clamp no longer bites for T >= 2.

    Values: T=100 -> alpha_bars[0] = 0.99938, alpha_bars[-1] = 2.4e-4, max beta 0.75;
    T=50 -> alpha_bars[0] = 0.99782, alpha_bars[-1] = 9.3e-4, max beta 0.76.

    Args:
        T: number of steps.
        s: small offset that keeps beta_0 away from 0.
        max_beta: upper clamp of the betas.

    Returns:
        The :class:`Schedule`.
    """
    _check_T(T)
    if not 0.0 < s < 1.0 or not 0.0 < max_beta < 1.0:
        raise ValueError(f"cosine_schedule: s={s} and max_beta={max_beta} must both lie in (0, 1).")
    u = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((u / (T + 1) + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,), f[T] > 0
    betas = (1.0 - f[1:] / f[:-1]).clamp(0.0, max_beta)  # (T,)
    return Schedule.from_betas(f"cosine(T={T}, s={s})", betas)


def linear_schedule(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Linear betas (Ho et al. 2020): ``betas = linspace(beta_start, beta_end, T)``.

    The defaults were tuned for T = 1000. With T = 50 (the SINDy study) they only reach
    alpha_bars[-1] = 0.603, so z_T ~ N(0, I) is NOT the forward marginal at the last step; samples
    from such a model are biased however well it is trained. Prefer :func:`cosine_schedule` there.
    """
    _check_T(T)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"linear_schedule: need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}.")
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return Schedule.from_betas(f"linear(T={T}, {beta_start}..{beta_end})", betas)


# kind -> (default schedule name, default T). See schedule_for.
LATENT_SCHEDULES = {"conv": ("cosine", 100), "vae16": ("cosine", 50)}


def schedule_for(kind: str, schedule: str | None = None, T: int | None = None) -> Schedule:
    """Default schedule for a latent kind.

    - ``conv`` (ConvAE, 49x6): cosine, T = 100, as in the reference recipe.
    - ``vae16`` (16-D VAE): T = 50 steps as in the SINDy study. That study used a linear schedule
      (beta 1e-4..0.02), which at T = 50 stops at alpha_bar = 0.60, far from noise (see
      :func:`linear_schedule`); we default to cosine and keep ``schedule="linear"`` to reproduce it.

    Args:
        kind: "conv" or "vae16".
        schedule: "cosine" or "linear"; ``None`` takes the kind's default.
        T: number of steps; ``None`` takes the kind's default.
    """
    if kind not in LATENT_SCHEDULES:
        raise ValueError(f"Unknown latent kind {kind!r}; known kinds: {sorted(LATENT_SCHEDULES)}.")
    default_name, default_T = LATENT_SCHEDULES[kind]
    name, T = schedule or default_name, T or default_T
    if name == "cosine":
        return cosine_schedule(T)
    if name == "linear":
        return linear_schedule(T)
    raise ValueError(f"Unknown schedule {name!r}; choose 'cosine' or 'linear'.")
