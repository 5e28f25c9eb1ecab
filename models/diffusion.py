"""Gaussian diffusion: the forward marginal, the epsilon loss, and DDPM / DDIM / probability-flow samplers.

Papers and equations implemented here:
- DDPM (Ho et al. 2020): forward marginal q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I) (eq. 4),
  the simple epsilon loss (eq. 14), and ancestral sampling (Algorithm 2) with sigma_t^2 = beta_t
  (the reference choice) or the posterior variance beta~_t (eq. 7).
- DDIM (Song, Meng & Ermon 2021, eq. 12 with sigma_t(eta) of eq. 16).
- Probability-flow ODE of the variance-preserving SDE (Song et al. 2021, "Score-Based Generative
  Modeling through SDEs", eqs. 11 and 13): dx/dtau = -1/2 beta(tau) [x + grad log p_tau(x)], with the
  score written through epsilon as grad log p = -eps / sqrt(1 - ab(tau)); integrated by explicit
  Euler ("ode", one call per step) or Heun's trapezoid ("heun", second order, as in Karras et al.
  2022, Algorithm 1) on the same T-step grid.

Conventions (one source of truth for the whole project):
- Step index t in 0..T-1 is what the network sees. ``alpha_bars[t]`` is the noise level of the
  state fed to the network at step t; index 0 is nearly clean, index T-1 nearly pure noise.
- Sampling writes the loop out plainly: for t = T-1 down to 0, eps = eps_model(z, t), then one
  update gives the next state. The recorded trajectory has T+1 states z_T (first, the initial
  noise) ... z_0 (last, the sample); state k sits at normalised time ``t_norm = k / T``, so state
  k = t + 1 is the input of step t and ``ab(t_norm = (t+1)/T) = alpha_bars[t]``, ``ab(0) = 1``.
- Continuous time for the ODE: tau = t_norm in [0, 1], dt = 1/T. Between grid points the VP rate
  beta(tau) is piecewise constant, ``beta(tau) = -T log(1 - betas[t])`` on (t/T, (t+1)/T], which
  makes ab(tau) = exp(-int_0^tau beta) hit every ``alpha_bars[t]`` exactly on the grid.
- drift = dz/d(t_norm), the velocity in *increasing* normalised time (the forward-SDE direction):
  a sampler step is z_{t-1} = z_t - dt * drift (+ injected noise for stochastic samplers). With this
  sign, finite differences of the recorded (z, t_norm) pairs estimate ``drift`` directly.

This module knows nothing of the network except ``eps_model(x, t) -> eps`` with x (B, ...) and
t (B,) long step indices; it knows nothing of latents except their shape. The schedules (cosine, linear,
the default of each latent kind) live in models/schedules.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.schedules import Schedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddpm", "ddim", "ode", "heun")
DDPM_VARIANCES = ("beta", "posterior")


# ----------------------------------------------------------------------------- training


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] as (B, 1, ..., 1) in like's device and dtype, ready to broadcast against like."""
    out = values.to(t.device)[t].to(device=like.device, dtype=like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) (DDPM eq. 4): ``sqrt(ab_t) x0 + sqrt(1 - ab_t) noise``.

    Args:
        schedule: the schedule.
        x0: (B, ...) clean data.
        t: (B,) long step indices in 0..T-1.
        noise: (B, ...) standard normal, same shape as x0.

    Returns:
        (B, ...) noisy data.
    """
    if noise.shape != x0.shape or t.shape != x0.shape[:1]:
        raise ValueError(
            f"q_sample: x0 {tuple(x0.shape)}, noise {tuple(noise.shape)} and t {tuple(t.shape)} "
            f"must be (B, ...), (B, ...) and (B,)."
        )
    return _gather(schedule.sqrt_alpha_bars, t, x0) * x0 + _gather(schedule.sqrt_one_minus_alpha_bars, t, x0) * noise


def eps_loss(
    eps_model: EpsModel,
    schedule: Schedule,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The simple DDPM loss (eq. 14): MSE between eps_model(x_t, t) and the noise that made x_t.

    Args:
        eps_model: callable (x (B, ...), t (B,) long) -> (B, ...).
        schedule: the schedule.
        x0: (B, ...) clean (normalised) data.
        generator: drives t ~ Uniform{0..T-1} and noise ~ N(0, I); must live on x0's device.
        t: optional (B,) step indices instead of drawing them.
        noise: optional (B, ...) noise instead of drawing it.

    Returns:
        Scalar float32 loss (mean over batch and elements).
    """
    if t is None:
        t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator, device=x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    eps = eps_model(q_sample(schedule, x0, t, noise), t)
    if eps.shape != x0.shape:
        raise ValueError(f"eps_model returned shape {tuple(eps.shape)} for input {tuple(x0.shape)}; they must match.")
    # float32 reduction so a bf16 autocast forward does not lose the loss's low bits.
    return F.mse_loss(eps.float(), noise.float())


