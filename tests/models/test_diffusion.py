"""Schedules, loss and samplers, checked against a Gaussian whose exact epsilon predictor is known."""

from __future__ import annotations

import math

import pytest
import torch

from models.diffusion import SAMPLERS, ddim_step, ddpm_step, eps_loss, ode_drift, ode_step, q_sample, sample
from models.dit import build_dit
from models.schedules import cosine_schedule, linear_schedule, schedule_for

# ----------------------------------------------------------------------------- schedules


def test_cosine_schedule_values():
    s = cosine_schedule(100)
    ab = s.alpha_bars
    assert s.T == 100 and ab.dtype == torch.float64
    assert bool((ab[1:] < ab[:-1]).all())
    assert ab[0].item() == pytest.approx(0.9993773, abs=1e-6)  # f(1)/f(0) on the T+1 grid: nearly clean
    assert ab[-1].item() == pytest.approx(2.3807e-4, rel=1e-3)  # f(100)/f(0) > 0: no singular last step
    # No clamp bites: the largest step keeps 1/4 of the signal power, so the first reverse step
    # amplifies errors ~2x instead of sqrt(1000)x.
    assert bool(((s.betas >= 0) & (s.betas < 0.76)).all())
    torch.testing.assert_close(ab, torch.cumprod(1 - s.betas, 0))
    f = torch.cos((torch.arange(101, dtype=torch.float64) / 101 + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(ab, f[1:] / f[0])
    torch.testing.assert_close(s.alpha_bars_prev, torch.cat((torch.ones(1, dtype=torch.float64), ab[:-1])))
    assert s.posterior_variance[0].item() == 0.0
    # The ODE's piecewise-constant rate reproduces ab on the grid: exp(-int_0^{(t+1)/T} beta) = ab[t].
    torch.testing.assert_close(torch.exp(-torch.cumsum(s.rates, 0) / s.T), ab)


def test_linear_schedule_values():
    s = linear_schedule(50)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert bool((s.alpha_bars[1:] < s.alpha_bars[:-1]).all())
    assert s.alpha_bars[0].item() == pytest.approx(0.9999)
    # The SINDy study's schedule never gets near noise at T = 50 (why vae16 defaults to cosine).
    assert s.alpha_bars[-1].item() == pytest.approx(0.60295, abs=1e-4)
    assert linear_schedule(1000).alpha_bars[-1].item() < 1e-4


def test_schedule_for_and_errors():
    assert schedule_for("conv").T == 100 and schedule_for("conv").name.startswith("cosine")
    assert schedule_for("vae16").T == 50 and schedule_for("vae16").name.startswith("cosine")
    torch.testing.assert_close(schedule_for("vae16", "linear").betas, linear_schedule(50).betas)
    with pytest.raises(ValueError, match="known kinds"):
        schedule_for("pixels")
    with pytest.raises(ValueError, match="T=1"):
        cosine_schedule(1)
    s = cosine_schedule(10).to("cpu")
    assert s.alpha_bars.device.type == "cpu" and s.T == 10


def test_q_sample_and_eps_loss_reproducible():
    s = cosine_schedule(100)
    x0, noise = torch.randn(5, 16, 1), torch.randn(5, 16, 1)
    t = torch.tensor([0, 1, 50, 98, 99])
    xt = q_sample(s, x0, t, noise)
    a, b = s.sqrt_alpha_bars[t].float()[:, None, None], s.sqrt_one_minus_alpha_bars[t].float()[:, None, None]
    expected = a * x0 + b * noise
    torch.testing.assert_close(xt, expected)

    model = build_dit("tiny", 1, 16)
    with torch.no_grad():
        model.final.out_proj.bias.fill_(0.3)  # any non-trivial deterministic model
    losses = [eps_loss(model, s, x0, torch.Generator().manual_seed(7)).item() for _ in range(2)]
    assert losses[0] == losses[1]
    assert eps_loss(model, s, x0, torch.Generator().manual_seed(8)).item() != losses[0]


# ----------------------------------------------------------------------------- Gaussian data

MU = torch.tensor([0.5, -1.0, 0.3], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.6, -0.4], [0.6, 1.0, 0.0], [-0.4, 0.0, 0.5]], dtype=torch.float64)  # SPD
SCHEDULES = {"cosine100": lambda: cosine_schedule(100), "linear50": lambda: linear_schedule(50)}


