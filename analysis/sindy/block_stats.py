"""The numerical heart of stage 2: the Gram statistics of one block of trajectories, per bootstrap group,
held out and per window of t, and their sum over blocks. Ray runs ``accumulate_block`` as a task
(analysis/job/ray_utils.py); here it is plain numpy/torch and writes nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from analysis.sindy.gram import GramStats
from analysis.sindy.library import Library
from analysis.sindy.metrics import stepwise_stats
from analysis.sindy.targets import regression_samples, window_index
from analysis.sindy.theory import state_index

__all__ = ["accumulate_block", "merge_numpy_stats"]


def accumulate_block(
    tset,
    block_i: int,
    coords,
    split: np.ndarray,
    targets: tuple[str, ...],
    library_spec: dict,
    n_groups: int,
    device: str,
    chunk_size: int,
    ceiling_degree: int = 0,
    window_edges: list[float] | None = None,
    step_weights: list[float] | None = None,
) -> dict:
    """Gram statistics of one trajectory block: one per bootstrap group (training) and the held-out one.

    Args:
        tset: trajectories with ``block(i)`` -> an object with z (T+1, b, D), t, drift, eps and index
            (analysis.job.trajectories.TrajectorySet).
        block_i: which block.
        coords: analysis.job.trajectories.Coordinates.
        split: (N,) int per trajectory: -1 held out, else its training group 0..n_groups-1.
        targets: the velocity estimates stacked as targets (main first).
        library_spec: ``Library.spec()``.
        n_groups: G.
        device: where Theta chunks and statistics are computed.
        chunk_size: library rows per evaluation.
        ceiling_degree: > 0 adds per-step statistics of the main target for the free-time
            reference fit (analysis.sindy.metrics.free_time_r2) with a polynomial of this degree.
        window_edges: W + 1 increasing times: held-out statistics are also kept per window of t
            (analysis.sindy.targets.window_index: a row at t belongs to the window [e_w, e_{w+1}), the last one closed).
        step_weights: (T,) row weight per state k (sindy.weighting), or None for equal weights.

    Returns:
        {"groups": [G numpy stats dicts or None], "heldout": numpy stats dict or None,
        "windows": [W numpy stats dicts or None], "steps": {"train": [T dicts] or None, "heldout": [T dicts] or None}}.
    """
    blk = tset.block(block_i)
    z = coords.states(blk.z)  # (T+1, b, d)
    drift = None if blk.drift is None else coords.velocities(blk.drift)
    eps = None if blk.eps is None else coords.velocities(blk.eps)  # linear like a velocity: no centring
    lib = Library.from_spec(library_spec)
    edges = np.asarray(window_edges if window_edges else [], dtype=np.float64)
    out: dict[str, Any] = {"groups": [None] * n_groups, "heldout": None, "windows": [None] * max(len(edges) - 1, 0)}
    labels = split[blk.index]
    T, d = z.shape[0] - 1, z.shape[2]
    step_rows: dict[str, list] = {"train": [], "heldout": []}  # (T, b, d) states and main targets per group
    for g in np.unique(labels).tolist():
        cols = np.flatnonzero(labels == g)
        zs, ts, ys = regression_samples(
            z[:, cols],
            blk.t,
            None if drift is None else drift[:, cols],
            targets,
            eps=None if eps is None else eps[:, cols],
        )
        w = None if step_weights is None else np.asarray(step_weights)[state_index(ts, T)]
        stats = GramStats.from_library(lib, [(zs, ts, ys, w)], device=device, chunk_size=chunk_size)
        if g < 0:
            out["heldout"] = stats.to_numpy()
            if len(edges) > 1:
                win = window_index(ts, edges)
                for wi in np.unique(win).tolist():
                    rows = win == wi
                    out["windows"][wi] = GramStats.from_library(
                        lib,
                        [(zs[rows], ts[rows], ys[rows], None if w is None else w[rows])],
                        device=device,
                        chunk_size=chunk_size,
                    ).to_numpy()
        else:
            out["groups"][g] = stats.to_numpy()
        if ceiling_degree > 0:  # rows are step-major, so (T, b) is a reshape
            step_rows["heldout" if g < 0 else "train"].append(
                (zs.reshape(T, cols.size, d), ys.reshape(T, cols.size, -1)[:, :, :d])
            )
    if ceiling_degree > 0:
        out["steps"] = {
            name: stepwise_stats(
                np.concatenate([r[0] for r in rows], axis=1),
                np.concatenate([r[1] for r in rows], axis=1),
                ceiling_degree,
            )
            if rows
            else None
            for name, rows in step_rows.items()
        }
    return out


def merge_numpy_stats(parts: list[dict | None]):
    """Sum numpy stats dicts (None skipped) into one GramStats on CPU, or None."""
    total = None
    for p in parts:
        if p is None:
            continue
        s = GramStats.from_numpy({k: np.array(v) for k, v in p.items()}, device="cpu")  # ray.get arrays are read-only
        total = s if total is None else total.merge(s)
    return total