# ----------------------------------------------------------------------------- sampler steps
# Each step maps (x_t, eps) at step index t to the (mean, std) of the next state x_{t-1}; the
# sampler adds std * N(0, I). t is a Python int (one step for the whole batch), so the
# coefficients are Python floats and the steps are device- and dtype-agnostic.


def _coef(values: torch.Tensor, t: int) -> float:
    return float(values[t])


def _check_step(schedule: Schedule, t: int) -> None:
    if not 0 <= t < schedule.T:
        raise ValueError(f"Step index t={t} outside 0..{schedule.T - 1} for schedule {schedule.name}.")


def ddpm_step(
    schedule: Schedule, x_t: torch.Tensor, t: int, eps: torch.Tensor, variance: str = "beta"
) -> tuple[torch.Tensor, float]:
    """Ancestral DDPM step (Ho et al. 2020, Algorithm 2).

    mean = (x_t - beta_t / sqrt(1 - ab_t) * eps) / sqrt(alpha_t); std = sqrt(beta_t) ("beta",
    the reference) or sqrt(posterior_variance_t) ("posterior"); std = 0 at t = 0.

    Returns:
        (mean (B, ...), std).
    """
    _check_step(schedule, t)
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"DDPM variance {variance!r}: choose one of {DDPM_VARIANCES}.")
    beta, ab = _coef(schedule.betas, t), _coef(schedule.alpha_bars, t)
    mean = (x_t - (beta / math.sqrt(1.0 - ab)) * eps) / math.sqrt(1.0 - beta)
    if t == 0:
        return mean, 0.0
    var = beta if variance == "beta" else _coef(schedule.posterior_variance, t)
    return mean, math.sqrt(var)


def ddim_step(
    schedule: Schedule, x_t: torch.Tensor, t: int, eps: torch.Tensor, eta: float = 0.0
) -> tuple[torch.Tensor, float]:
    """DDIM step (Song et al. 2021, eq. 12) with sigma_t = eta * sqrt(posterior variance) (eq. 16).

    x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t);
    mean = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps. eta = 0 is deterministic;
    eta = 1 reproduces DDPM with the posterior variance.

    Returns:
        (mean (B, ...), std = sigma_t).
    """
    _check_step(schedule, t)
    ab, ab_prev = _coef(schedule.alpha_bars, t), _coef(schedule.alpha_bars_prev, t)
    sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
    x0_hat = (x_t - math.sqrt(1.0 - ab) * eps) / math.sqrt(ab)
    # max(., 0): at eta = 1 the radicand is 0 up to rounding and must not go negative.
    mean = math.sqrt(ab_prev) * x0_hat + math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)) * eps
    return mean, sigma


