"""States where the equations are used, labelled by the DiT itself (issue 22, "data where the equations are used").

The trajectories give one state per trajectory and step: 2,000 trajectories are 2,000 independent states per step,
and every model fitted to them stops near the same agreement. The DiT can be asked at any state, so the job can
add training rows of two kinds, each stored as blocks in the trajectory format (analysis/job/trajectories.py) so that
the statistics stage reads them like trajectories:

    forward  forward-noised training latents at every step, z_k = a_k x0 + s_k e (a fresh e per step): the DiT's
             own training distribution, as many as wanted (J. Ho et al., NeurIPS 2020, eq. 4)
    dagger   the states the equations' own rollouts visit, labelled by the DiT: fit, roll out, query, refit
             (S. Ross, G. Gordon, D. Bagnell, "A Reduction of Imitation Learning and Structured Prediction to
             No-Regret Online Learning", AISTATS 2011: train on the learner's own state distribution)

A query block holds z (T+1, b, D) with state k at t = 1 - k/T (z[T] is the clean x0 for forward blocks and the
rollout's end for dagger blocks; it is never a regression row), eps (T, b, D) the EMA DiT's output there and the
sampler's drift p z + q eps, as the trajectories have. Only regression on eps or the sampler's drift can use them
(a finite difference between independent states means nothing), which the job checks.
"""

from __future__ import annotations

import numpy as np
import torch

from analysis.job.trajectories import block_seed
from analysis.sindy.integration import integrate
from analysis.sindy.theory import linear_part, noise_levels

__all__ = ["QUERY_KINDS", "label_states", "forward_block"]

QUERY_KINDS = ("forward", "dagger")


@torch.no_grad()
def label_states(model, schedule, z: torch.Tensor, latent_shape: tuple, sampler: str) -> dict[str, torch.Tensor]:
    """The DiT's eps and the sampler's drift at states z (T+1, b, D), state k the input of network step T-1-k.

    Returns:
        {"z", "eps" (T, b, D), "drift" (T, b, D), "t" (T+1,) float64}, float32 on the CPU.
    """

    T, b = z.shape[0] - 1, z.shape[1]
    p, q = linear_part(schedule, sampler)
    dev = next(model.parameters()).device
    eps = torch.empty((T, b, z.shape[2]), dtype=torch.float32)
    for k in range(T):
        x = z[k].to(dev, torch.float32).reshape(b, *latent_shape)
        tt = torch.full((b,), T - 1 - k, dtype=torch.long, device=dev)
        eps[k] = model(x, tt).reshape(b, -1).float().cpu()
    pk = torch.as_tensor(p, dtype=torch.float32).view(T, 1, 1)
    qk = torch.as_tensor(q, dtype=torch.float32).view(T, 1, 1)
    return {
        "z": z.float().contiguous(),
        "eps": eps,
        "drift": (pk * z[:-1].float() + qk * eps).contiguous(),
        "t": (torch.arange(T, -1, -1, dtype=torch.float64) / T).contiguous(),
    }


def forward_block(
    model, schedule, train: torch.Tensor, sampler: str, seed: int, block: int, count: int
) -> dict[str, torch.Tensor]:
    """``count`` forward-noised training latents at every step, labelled by the DiT (module docstring).

    Args:
        model: the EMA DiT in eval mode.
        schedule: its models.schedules.Schedule.
        train: (M, N, C) the normalised training latents the DiT was trained on.
        sampler: the trajectories' sampler (its drift is recorded beside eps).
        seed, block: all randomness of the block comes from these two (block_seed), so a block is reproducible.
        count: latents in the block.
    """

    g = torch.Generator().manual_seed(block_seed(seed, block))
    T, shape = schedule.T, tuple(train.shape[1:])
    x0 = train[torch.randint(0, train.shape[0], (count,), generator=g)].reshape(count, -1).double()
    a, s = (torch.from_numpy(v) for v in noise_levels(schedule))  # (T,) per state k
    e = torch.randn((T, count, x0.shape[1]), generator=g, dtype=torch.float64)
    z = torch.cat([a.view(T, 1, 1) * x0 + s.view(T, 1, 1) * e, x0[None]], dim=0)
    return label_states(model, schedule, z, shape, sampler)


def rollout_states(rhs, z0: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The states (T+1, b, d) an rhs visits from z0 with Euler on the sampler's grid; diverged rows are dropped."""

    sim, diverged_at = integrate(rhs, z0, t, "euler")
    return sim[:, diverged_at < 0]


@torch.no_grad()
def step_sensitivity(model, schedule, sampler: str, z_T: torch.Tensor, seed: int, scale: float = 1e-2) -> np.ndarray:
    """How far an eps error at each step moves the final sample: g_k = E||dz_0||^2 / E||delta||^2 for a small
    random error delta added to the DiT's eps at step k only, the DiT sampling every other step (the sampler's
    own coefficients and the DiT's own Jacobian carry the error to t = 0). (T,) float64, state order.

    Args:
        model: the EMA DiT in eval mode; schedule: its Schedule; sampler: "ddim" | "ode" | "ddpm" (its
            deterministic mean: analysis/sindy/theory.py's p and q).
        z_T: (n, N, C) initial noises.
        seed: of the random errors.
        scale: the errors' std (small: the linear response is measured).
    """

    p, q = linear_part(schedule, sampler)
    T, n = schedule.T, z_T.shape[0]
    dev = next(model.parameters()).device

    def step(z, k, extra=None):
        tt = torch.full((n,), T - 1 - k, dtype=torch.long, device=dev)
        eps = model(z, tt).double()
        if extra is not None:
            eps = eps + extra
        return z - (p[k] * z + q[k] * eps) / T  # one sampler step: z[k+1] = z[k] - drift / T

    z = z_T.to(dev, torch.float64)
    states = [z]
    for k in range(T):
        states.append(step(states[-1].float(), k).double())
    end = states[-1]
    g = torch.Generator(device="cpu").manual_seed(seed)
    gain = np.empty(T)
    for k in range(T):
        delta = scale * torch.randn(z_T.shape, generator=g, dtype=torch.float64).to(dev)
        zk = step(states[k].float(), k, delta)
        for j in range(k + 1, T):
            zk = step(zk.float(), j)
        gain[k] = float(((zk - end) ** 2).sum() / (delta**2).sum())
    return gain
