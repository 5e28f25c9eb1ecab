"""The yardstick table's arithmetic, and the yardsticks on exact Gaussian data (where the answers are known)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.job.validation import windowed_r2
from analysis.job.yardsticks import _dit_rollout, dense_affine, headline
from analysis.quality.agreement import (
    end_state_errors,
    gap_share,
    noise_sigma,
    paired_difference,
    same_digit,
    wilson_interval,
)
from analysis.report.yardsticks import yardstick_section
from analysis.sindy.integration import integrate
from analysis.sindy.mixture import GaussianMixtureEps
from analysis.sindy.targets import time_windows
from analysis.sindy.theory import LinearPart, linear_part, noise_levels, state_index
from models.diffusion import sample
from models.schedules import cosine_schedule


def test_wilson_interval_known_values():
    # Worked by hand from the formula: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
    lo, hi = wilson_interval(765, 1000)
    assert lo == pytest.approx(0.73774, abs=1e-4) and hi == pytest.approx(0.79023, abs=1e-4)
    lo, hi = wilson_interval(10, 10)  # stays inside [0, 1] and is not degenerate at 100%
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=2e-4)
    assert wilson_interval(0, 10)[0] == 0.0
    assert all(np.isnan(wilson_interval(0, 0)))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_same_digit_overall_and_confident():
    ref = np.array([1, 2, 3, 4, 5])
    gen = np.array([1, 2, 0, 4, 0])
    conf = np.array([0.95, 0.5, 0.99, 0.9, 0.1])  # confident: indices 0, 2, 3
    out = same_digit(gen, ref, conf)
    assert out["n"] == 5 and out["same_digit"] == pytest.approx(0.6)
    assert out["ci95"][0] < 0.6 < out["ci95"][1]
    assert out["confident"]["n"] == 3 and out["confident"]["same_digit"] == pytest.approx(2 / 3)
    none = same_digit(gen, ref, np.zeros(5))
    assert none["confident"] == {"n": 0, "same_digit": None, "ci95": None}
    with pytest.raises(ValueError):
        same_digit(gen[:3], ref, conf)


def test_end_state_errors_and_divergence():
    ref = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    assert end_state_errors(ref, ref) == {"final_error": 0.0, "per_sample_r2": 1.0, "diverged": 0}
    gen = ref + np.array([[0.1, 0.0], [0.0, 0.0], [0.0, 0.5]])
    out = end_state_errors(gen, ref)
    assert out["final_error"] == pytest.approx((0.1 / 1 + 0 + 0.5 / 5) / 3)
    bad = gen.copy()
    bad[1] = np.nan
    out = end_state_errors(bad, ref)
    assert out["diverged"] == 1 and out["final_error"] == np.inf


def test_gap_share_and_headline():
    assert gap_share(0.8, 0.7, 0.9) == pytest.approx(0.5)
    assert gap_share(0.8, 0.9, 0.9) is None and gap_share(None, 0.1, 0.9) is None
    rows = [
        {"name": "ceil", "kind": "ceiling", "same_digit": 0.99, "final_error": 0.01},
        {"name": "gauss", "kind": "floor", "same_digit": 0.72, "final_error": 0.33},
        {"name": "mix", "kind": "floor", "same_digit": 0.68, "final_error": 0.30},
        {"name": "eq", "kind": "equations", "same_digit": 0.81, "final_error": 0.17},
    ]
    h = headline(rows)
    assert h["floor"] == "gauss" and h["ceiling"] == "ceil"
    assert h["same_digit_gap_share"] == pytest.approx((0.81 - 0.72) / (0.99 - 0.72))
    assert h["final_error_gap_share"] == pytest.approx((0.33 - 0.17) / (0.33 - 0.01))
    assert "peer_same_digit" not in h
    # Peers: their mean is the yardstick; the equations are measured against it and from the floor up to it.
    peers = [
        {"name": "p1", "kind": "peer", "same_digit": 0.82, "final_error": 0.19},
        {"name": "p2", "kind": "peer", "same_digit": 0.86, "final_error": 0.18},
    ]
    h = headline(rows[:1] + peers + rows[1:])
    assert h["peer_same_digit"] == pytest.approx(0.84) and h["same_digit_minus_peer"] == pytest.approx(0.81 - 0.84)
    assert h["same_digit_floor_to_peer_share"] == pytest.approx((0.81 - 0.72) / (0.84 - 0.72))
    assert h["same_digit_gap_share"] == pytest.approx((0.81 - 0.72) / (0.99 - 0.72))  # the ceiling's is unchanged
    assert "same_digit_minus_peer_ci95" not in h  # no per-noise hits, no paired interval
    # With per-noise hits: the paired interval against the peers' mean, the discordant counts for one peer.
    rng = np.random.default_rng(0)
    hits = {r["name"]: rng.random(400) < r["same_digit"] for r in rows + peers}
    h = headline(rows[:1] + peers + rows[1:], hits)
    pd = paired_difference(hits["eq"], np.stack([hits["p1"], hits["p2"]]))
    assert h["same_digit_minus_peer_ci95"] == pd["ci95"] and "noises_only_equations" not in h
    h = headline(rows + peers[:1], hits)
    pd = paired_difference(hits["eq"], hits["p1"])
    assert (h["noises_only_equations"], h["noises_only_peer"]) == (pd["only_this"], pd["only_other"])


def test_paired_difference_counts_only_the_discordant_noises():
    # 100 noises: both right on 70, only the first on 12, only the other on 8, both wrong on 10.
    a = np.array([1] * 70 + [1] * 12 + [0] * 8 + [0] * 10, bool)
    b = np.array([1] * 70 + [0] * 12 + [1] * 8 + [0] * 10, bool)
    pd = paired_difference(a, b)
    assert pd["difference"] == pytest.approx(0.04) and (pd["only_this"], pd["only_other"]) == (12, 8)
    # The textbook interval of two paired proportions: (b - c) / n +- z sqrt(b + c - (b - c)^2 / n) / n.
    half = 1.959963984540054 * np.sqrt(12 + 8 - 4**2 / 100) / 100
    assert pd["ci95"] == pytest.approx([0.04 - half, 0.04 + half])
    # Narrower than the unpaired interval of two independent proportions 0.82 and 0.78 at n = 100.
    assert half < 0.8 * 1.959963984540054 * np.sqrt((0.82 * 0.18 + 0.78 * 0.22) / 100)
    # Never disagreeing: no difference and no width; several others: against their per-noise mean.
    assert paired_difference(a, a) == {"difference": 0.0, "ci95": [0.0, 0.0], "only_this": 0, "only_other": 0}
    two = paired_difference(a, np.stack([b, a]))
    assert two["difference"] == pytest.approx(0.02) and "only_this" not in two
    with pytest.raises(ValueError, match="paired_difference"):
        paired_difference(a, b[:50])


def test_noise_sigma_gives_the_nominal_r2():
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((50, 400, 3)) * np.array([1.0, 0.5, 2.0])
    for r2 in (0.999, 0.99, 0.95):
        noisy = eps + noise_sigma(eps, r2) * rng.standard_normal(eps.shape)
        got = windowed_r2(eps, noisy, np.linspace(1, 0.02, 50), [0.0, 1.0])["pooled"]
        assert np.allclose(got, r2, atol=0.2 * (1 - r2) + 1e-4)
    with pytest.raises(ValueError):
        noise_sigma(eps, 0.0)


def test_batched_noisy_rollouts_are_the_sampler_with_each_rows_noise():
    """The sensitivity rows share one batch: a zero-noise row is the plain sampler, and each row's deviation from it
    scales with its own noise level (the sampler is linear in eps for this linear eps model)."""
    sched = cosine_schedule(12)
    n, shape = 300, (4, 1)
    z_T = torch.randn((n, *shape), generator=torch.Generator().manual_seed(0))

    def model(x, tt):
        return 0.7 * x

    plain = sample(model, sched, (n, *shape), sampler="ddim", noise=z_T).x0.reshape(n, -1)
    np.testing.assert_array_equal(_dit_rollout(model, sched, "ddim", z_T, None, 0).numpy(), plain.numpy())
    sig = np.array([[0.0] * 4, [0.01] * 4, [0.1] * 4, [0.0, 0.0, 0.1, 0.1]])
    ends = _dit_rollout(model, sched, "ddim", z_T, sig, 3).numpy()
    assert ends.shape == (4, n, 4)
    dev = np.abs(ends - plain.numpy()[None])  # (4, n, 4)
    np.testing.assert_allclose(ends[0], plain.numpy(), atol=1e-6)
    assert 7 < dev[2].mean() / dev[1].mean() < 14
    assert dev[3][:, :2].max() < 1e-6 and dev[3][:, 2:].mean() == pytest.approx(dev[2].mean(), rel=0.2)


def test_exact_gaussian_the_floor_agrees_fully_and_the_dense_reference_is_exact():
    """Data from an exact Gaussian: its closed form is the denoiser, so the Gaussian floor reproduces the reference
    trajectories (eps R^2 1, 100% same digit, final error 0), and so does the per-step affine reference (the
    Gaussian eps* is affine in z at every step)."""
    rng = np.random.default_rng(1)
    d, n, T = 4, 300, 50
    A = rng.standard_normal((d, d))
    gauss = GaussianMixtureEps(np.ones(1), rng.standard_normal((1, d)), (A @ A.T / d + 0.05 * np.eye(d))[None])
    sched = cosine_schedule(T)
    p, q = linear_part(sched, "ddim")
    lp = LinearPart(p, q)
    a, s = noise_levels(sched)

    def eps_fn(z, t):
        k = int(state_index(t, T))
        return gauss.eps(z, a[k], s[k])

    t = np.arange(T, -1, -1) / T
    ref, _ = integrate(lp.composed_rhs(eps_fn), rng.standard_normal((n, d)), t, "euler")
    eps_ref = np.stack([eps_fn(ref[k], t[k]) for k in range(T)])
    edges = time_windows(t, 5)

    def label(z):  # a stand-in classifier: the sign pattern of the first two coordinates, 4 classes
        return (z[:, 0] > 0).astype(int) * 2 + (z[:, 1] > 0)

    W = dense_affine(ref[:-1], eps_ref)

    def dense_fn(z, tt):
        return np.concatenate([z, np.ones((len(z), 1))], axis=1) @ W[int(state_index(tt, T))]

    for fn in (eps_fn, dense_fn):
        sim, _ = integrate(lp.composed_rhs(fn), ref[0], t, "euler")
        pred = np.stack([fn(ref[k], t[k]) for k in range(T)])
        assert windowed_r2(eps_ref, pred, t[:-1], edges)["median"] == pytest.approx(1.0, abs=1e-6)
        assert same_digit(label(sim[-1]), label(ref[-1]), np.ones(n))["same_digit"] == 1.0
        errs = end_state_errors(sim[-1], ref[-1])
        assert errs["final_error"] < 1e-5 and errs["per_sample_r2"] > 1 - 1e-6


def test_yardstick_section_renders_every_row():
    row = {
        "terms": None,
        "eps_r2_median": 0.99,
        "eps_r2_windows": [{"t_from": 0.0, "t_to": 0.5, "median": 0.98}, {"t_from": 0.5, "t_to": 1.0, "median": 0.995}],
        "same_digit": 0.9,
        "ci95": [0.88, 0.92],
        "confident": {"n": 10, "same_digit": 1.0, "ci95": [0.72, 1.0]},
        "final_error": 0.1,
        "per_sample_r2": 0.95,
        "diverged": 0,
        "fd_mnist": 3.2,
        "mean_confidence": 0.9,
    }
    rows = [
        {**row, "name": "ceil", "kind": "ceiling", "same_digit": 0.99},
        {**row, "name": "gauss", "kind": "floor", "same_digit": 0.7, "final_error": 0.3, "diverged": 2},
        {**row, "name": "the equations", "kind": "equations", "same_digit": 0.8},
    ]
    y = {"n_noises": 10, "sampler": "ddim", "rows": rows, "headline": headline(rows), "skipped": {"x": "why"}}
    md = "\n".join(yardstick_section(y))
    assert "close 34% of the gap" in md and "+10.0 points above the floor" in md
    assert "agreement for iid errors" in md and "bench_window_costs" in md
    assert (
        md.count("\n| ") >= 3 + 1 + 3
        and "(2 diverged)" in md
        and "| the equations | equations |  | 0.9900 | 80.0% [88.0, 92.0] | 100.0% [72.0, 100.0] |" in md
    )
    assert "- not measured (x): why" in md
    assert "No peer row: `make peer`" in md and "Against an equally good DiT" not in md
    peer = {**row, "name": "DiT of runs/x-seed1 (same recipe, another seed)", "kind": "peer", "same_digit": 0.85}
    rows = rows[:1] + [peer] + rows[1:]
    md = "\n".join(yardstick_section({**y, "rows": rows, "headline": headline(rows)}))
    assert (
        "**Against an equally good DiT:** a DiT of the same recipe with another seed gives the DiT's digit in 85.0% "
        "of the noises, the equations in 80.0%: 5.0 points below it, closing 67% of the floor-to-peer gap. The "
        "raw-weights ceiling" in md
    )
    # With the paired interval: above the peer there is no gap share; an interval holding 0 says so.
    hl = {**headline(rows), "same_digit_minus_peer": 0.03, "same_digit_minus_peer_ci95": [-0.01, 0.07]}
    hl |= {"noises_only_equations": 31, "noises_only_peer": 19}
    md2 = "\n".join(yardstick_section({**y, "rows": rows, "headline": hl}))
    assert (
        "the equations in 80.0%: 3.0 points above it (paired 95% interval of the difference [-1.0, +7.0]; only the "
        "equations get the DiT's digit from 31 of these noises, only the peer from 19). An interval that holds 0 "
        "means these noises do not tell the two apart." in md2
    )
    assert "floor-to-peer" not in md2
    hl["same_digit_minus_peer_ci95"] = [0.01, 0.05]
    md2 = "\n".join(yardstick_section({**y, "rows": rows, "headline": hl}))
    assert "The interval excludes 0: the equations are closer to this DiT than the peer is." in md2
    two = rows[:2] + [{**peer, "name": "DiT of runs/x-seed2 (same recipe, another seed)", "same_digit": 0.65}]
    two += rows[2:]  # rows[1] is the first peer
    md2 = "\n".join(yardstick_section({**y, "rows": two, "headline": headline(two)}))
    assert (
        "2 DiTs of the same recipe with other seeds give the DiT's digit in 75.0% of the noises on average, the "
        "equations in 80.0%: 5.0 points above them." in md2
    )
    two[2]["same_digit"] = 0.75  # a tie (up to rounding) is a tie
    md2 = "\n".join(yardstick_section({**y, "rows": two, "headline": headline(two)}))
    assert "the equations in 80.0%: level with them. The raw-weights" in md2
    assert "No peer row" not in md and "| DiT of runs/x-seed1 (same recipe, another seed) | peer |" in md
    assert yardstick_section({"skipped": "no DiT"}) == [
        "## The equations beside their yardsticks",
        "",
        "Not measured: no DiT.",
        "",
    ]
