"""The DiT-labelled query states and the step sensitivity, on models whose answers are known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.job.queries import forward_block, label_states, step_sensitivity
from analysis.sindy.theory import linear_part, noise_levels
from models.schedules import cosine_schedule


class Linear(torch.nn.Module):
    """eps(z, t) = c z: a 'DiT' whose outputs and Jacobian are known."""

    def __init__(self, c: float):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(float(c)))

    def forward(self, x, t):
        return self.c * x


def test_forward_block_states_and_labels():
    sched = cosine_schedule(20)
    train = torch.randn(5, 4, 1)
    out = forward_block(Linear(0.5), sched, train, "ddim", seed=3, block=0, count=64)
    T = sched.T
    assert out["z"].shape == (T + 1, 64, 4) and out["eps"].shape == (T, 64, 4) and out["t"][0] == 1.0
    a, s = noise_levels(sched)
    x0 = out["z"][T].double()
    assert all(any(torch.allclose(x, r.reshape(-1).double()) for r in train) for x in x0)  # x0 from the latents
    e = (out["z"][:T].double() - torch.from_numpy(a).view(T, 1, 1) * x0) / torch.from_numpy(s).view(T, 1, 1)
    assert abs(float(e.mean())) < 0.05 and abs(float(e.std()) - 1) < 0.05  # z_k = a_k x0 + s_k e, e ~ N(0, I)
    assert torch.allclose(out["eps"], 0.5 * out["z"][:T], atol=1e-6)  # labelled by the model at those states
    p, q = linear_part(sched, "ddim")
    drift = (
        torch.from_numpy(p).view(T, 1, 1) * out["z"][:T].double()
        + torch.from_numpy(q).view(T, 1, 1) * out["eps"].double()
    )
    assert torch.allclose(out["drift"].double(), drift, atol=1e-4)
    again = forward_block(Linear(0.5), sched, train, "ddim", seed=3, block=0, count=64)
    assert torch.equal(again["z"], out["z"])  # a function of (seed, block) only
    assert not torch.equal(forward_block(Linear(0.5), sched, train, "ddim", seed=3, block=1, count=64)["z"], out["z"])


def test_label_states_order_is_the_network_step():
    class StepEcho(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            return torch.zeros_like(x) + t.view(-1, 1, 1).float()

    sched = cosine_schedule(10)
    out = label_states(StepEcho(), sched, torch.zeros(11, 3, 2), (2, 1), "ddim")
    assert out["eps"][:, 0, 0].tolist() == list(range(9, -1, -1))  # state k is the input of step T-1-k


@pytest.mark.parametrize("c", [0.0, 0.7])
def test_step_sensitivity_matches_the_linear_system(c):
    """eps = c z makes every step linear: z[k+1] = m_k z[k] with m_k = 1 - (p_k + c q_k) / T, and an error delta at
    step k reaches the end as -(q_k / T) prod_{j > k} m_j delta: the gain is its square."""
    sched = cosine_schedule(12)
    T = sched.T
    p, q = linear_part(sched, "ddim")
    m = 1 - (p + c * q) / T
    want = np.array([(q[k] / T) ** 2 * np.prod(m[k + 1 :] ** 2) for k in range(T)])
    z_T = torch.randn(32, 3, 1, generator=torch.Generator().manual_seed(0))
    got = step_sensitivity(Linear(c), sched, "ddim", z_T, seed=0)
    assert got == pytest.approx(want, rel=2e-3)  # the model sees float32 states: the last digits differ
