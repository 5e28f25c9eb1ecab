"""analysis.job.validation: windowed R^2 and rollouts against a reference, on cases with known answers."""

from __future__ import annotations

import numpy as np

from analysis.job.validation import rollout, windowed_r2
from analysis.sindy.targets import time_windows, window_index


def test_windowed_r2_splits_t_into_equal_windows():
    rng = np.random.default_rng(0)
    T, b, d = 50, 30, 2
    t = 1 - np.arange(T) / T  # states 0..T-1: t = 1 ... 0.02
    y = rng.normal(size=(T, b, d))
    pred = y.copy()
    late = t > 0.8 - 1e-9
    pred[late] += rng.normal(size=pred[late].shape)  # errors only in the last window
    out = windowed_r2(y, pred, t, time_windows(np.append(t, 0.0), 5))  # the edges of the states' t range 0..1
    got = [(w["t_from"], w["t_to"]) for w in out["windows"]]
    np.testing.assert_allclose(got, [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)], atol=1e-15)
    last = np.array(out["windows"][-1]["r2"])  # t in [0.8, 1]: the errors, and only there (t = 0.8 included)
    assert np.all(last < 0.5)
    for w in out["windows"][:-1]:
        np.testing.assert_allclose(w["r2"], 1.0)
    assert 0.5 < out["median"] < 1.0


def test_one_window_definition_puts_grid_points_on_edges_in_the_window_above():
    T = 50
    t = 1 - np.arange(T + 1) / T  # 1 - 40/50 = 0.19999999999999996 must count as t = 0.2
    edges = time_windows(t, 5)
    w = window_index(t, edges)
    assert w[0] == 4 and w[-1] == 0  # t = 1 in the last (closed) window, t = 0 in the first
    assert [int(np.sum(w == i)) for i in range(5)] == [10, 10, 10, 10, 11]
    assert w[list(np.round(t, 12)).index(0.2)] == 1 and w[list(np.round(t, 12)).index(0.8)] == 4


def test_rollout_of_the_generating_rhs_has_zero_error():
    """Euler on the sampler's grid with the rhs that made the reference reproduces it exactly."""
    T, d = 40, 3
    t = 1 - np.arange(T + 1) / T
    A = np.array([[0.5, 1.0, 0.0], [-1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    f = lambda z, tt: z @ A.T * (1 + tt)  # noqa: E731
    ref = np.empty((T + 1, 5, d))
    ref[0] = np.random.default_rng(1).normal(size=(5, d))
    for k in range(T):
        ref[k + 1] = ref[k] - f(ref[k], t[k]) / T
    out = rollout(f, ref, t, "euler")
    assert out["diverged"] == 0 and np.max(out["rmse_per_step"]) < 1e-12
    out = rollout(lambda z, tt: f(z, tt) * 1.1, ref, t, "euler")
    assert out["end_rmse"] > 1e-3 and out["rmse_per_step"][0] == 0.0


def test_rollout_error_leaves_out_diverging_rollouts():
    T, d = 20, 2
    t = 1 - np.arange(T + 1) / T
    ref = np.zeros((T + 1, 3, d))
    ref[0] = [[1.0, 0.0], [0.0, 1.0], [1e3, 1e3]]
    ref[1:] = ref[0]
    out = rollout(lambda z, tt: -50.0 * z * (np.abs(z) > 100), ref, t, "euler")  # only the third one blows up
    assert out["diverged"] == 1 and np.max(out["rmse_per_step"]) == 0.0
