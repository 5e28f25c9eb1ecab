"""Systems whose equations are known, as the SINDy job's input (.npz arrays), for the rule benchmark
(benchmarks/bench_sindy_rule.py) and the known-system tests (tests/analysis_job/test_known_systems.py).

References:
    E. N. Lorenz, "Deterministic nonperiodic flow", J. Atmos. Sci. 20:130, 1963 (Lorenz-63).
    J. Song, C. Meng, S. Ermon, "Denoising Diffusion Implicit Models", ICLR 2021 (DDIM, eta = 0).
    For data x0 ~ N(mu, Sigma) the noised marginal is N(a mu, a^2 Sigma + s^2 I) (a = sqrt(alpha_bar),
    s = sqrt(1 - alpha_bar)), so the exact epsilon-prediction is
        eps*(z, t) = -s grad log p = s (a^2 Sigma + s^2 I)^-1 (z - a mu),
    and for the two-mode mixture x0 ~ 1/2 N(+m u, sig^2 I) + 1/2 N(-m u, sig^2 I), with v = a^2 sig^2 + s^2,
        eps*(z, t) = (s / v) (z - a m u tanh(a m u.z / v)).
    The DDIM sampler (models/diffusion.py, record=True) is run with these as the "network", so the
    velocities are the sampler's drift exactly as the job records it for a DiT.

Every generator returns the job's .npz contract: ``trajectories`` (n, T+1, d), ``velocities``
(n, T+1, d) (the drift at states 0..T-1; the last state's velocity is not a regression row), and
``num_timesteps``; Lorenz adds ``t`` (T+1,) ascending.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from models.diffusion import sample
from models.schedules import cosine_schedule

LORENZ = {"sigma": 10.0, "rho": 28.0, "beta": 8.0 / 3.0}
# The 7 true terms: dx = -s x + s y; dy = r x - y - x z; dz = x y - b z (text names of our library).
LORENZ_TERMS = [{"z0": -10.0, "z1": 10.0}, {"z0": 28.0, "z1": -1.0, "z0 z2": -1.0}, {"z0 z1": 1.0, "z2": -8.0 / 3.0}]


def lorenz_rhs(x: np.ndarray) -> np.ndarray:
    """(..., 3) -> (..., 3) Lorenz-63 velocity with the classic parameters."""
    s, r, b = LORENZ["sigma"], LORENZ["rho"], LORENZ["beta"]
    return np.stack(
        [s * (x[..., 1] - x[..., 0]), x[..., 0] * (r - x[..., 2]) - x[..., 1], x[..., 0] * x[..., 1] - b * x[..., 2]],
        axis=-1,
    )


def lorenz(n: int = 8, steps: int = 400, dt: float = 0.005, seed: int = 0) -> dict:
    """n Lorenz-63 trajectories from random initial states on the attractor's scale (RK45, rtol 1e-10)
    with exact derivatives as ``velocities``."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps + 1) * dt
    traj = []
    for _ in range(n):
        x0 = rng.normal([0.0, 0.0, 25.0], [8.0, 8.0, 8.0])
        sol = solve_ivp(lambda _t, x: lorenz_rhs(x), (0.0, t[-1]), x0, t_eval=t, rtol=1e-10, atol=1e-10)
        traj.append(sol.y.T)
    z = np.stack(traj)  # (n, T+1, 3)
    return {"trajectories": z, "velocities": lorenz_rhs(z), "num_timesteps": np.int64(steps), "t": t}


def _ddim(eps_fn, n: int, d: int, T: int, seed: int) -> dict:
    sched = cosine_schedule(T)
    ab = sched.alpha_bars.numpy()
    noise = torch.randn((n, d), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = int(t[0])
        a, s = float(np.sqrt(ab[k])), float(np.sqrt(1.0 - ab[k]))
        return torch.from_numpy(eps_fn(x.numpy(), a, s))

    res = sample(eps_model, sched, (n, d), sampler="ddim", noise=noise, record=True, device="cpu", dtype=torch.float64)
    z = res.z.numpy().transpose(1, 0, 2)  # (n, T+1, d)
    v = np.zeros_like(z)
    v[:, :T] = res.drift.numpy().transpose(1, 0, 2)
    return {"trajectories": z, "velocities": v, "num_timesteps": np.int64(T)}


def gaussian_params(d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """mu (d,) and a correlated Sigma (d, d) with eigenvalues spread over 0.3..1.2."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.geomspace(0.3, 1.2, d)
    return 0.5 * rng.normal(size=d), (q * lam) @ q.T


def gaussian_ddim(n: int = 300, d: int = 16, T: int = 50, seed: int = 0) -> dict:
    """DDIM (eta = 0) trajectories of x0 ~ N(mu, Sigma) sampled with the exact eps*; drift affine in z."""
    mu, sigma = gaussian_params(d, seed)

    def eps(z, a, s):
        return s * np.linalg.solve(a * a * sigma + s * s * np.eye(d), (z - a * mu).T).T

    return _ddim(eps, n, d, T, seed + 1)


def mixture_ddim(n: int = 300, d: int = 16, T: int = 50, m: float = 1.5, sig: float = 0.5, seed: int = 0) -> dict:
    """DDIM trajectories of a two-mode mixture +-m u (u a fixed unit direction), isotropic variance sig^2."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)

    def eps(z, a, s):
        v = a * a * sig * sig + s * s
        return (s / v) * (z - a * m * np.tanh(a * m * (z @ u) / v)[:, None] * u)

    out = _ddim(eps, n, d, T, seed + 1)
    out["direction"] = u
    return out


def save_npz(path, data: dict) -> None:
    """The job's input file (float64 arrays, no pickles)."""
    np.savez(path, **{k: np.asarray(v) for k, v in data.items() if k != "direction"})