def ode_drift(schedule: Schedule, x: torch.Tensor, t: int, eps: torch.Tensor, *, lower: bool = False) -> torch.Tensor:
    """Probability-flow ODE velocity dx/dtau on the interval of step t, (t/T, (t+1)/T].

    VP SDE dx = -1/2 beta(tau) x dtau + sqrt(beta(tau)) dw (Song et al. 2021, eq. 11) has the
    probability-flow ODE dx/dtau = -1/2 beta(tau) (x + grad log p_tau(x)) (eq. 13 with
    g^2 = beta); with grad log p = -eps / sqrt(1 - ab(tau)):
    ``dx/dtau = -1/2 beta(tau) (x - eps / sqrt(1 - ab(tau)))``, where beta(tau) is the rate of the
    interval, ``rates[t] = -T log(1 - betas[t])``.

    Args:
        schedule: the schedule.
        x: (B, ...) state at the interval's upper end tau = (t+1)/T (ab = alpha_bars[t], eps from
            the network at step t), or with ``lower=True`` at its lower end tau = t/T
            (ab = alpha_bars[t-1], eps from the network at step t-1; needs t >= 1).
        t: step index of the interval.
        eps: (B, ...) the network's prediction for x.
        lower: evaluate at the lower end (Heun's corrector).

    Returns:
        (B, ...) velocity in increasing tau (the sampler moves x by -dt times this).
    """
    _check_step(schedule, t)
    if lower and t == 0:
        raise ValueError("ode_drift(lower=True) at t=0 would need ab(0) = 1, where the score is singular.")
    rate = _coef(schedule.rates, t)
    ab = _coef(schedule.alpha_bars_prev if lower else schedule.alpha_bars, t)
    return -0.5 * rate * (x - eps / math.sqrt(1.0 - ab))


