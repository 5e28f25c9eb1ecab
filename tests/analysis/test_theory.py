"""analysis.sindy.theory: p(t) z + q(t) eps reproduces the sampler's recorded drift on real trajectories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.sindy.theory import LinearPart, linear_part, state_index
from models.diffusion import sample
from models.dit import build_dit
from models.schedules import cosine_schedule, linear_schedule


def _random_dit(seed: int = 0) -> torch.nn.Module:
    """A tiny DiT with every weight drawn at random: a nonlinear eps(z, t) that is not ~0 (a fresh DiT's
    zero-initialised output would leave q eps untested)."""
    torch.manual_seed(seed)
    model = build_dit("tiny", in_channels=1, num_tokens=16)
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("sampler", ["ddim", "ode", "ddpm"])
@pytest.mark.parametrize("make_schedule", [cosine_schedule, linear_schedule])
def test_linear_part_reproduces_recorded_drift(sampler, make_schedule):
    sch = make_schedule(50)
    model = _random_dit()
    g = torch.Generator().manual_seed(3)
    # float64 states (the DiT's time embedding is float32, so it computes in float32 and its eps is cast).
    res = sample(
        lambda x, t: model(x.float(), t).double(),
        sch,
        (6, 16, 1),
        sampler=sampler,
        generator=g,
        record=True,
        dtype=torch.float64,
    )
    z = res.z[:-1].reshape(50, 6, 16).numpy()  # (T, b, d), state order
    eps = res.eps.reshape(50, 6, 16).numpy()
    drift = res.drift.reshape(50, 6, 16).numpy()
    assert np.abs(eps).mean() > 0.1  # the network's part of the drift is really exercised
    p, q = linear_part(sch, sampler)
    composed = p[:, None, None] * z + q[:, None, None] * eps
    scale = np.abs(drift).max()
    np.testing.assert_allclose(composed, drift, rtol=0, atol=1e-11 * scale)
    # The same through LinearPart at the trajectory's times (t = 1 - k/T), and back to eps.
    lp = LinearPart(p, q)
    t = np.repeat(res.t_norm[:-1].numpy(), 6)
    zf, ef, df = z.reshape(-1, 16), eps.reshape(-1, 16), drift.reshape(-1, 16)
    np.testing.assert_allclose(lp.drift(zf, t, ef), df, rtol=0, atol=1e-11 * scale)
    np.testing.assert_allclose(lp.eps(zf, t, df), ef, rtol=0, atol=1e-9)


def test_ddim_cosine_values_and_time_lookup():
    """Issue 10's warning: under cosine T = 50 DDIM, q ~ 50 at t = 1 (drift ~ 50 (eps - z))."""
    p, q = linear_part(cosine_schedule(50), "ddim")
    assert 45 < q[0] < 60 and -60 < p[0] < -45
    assert abs(q[-1]) < 5
    # State k covers (1 - (k+1)/T, 1 - k/T]: grid points map to their own state, midpoints to the step's.
    T = 50
    k = np.arange(T)
    np.testing.assert_array_equal(state_index(1 - k / T, T), k)
    np.testing.assert_array_equal(state_index(1 - (k + 0.5) / T, T), k)


def test_linear_part_of_float32_recording_is_float_precise():
    """The job's trajectories are float32: the composition holds to float32 rounding there."""
    sch = cosine_schedule(50)
    model = _random_dit(1)
    res = sample(model, sch, (4, 16, 1), sampler="ddim", generator=torch.Generator().manual_seed(0), record=True)
    p, q = linear_part(sch, "ddim")
    z = res.z[:-1].reshape(50, 4, 16).double().numpy()
    eps = res.eps.reshape(50, 4, 16).double().numpy()
    drift = res.drift.reshape(50, 4, 16).double().numpy()
    composed = p[:, None, None] * z + q[:, None, None] * eps
    # The recorded drift is (z - mean) * T in float32: a few float32 ulps of the terms that make the mean
    # (z, the next state, the x0 estimate: |p z| and |q eps| / T), times T, whatever the drift's own size.
    z_next = res.z[1:].reshape(50, 4, 16).double().numpy()
    terms = 50 * (np.abs(z) + np.abs(z_next)) + np.abs(p[:, None, None] * z) + np.abs(q[:, None, None] * eps)
    bound = 8 * 2.0**-24 * terms
    assert np.all(np.abs(composed - drift) <= bound), np.max(np.abs(composed - drift) / bound)