def gaussian_eps_model(schedule, dtype=torch.float64):
    """Exact eps predictor for x0 ~ N(MU, SIGMA).

    E[eps | x_t] = sqrt(1-ab) (ab S + (1-ab) I)^-1 (x_t - sqrt(ab) mu), the Gaussian conditional mean.
    """
    ab = schedule.alpha_bars
    inv = torch.linalg.inv(ab[:, None, None] * SIGMA + (1 - ab)[:, None, None] * torch.eye(3, dtype=torch.float64))
    inv, ab = inv.to(dtype), ab.to(dtype)  # (T, 3, 3), (T,)
    mu = MU.to(dtype)

    def eps_model(x, t):
        r = x - ab[t, None].sqrt() * mu  # (B, 3)
        return (1 - ab[t, None]).sqrt() * torch.einsum("bij,bj->bi", inv[t], r)

    return eps_model


def start_moments(schedule):
    """Exact forward marginal of the state fed to step T-1: N(sqrt(ab) mu, ab S + (1-ab) I)."""
    ab = schedule.alpha_bars[-1]
    return ab.sqrt() * MU, ab * SIGMA + (1 - ab) * torch.eye(3, dtype=torch.float64)


def start_noise(schedule, n, generator):
    # Start from the exact marginal rather than N(0, I): linear T=50 ends at ab = 0.60, where
    # N(0, I) is simply the wrong distribution and no sampler could recover (MU, SIGMA).
    m, c = start_moments(schedule)
    return m + torch.randn(n, 3, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(c).T


def propagate_moments(schedule, sampler):
    """Exact mean and covariance of the sampler's output, without Monte-Carlo error.

    With the exact (affine) eps predictor a deterministic sampler is an affine map, so pushing the
    mean and mean + each Cholesky column of the covariance through ``sample`` gives the output
    moments. DDPM adds independent N(0, std^2 I) per step, so it is propagated step by step.
    """
    eps_model = gaussian_eps_model(schedule)
    m, c = start_moments(schedule)
    eye = torch.eye(3, dtype=torch.float64)
    if sampler != "ddpm":
        x = torch.cat((m[None], m + torch.linalg.cholesky(c).T))  # (4, 3): mean, mean + columns
        y = sample(eps_model, schedule, (4, 3), sampler=sampler, noise=x).x0
        return y[0], (y[1:] - y[0]).T @ (y[1:] - y[0])
    for t in range(schedule.T - 1, -1, -1):
        x = torch.cat((m[None], m + torch.linalg.cholesky(c).T))  # (4, 3): mean, mean + columns
        y, std = ddpm_step(schedule, x, t, eps_model(x, torch.full((4,), t)))
        m, d = y[0], y[1:] - y[0]
        c = d.T @ d + std**2 * eye
    return m, c


# Exact discretisation error (max abs entry) of each sampler with the exact predictor, from
# propagate_moments; the bounds below leave ~20% headroom over the measured values.
DISCRETISATION = {
    # (schedule, sampler): (mean error bound, covariance error bound)
    ("cosine100", "ddpm"): (1e-9, 0.009),  # measured 0 / 0.0066 (sigma^2 = beta is a slight overshoot)
    ("cosine100", "ddim"): (1e-9, 0.031),  # measured 0 / 0.025
    ("cosine100", "ode"): (0.027, 0.016),  # measured 0.022 / 0.013: Euler through the steep last steps
    ("cosine100", "heun"): (0.0012, 0.0005),  # measured 0.0009 / 0.0003
    ("linear50", "ddpm"): (1e-9, 0.003),  # measured 0 / 0.0021
    ("linear50", "ddim"): (1e-9, 0.011),  # measured 0 / 0.0085
    ("linear50", "ode"): (0.001, 0.002),  # measured 0.0006 / 0.0015
    ("linear50", "heun"): (1e-4, 1e-4),  # measured ~1e-5
}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_exact_moments_discretisation_error(schedule_name, sampler):
    m, c = propagate_moments(SCHEDULES[schedule_name](), sampler)
    mean_bound, cov_bound = DISCRETISATION[(schedule_name, sampler)]
    assert (m - MU).abs().max() < mean_bound
    assert (c - SIGMA).abs().max() < cov_bound


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
def test_gaussian_samples_match_mu_and_sigma(schedule_name, sampler):
    """20k samples through ``sample`` (float32, the dtype of real runs) match MU and SIGMA.

    Tolerance = worst discretisation error over all cases (mean 0.022, Euler on cosine T=100;
    covariance 0.025, DDIM on cosine T=100; see DISCRETISATION) + a 4-sigma Monte-Carlo band:
    the standard error of a sample mean is sqrt(S_ii / n) <= sqrt(1 / 20000) = 0.0071 and of a
    sample covariance entry sqrt((S_ii S_jj + S_ij^2) / n) <= sqrt(2 / 20000) = 0.010.
    So mean within 0.022 + 0.028 -> 0.06 and covariance within 0.025 + 0.040 -> 0.07.
    """
    schedule, n = SCHEDULES[schedule_name](), 20_000
    g = torch.Generator().manual_seed(0)
    if schedule_name == "cosine100":  # ab[-1] = 2.4e-4: N(0, I) is the marginal to within ~0.02 (sqrt(ab) |mu|)
        z_T = torch.randn(n, 3, generator=g)
    else:
        z_T = start_noise(schedule, n, g).float()
    eps_model = gaussian_eps_model(schedule, torch.float32)
    x0 = sample(eps_model, schedule, (n, 3), sampler=sampler, generator=g, noise=z_T).x0
    x0 = x0.double()
    assert (x0.mean(0) - MU).abs().max() < 0.06
    assert (torch.cov(x0.T) - SIGMA).abs().max() < 0.07


def test_ddim_eta_one_is_ddpm_with_posterior_variance():
    s, x, eps = cosine_schedule(100), torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    for t in (1, 37, 99):
        mean_ddim, std_ddim = ddim_step(s, x, t, eps, eta=1.0)
        mean_ddpm, std_ddpm = ddpm_step(s, x, t, eps, variance="posterior")
        torch.testing.assert_close(mean_ddim, mean_ddpm)
        assert std_ddim == pytest.approx(std_ddpm, rel=1e-12)


def test_ode_drift_vanishes_for_standard_normal_data():
    # x0 ~ N(0, I) is stationary under the VP process, so the probability-flow velocity is zero.
    s = cosine_schedule(100)
    x = torch.randn(4, 3, dtype=torch.float64)
    for t in (0, 50, 99):
        eps = math.sqrt(1 - s.alpha_bars[t].item()) * x
        torch.testing.assert_close(ode_drift(s, x, t, eps), torch.zeros_like(x), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- recording


class CountingModel:
    """A fixed nonlinear eps model that counts its calls."""

    def __init__(self, T: int):
        self.T, self.calls = T, 0

    def __call__(self, x, t):
        self.calls += 1
        tt = (t.to(x.dtype) / self.T).reshape(-1, *([1] * (x.dim() - 1)))
        return torch.tanh(x) * (0.5 + tt) + 0.1 * tt


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ode", 0.0), ("heun", 0.0)])
@pytest.mark.parametrize("shape", [(5, 16, 1), (5, 16), (3, 49, 6)])
def test_record_shapes_replay_and_drift(sampler, eta, shape):
    s = cosine_schedule(20)
    T = s.T
    model = CountingModel(T)
    res = sample(
        model,
        s,
        shape,
        sampler=sampler,
        eta=eta,
        generator=torch.Generator().manual_seed(3),
        record=True,
        record_device="cpu",
        dtype=torch.float64,
    )
    calls_per_run = 2 * T - 1 if sampler == "heun" else T
    assert model.calls == calls_per_run  # recording adds no network passes

    assert res.z.shape == (T + 1, *shape) and res.eps.shape == (T, *shape) and res.drift.shape == (T, *shape)
    assert res.t_norm.shape == (T + 1,) and res.t_norm[0] == 1.0 and res.t_norm[-1] == 0.0
    torch.testing.assert_close(res.t_norm[:-1] - res.t_norm[1:], torch.full((T,), 1 / T, dtype=torch.float64))
    assert res.timesteps.tolist() == list(range(T - 1, -1, -1))
    assert torch.equal(res.z[-1], res.x0)
    stochastic = sampler == "ddpm" or eta > 0
    assert (res.noise is not None) == stochastic

    for i, t in enumerate(res.timesteps.tolist()):
        # The recorded eps is the network's output for the recorded state (no hidden extra pass).
        torch.testing.assert_close(res.eps[i], model(res.z[i], torch.full((shape[0],), t)), rtol=0, atol=0)
        injected = res.noise[i] if stochastic else 0.0
        if sampler != "heun":  # replay the step equations from the recorded eps
            if sampler == "ddpm":
                mean, _ = ddpm_step(s, res.z[i], t, res.eps[i])
            elif sampler == "ddim":
                mean, _ = ddim_step(s, res.z[i], t, res.eps[i], eta)
            else:
                mean, _ = ode_step(s, res.z[i], t, res.eps[i])
            torch.testing.assert_close(res.z[i + 1], mean + injected, rtol=0, atol=1e-12)
        # drift = dz/d(t_norm): z_{t-1} = z_t - dt * drift (+ injected noise).
        torch.testing.assert_close(res.z[i + 1], res.z[i] - res.drift[i] / T + injected, rtol=0, atol=1e-12)
    if stochastic:
        assert torch.equal(res.noise[-1], torch.zeros(shape, dtype=torch.float64))  # none at t = 0
    if sampler == "ode":  # Euler: the recorded drift is the probability-flow velocity itself
        torch.testing.assert_close(res.drift[0], ode_drift(s, res.z[0], T - 1, res.eps[0]))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_is_deterministic_given_generator(sampler):
    s = cosine_schedule(10)
    run = lambda record: sample(
        CountingModel(10), s, (4, 16, 1), sampler=sampler, record=record, generator=torch.Generator().manual_seed(11)
    )
    a, b = run(False), run(True)
    assert torch.equal(a.x0, b.x0)  # recording does not disturb the random stream
    c = sample(CountingModel(10), s, (4, 16, 1), sampler=sampler, generator=torch.Generator().manual_seed(12))
    assert not torch.equal(a.x0, c.x0)


def test_sample_argument_errors():
    s, model = cosine_schedule(10), CountingModel(10)
    with pytest.raises(ValueError, match="Unknown sampler"):
        sample(model, s, (2, 3), sampler="euler")
    with pytest.raises(ValueError, match="eta"):
        sample(model, s, (2, 3), sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="noise has shape"):
        sample(model, s, (2, 3), noise=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="eps_model returned shape"):
        sample(lambda x, t: x[:, :1], s, (2, 3))


def test_dit_sampling_under_bf16_autocast():
    model = build_dit("tiny", 6, 49, rope="2d").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    s = schedule_for("conv", T=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = sample(model, s, (2, 49, 6), sampler="ddim", generator=torch.Generator().manual_seed(0), record=True)
    assert res.x0.dtype == torch.float32 and res.eps.dtype == torch.float32  # the state is not demoted
    assert torch.isfinite(res.z).all()