def ode_step(schedule: Schedule, x_t: torch.Tensor, t: int, eps: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One explicit Euler step of the probability-flow ODE from tau = (t+1)/T to t/T.

    Returns:
        (x_t - dt * ode_drift (B, ...), std = 0.0).
    """
    return x_t - ode_drift(schedule, x_t, t, eps) / schedule.T, 0.0


# ----------------------------------------------------------------------------- sampling loop


@dataclass
class SampleResult:
    """Output of :func:`sample`. Trajectory fields are ``None`` unless ``record=True``.

    Attributes:
        x0: (B, ...) the final sample z_0.
        z: (T+1, B, ...) states z_T (index 0, the initial noise) ... z_0 (index T).
        t_norm: (T+1,) float64 normalised time of each state, k/T: 1.0 first, 0.0 last.
        timesteps: (T,) long step index given to the network at each step: T-1 ... 0.
        eps: (T, B, ...) network output at each step (eps[i] was computed from z[i]; for "heun"
            the predictor's call, the corrector's is not kept).
        drift: (T, B, ...) dz/d(t_norm) of the sampler's deterministic update:
            ``drift[i] = (z[i] - mean_i) * T`` so ``z[i+1] = z[i] - drift[i] / T + noise[i]``.
        noise: (T, B, ...) injected noise std_i * n_i, or ``None`` for deterministic samplers
            (DDIM with eta = 0, "ode", "heun").
    """

    x0: torch.Tensor
    z: torch.Tensor | None = None
    t_norm: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None
    eps: torch.Tensor | None = None
    drift: torch.Tensor | None = None
    noise: torch.Tensor | None = None


@torch.no_grad()
def sample(
    eps_model: EpsModel,
    schedule: Schedule,
    shape: tuple[int, ...],
    *,
    sampler: str = "ddpm",
    eta: float = 0.0,
    variance: str = "beta",
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    record: bool = False,
    record_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SampleResult:
    """Generate samples by running the reverse process for t = T-1 down to 0.

    One network call per step (two for "heun"); recording adds no calls. Put a ``nn.Module``
    in eval mode first (dropout would make the sampler non-deterministic).

    Args:
        eps_model: callable (x (B, ...), t (B,) long) -> eps (B, ...).
        schedule: the schedule the model was trained with.
        shape: (B, ...) shape of the samples, e.g. (B, 49, 6) or (B, 16, 1).
        sampler: "ddpm" (ancestral), "ddim" (eq. 12, eta), "ode" (Euler on the probability-flow
            ODE) or "heun" (Heun on the same ODE and grid: 2T-1 network calls, second-order;
            Euler on the last step, whose lower end ab = 1 makes the score singular).
        eta: DDIM stochasticity; only valid with sampler="ddim".
        variance: DDPM std choice, "beta" (reference) or "posterior"; only for sampler="ddpm".
        generator: drives every random draw (z_T when ``noise`` is None, and injected noise); on ``device``.
        noise: optional (B, ...) initial state z_T; default N(0, I) from ``generator``.
        record: keep the trajectory (see :class:`SampleResult`).
        record_device: where recorded tensors live (e.g. "cpu" to spare accelerator memory);
            default: the sampling device.
        device: sampling device; default ``noise.device``, else the generator's device, else CPU.
        dtype: state dtype; default ``noise.dtype``, else float32. eps outputs are cast to it.

    Returns:
        :class:`SampleResult`.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS}.")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta={eta} only applies to sampler='ddim' (got sampler={sampler!r}); drop eta.")
    if eta < 0.0:
        raise ValueError(f"eta={eta}: must be >= 0 (0 deterministic DDIM, 1 DDPM-like).")
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"DDPM variance {variance!r}: choose one of {DDPM_VARIANCES}.")
    if variance != "beta" and sampler != "ddpm":
        raise ValueError(f"variance={variance!r} only applies to sampler='ddpm' (got {sampler!r}).")
    shape = tuple(shape)
    if noise is not None:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape={shape}; they must match.")
        device = noise.device if device is None else torch.device(device)
        dtype = noise.dtype if dtype is None else dtype
        z = noise.to(device=device, dtype=dtype)
    else:
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        dtype = torch.float32 if dtype is None else dtype
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)

    T, B = schedule.T, shape[0]
    stochastic = sampler == "ddpm" or (sampler == "ddim" and eta > 0.0)
    result = SampleResult(x0=z)
    if record:
        rdev = device if record_device is None else torch.device(record_device)
        result.z = torch.empty((T + 1, *shape), dtype=dtype, device=rdev)
        result.eps = torch.empty((T, *shape), dtype=dtype, device=rdev)
        result.drift = torch.empty((T, *shape), dtype=dtype, device=rdev)
        result.noise = torch.empty((T, *shape), dtype=dtype, device=rdev) if stochastic else None
        result.t_norm = torch.arange(T, -1, -1, dtype=torch.float64) / T  # (T+1,) 1.0 ... 0.0
        result.timesteps = torch.arange(T - 1, -1, -1)  # (T,) T-1 ... 0
        result.z[0] = z

    for i, t in enumerate(range(T - 1, -1, -1)):
        t_batch = torch.full((B,), t, dtype=torch.long, device=device)
        eps = eps_model(z, t_batch)
        if eps.shape != z.shape:
            raise ValueError(
                f"eps_model returned shape {tuple(eps.shape)} for input {tuple(z.shape)}; they must match."
            )
        eps = eps.to(dtype)  # a bf16 autocast output must not demote the state
        if sampler == "ddpm":
            mean, std = ddpm_step(schedule, z, t, eps, variance)
        elif sampler == "ddim":
            mean, std = ddim_step(schedule, z, t, eps, eta)
        else:
            mean, std = ode_step(schedule, z, t, eps)
            if sampler == "heun" and t > 0:
                # Trapezoid over the interval: average the slope here and at the Euler prediction.
                eps_lower = eps_model(mean, t_batch - 1).to(dtype)
                slope = ode_drift(schedule, z, t, eps) + ode_drift(schedule, mean, t, eps_lower, lower=True)
                mean = z - slope / (2 * T)
        injected = None
        if std > 0.0:
            injected = std * torch.randn(shape, generator=generator, device=device, dtype=dtype)
        z_next = mean if injected is None else mean + injected

        if record:
            result.eps[i] = eps
            result.drift[i] = (z - mean) * T  # dz/d(t_norm): t_norm falls by 1/T per step
            if result.noise is not None:
                result.noise[i] = 0.0 if injected is None else injected  # none at t = 0
            result.z[i + 1] = z_next
        z = z_next

    result.x0 = z
    return result
