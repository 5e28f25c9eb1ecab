"""The sampler's known linear part: drift = p(t) z + q(t) eps_theta(z, t), with p and q from the schedule.

References:
    J. Song, C. Meng, S. Ermon, "Denoising Diffusion Implicit Models", ICLR 2021 (eq. 12, eta = 0);
    Y. Song et al., "Score-Based Generative Modeling through SDEs", ICLR 2021 (probability-flow ODE,
    eq. 13); J. Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (Algorithm 2, the
    mean of the ancestral step). The steps themselves are models/diffusion.py's; this module only
    writes each one as an affine function of (z, eps).

Every deterministic update of models/diffusion.py is linear in the state and in the network's
output at that state: mean = A_t z + B_t eps. With the recorded drift
``drift = (z - mean) * T`` (dz/dt in increasing t, analysis/sindy/targets.py) this is
    drift = p z + q eps,   p = T (1 - A_t),   q = -T B_t,
per sampler step t (the network's step index; state k of a trajectory, at t_norm = 1 - k/T, is the
input of step T-1-k, with ab = alpha_bars[T-1-k], ab_prev = alpha_bars_prev[T-1-k]):

    ddim (eta = 0):  A = sqrt(ab_prev / ab),  B = sqrt(1 - ab_prev) - sqrt(ab_prev (1 - ab) / ab)
    ode (Euler):     p = -rate / 2,           q = rate / (2 sqrt(1 - ab)),  rate = -T log(1 - beta)
    ddpm (mean):     A = 1 / sqrt(alpha),     B = -beta / (sqrt(1 - ab) sqrt(alpha))

So a model of eps_theta (the DiT's output, a bounded, well-scaled target) gives the drift exactly
through p and q, with no error in the linear part. The catch (issue 10): q is large where the noise is
largest (DDIM with the cosine schedule and T = 50: q ~ 52 at t = 1), so an eps error there is
multiplied ~50x in the drift; judge eps fits by what they generate, not by drift R^2 alone.
Heun is not covered: its corrector evaluates the network a second time, at a state we do not record.

Between grid points p and q are piecewise constant on (k/T, (k+1)/T] (the interval of the step that
ends there), as the VP rate of models/diffusion.py; only Euler on the sampler's grid reproduces
the sampler exactly.
"""

from __future__ import annotations

import numpy as np

SAMPLERS_WITH_THEORY = ("ddim", "ode", "ddpm")


def per_state(schedule, values) -> np.ndarray:
    """A per-network-step schedule tensor (alpha_bars, betas, ...) in the analysis order of states: state k = 0..T-1
    (t = 1 - k/T) is the input of network step T-1-k. float64 (T,)."""
    return values.double().cpu().numpy()[np.arange(schedule.T - 1, -1, -1)]


def linear_part(schedule, sampler: str) -> tuple[np.ndarray, np.ndarray]:
    """p and q of every trajectory state, in the analysis order (state k = 0..T-1, t = 1 - k/T).

    Args:
        schedule: models.schedules.Schedule the trajectories were sampled with.
        sampler: "ddim" (eta = 0) | "ode" (Euler) | "ddpm" (the drift of its deterministic mean).

    Returns:
        p (T,), q (T,) float64: drift[k] = p[k] z[k] + q[k] eps[k].
    """
    if sampler not in SAMPLERS_WITH_THEORY:
        raise ValueError(f"no closed-form linear part for sampler {sampler!r}; known: {SAMPLERS_WITH_THEORY}")
    T = schedule.T
    ab, ab_prev = per_state(schedule, schedule.alpha_bars), per_state(schedule, schedule.alpha_bars_prev)
    beta = per_state(schedule, schedule.betas)
    if sampler == "ddim":
        A = np.sqrt(ab_prev / ab)
        B = np.sqrt(1.0 - ab_prev) - np.sqrt(ab_prev * (1.0 - ab) / ab)
        return T * (1.0 - A), -T * B
    if sampler == "ode":
        rate = per_state(schedule, schedule.rates)
        return -0.5 * rate, 0.5 * rate / np.sqrt(1.0 - ab)
    alpha = 1.0 - beta
    A = 1.0 / np.sqrt(alpha)
    B = -beta / (np.sqrt(1.0 - ab) * np.sqrt(alpha))
    return T * (1.0 - A), -T * B


def noise_levels(schedule) -> tuple[np.ndarray, np.ndarray]:
    """a = sqrt(ab) and s = sqrt(1 - ab) of every state k = 0..T-1 (z_k = a x0 + s e), float64 (T,)."""
    ab = per_state(schedule, schedule.alpha_bars)
    return np.sqrt(ab), np.sqrt(1.0 - ab)


def state_index(t: float | np.ndarray, T: int) -> np.ndarray:
    """State k whose step covers time t: k = T - ceil(t T) (t = 1 -> 0; t in ((T-k-1)/T, (T-k)/T] -> k)."""
    k = T - np.ceil(np.asarray(t, dtype=np.float64) * T - 1e-9).astype(np.int64)
    return np.clip(k, 0, T - 1)


class LinearPart:
    """p(t), q(t) on the sampler's grid, and the drift composed from an eps model.

    Args:
        p, q: (T,) from ``linear_part``, state order.
        offset: (d,) added to the fit coordinates to get the coordinates p multiplies: the PCA
            projection of the centre (C m) when the fit works in principal components c = C (z - m),
            since C z = c + C m; zeros for the latent's own coordinates.
    """

    def __init__(self, p: np.ndarray, q: np.ndarray, offset: np.ndarray | None = None):
        self.p, self.q = np.asarray(p, np.float64), np.asarray(q, np.float64)
        self.T = len(self.p)
        self.offset = None if offset is None else np.asarray(offset, np.float64)

    def at(self, t: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(p, q) at time(s) t (piecewise constant, see the module docstring)."""
        k = state_index(t, self.T)
        return self.p[k], self.q[k]

    def drift(self, z: np.ndarray, t: float | np.ndarray, eps: np.ndarray) -> np.ndarray:
        """p(t) (z + offset) + q(t) eps; z, eps (n, d), t a float or (n,)."""
        p, q = self.at(t)
        p, q = np.reshape(p, (-1, 1)), np.reshape(q, (-1, 1))
        zz = z if self.offset is None else z + self.offset
        return p * zz + q * eps

    def eps(self, z: np.ndarray, t: float | np.ndarray, drift: np.ndarray) -> np.ndarray:
        """The eps a drift implies: (drift - p (z + offset)) / q."""
        p, q = self.at(t)
        p, q = np.reshape(p, (-1, 1)), np.reshape(q, (-1, 1))
        zz = z if self.offset is None else z + self.offset
        return (drift - p * zz) / q

    def composed_rhs(self, eps_rhs):
        """f(z, t) = p(t) z + q(t) eps_rhs(z, t): the drift of an eps model, for analysis.sindy.integration.integrate."""

        def f(z: np.ndarray, t: float) -> np.ndarray:
            return self.drift(z, float(t), eps_rhs(z, t))

        return f

    def describe(self, sampler: str) -> str:
        k_mid = self.T // 2
        return (
            f"{sampler}: drift = p(t) z + q(t) eps, with p, q from the schedule; p = {self.p[0]:.3g}, "
            f"q = {self.q[0]:.3g} at t = 1, p = {self.p[k_mid]:.3g}, q = {self.q[k_mid]:.3g} at "
            f"t = {1 - k_mid / self.T:.2g}, p = {self.p[-1]:.3g}, q = {self.q[-1]:.3g} at t = {1 / self.T:.2g}"
        )
