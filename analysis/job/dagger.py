"""DAgger for the equations: the states their own rollouts visit, labelled by the DiT, and a refit (issue 22).

S. Ross, G. Gordon, D. Bagnell, "A Reduction of Imitation Learning and Structured Prediction to No-Regret Online
Learning", AISTATS 2011: a learner trained only on the expert's states drifts into states the expert never showed
it; labelling the learner's own states with the expert and training again on everything fixes that distribution
shift. Here the expert is the EMA DiT and the learner the equations: each round rolls the current equations out
from training noises on the sampler's grid, asks the DiT for eps at every state they visit (analysis/job/queries.py),
stores those states as query blocks and fits again in the chosen coordinates, with every earlier row kept.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from analysis.job.coordinate_choice import save_coordinates
from analysis.job.fits import coefficient_matrix, fit_key, stage_fits
from analysis.job.plan import Plan
from analysis.job.queries import label_states, rollout_states
from analysis.job.trajectories import (
    TrajectorySet,
    block_is_complete,
    block_name,
    plan_blocks,
    write_block,
    write_manifest,
)
from analysis.job.views import run_schedule
from analysis.sindy.coordinates import Coordinates
from analysis.sindy.integration import sindy_rhs
from analysis.sindy.library import Library
from analysis.sindy.theory import LinearPart, linear_part
from configs.schema import Config
from models.artifacts import load_denoiser

__all__ = ["stage_dagger"]


def stage_dagger(
    cfg: Config,
    plan: Plan,
    tset: TrajectorySet,
    coords: Coordinates,
    split: np.ndarray,
    fits: list[dict],
    lib: Library,
    choice: dict,
    round_i: int,
    times: dict,
) -> tuple[list[dict], Library, dict]:
    """One DAgger round: roll out, label, write the blocks (reused on rerun), refit. Returns (fits, lib, choice)."""

    s = cfg.sindy
    t0 = time.time()
    sampler = tset.manifest.get("sampler") or s.sampler
    p, q = linear_part(run_schedule(plan), sampler)
    lp = LinearPart(p, q, coords.components @ coords.mean if coords.kind != "latent" else None)
    key = fit_key(cfg, plan, tset, coords)
    folder = plan.run_dir / "sindy" / "queries" / f"dagger-{key}-round{round_i}"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        added, how = TrajectorySet.from_manifest(manifest), "reused"
    else:
        rhs = sindy_rhs(lib, coefficient_matrix(fits, coords.dim, lib.n_terms))
        if plan.targets[0] == "eps":
            rhs = lp.composed_rhs(rhs)
        train = np.flatnonzero(split >= 0)[: s.dagger_noises]
        start = tset.select(train)
        visited = rollout_states(rhs, coords.states(start.z[0]), start.t)  # (T+1, n, d), diverged ones dropped
        latent = torch.from_numpy(coords.inverse(visited)).float()  # (T+1, n, D)
        model, schedule, meta = load_denoiser(plan.run_dir, "cpu", ema=True)
        n = latent.shape[1]
        blocks = plan_blocks(n, s.block_size)
        bmeta = {"seed": s.seed, "sampler": sampler, **plan.digests, "dagger_round": round_i, "fit": key}
        for b, count in blocks:
            if block_is_complete(folder / block_name(b, count), {**bmeta, "block": b, "count": count}):
                continue
            sl = slice(b * s.block_size, b * s.block_size + count)
            tensors = label_states(model, schedule, latent[:, sl], tuple(meta["latent_shape"]), sampler)
            write_block(folder, b, tensors, bmeta)
        write_manifest(
            folder,
            n,
            blocks,
            {
                **bmeta,
                "block_size": s.block_size,
                "timesteps": plan.T,
                "latent_shape": meta["latent_shape"],
                "kind": meta["kind"],
                "schedule": meta["schedule"],
                "rows": f"the states of the equations' rollouts from {len(train)} training noises, labelled by the DiT",
            },
        )
        added = TrajectorySet.from_manifest(manifest, verify=False)
        how = f"{n} rollouts labelled ({len(train) - n} diverged, left out)"
    plan.queries.append(added)
    label_s = time.time() - t0
    fit_dir = plan.run_dir / "sindy" / "fits" / fit_key(cfg, plan, tset, coords)
    fit_dir.mkdir(parents=True, exist_ok=True)
    if coords.file_name:
        save_coordinates(coords, fit_dir / coords.file_name)
    own: dict = {}
    fits, lib = stage_fits(cfg, plan, tset, coords, split, fit_dir, own)
    times[f"dagger {round_i + 1}"] = (
        time.time() - t0,
        f"{how} in {label_s:.1f} s; refit: " + "; ".join(f"{k} {v[0]:.1f} s" for k, v in own.items()),
    )
    choice = {
        **choice,
        "dagger": [
            *choice.get("dagger", []),
            {"round": round_i + 1, "states_from": added.n, "terms": sum(r["n_terms"] for r in fits)},
        ],
    }
    print(
        f"sindy: DAgger round {round_i + 1}: {how}; {choice['dagger'][-1]['terms']} terms after the refit", flush=True
    )
    return fits, lib, choice
