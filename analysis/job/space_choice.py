"""sindy.fit_space=auto: the equations fitted in each space and the space kept whose rollouts end nearest the DiT's
samples (issue 22: "choose the space by what the rollouts show").

The spaces differ in what the least squares measures, not in what the equations are:
    drift  the library models the sampler's drift dz/dt; errors weigh as drift errors, q(t) times an eps error
    eps    the library models the DiT's eps; the drift is composed exactly as p z + q eps (analysis/sindy/theory.py)
    x0     the same eps model, its rows weighed by (s/a)^2: the error of the clean sample x0 = (z - s eps) / a
Each candidate is fitted like any fixed space (its own fit folder, so a rerun reuses it), then integrated from the
initial noise of training trajectories (the held-out ones stay for the report) and scored by the final error against
the DiT's end states from the same noise. The report lists every candidate.
"""

from __future__ import annotations

import time

import numpy as np

from analysis.job.coordinate_choice import fit_in_coordinates
from analysis.job.fits import coefficient_matrix
from analysis.job.plan import Plan
from analysis.job.stages import x0_step_weights
from analysis.job.trajectories import TrajectorySet
from analysis.job.views import run_schedule
from analysis.quality.agreement import end_state_errors
from analysis.sindy.integration import integrate, sindy_rhs
from analysis.sindy.theory import LinearPart, linear_part
from configs.schema import Config

__all__ = ["SPACES", "choose_fit_space"]

SPACES = ("drift", "eps", "x0")


def choose_fit_space(cfg: Config, plan: Plan, tset: TrajectorySet, split: np.ndarray, times: dict) -> tuple:
    """Fit in every space, keep the one whose rollouts from training noises end nearest the DiT's samples.

    Sets ``plan.targets`` and ``plan.step_weights`` to the chosen space's and returns
    (space, coords, fits, lib, coordinate choice, JSON-able record of the space choice).
    """

    s = cfg.sindy
    sampler = tset.manifest.get("sampler") or s.sampler
    p, q = linear_part(run_schedule(plan), sampler)
    idx = np.flatnonzero(split >= 0)[: s.polish_noises]
    start = tset.select(idx)
    runs = []
    for space in SPACES:
        plan.targets = ("drift",) if space == "drift" else ("eps",)
        plan.step_weights = x0_step_weights(plan) if space == "x0" else None
        own: dict = {}
        coords, fits, lib, choice = fit_in_coordinates(cfg, plan, tset, split, own)
        for k, (sec, how) in own.items():
            prev = times.get(k)
            times[k] = (sec + (prev[0] if prev else 0.0), (prev[1] + "; " if prev else "") + f"{space}: {how}")
        t0 = time.time()
        rhs = sindy_rhs(lib, coefficient_matrix(fits, coords.dim, lib.n_terms))
        if space != "drift":
            rhs = LinearPart(p, q, coords.components @ coords.mean if coords.kind != "latent" else None).composed_rhs(
                rhs
            )
        ref = coords.states(start.z)
        sim, _ = integrate(rhs, ref[0], start.t, s.integrator)
        err = end_state_errors(sim[-1], ref[-1])
        runs.append(
            {
                "space": space,
                "targets": plan.targets,
                "step_weights": plan.step_weights,
                "fitted": (coords, fits, lib, choice),
                "row": {
                    "space": space,
                    "final_error": float(err["final_error"]),
                    "per_sample_r2": float(err["per_sample_r2"]),
                    "diverged": int(err["diverged"]),
                    "terms": int(sum(r["n_terms"] for r in fits)),
                    "r2_heldout_median": float(np.median([r["r2_heldout"] for r in fits])),
                    "rollout_seconds": round(time.time() - t0, 2),
                },
            }
        )
    best = min(range(len(runs)), key=lambda i: runs[i]["row"]["final_error"])
    chosen = runs[best]
    plan.targets, plan.step_weights = chosen["targets"], chosen["step_weights"]
    record = {
        "chosen": chosen["space"],
        "noises": len(idx),
        "rule": f"the smallest final error of the rollouts from {len(idx)} training trajectories' initial noise "
        "against the DiT's end states (mean ||z0 - z0_DiT|| / ||z0_DiT||)",
        "candidates": [r["row"] for r in runs],
    }
    print(
        "sindy: fit space "
        + ", ".join(
            f"{r['space']}: final error {r['final_error']:.4f}, {r['terms']} terms" for r in record["candidates"]
        )
        + f" -> {chosen['space']}",
        flush=True,
    )
    return (chosen["space"], *chosen["fitted"], record)
