"""Which coordinates the SINDy job fits in (sindy.coordinates): the latent's own (or its principal components for a
conv latent) and the dynamics' linear modes (analysis/sindy/coordinates.py). With ``auto`` stage 2 runs in both and the
sparser system at equal pooled held-out fit is kept, by the per-dimension rule applied to the whole system.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from analysis.job.fits import fit_key, stage_fits
from analysis.job.plan import Plan
from analysis.job.trajectories import TrajectorySet
from analysis.sindy.coordinates import Coordinates, linear_modes
from analysis.sindy.library import Library
from analysis.sindy.targets import regression_samples
from configs.cli import UserError
from configs.io import atomic_save_safetensors, atomic_write_text
from configs.schema import Config, to_dict

__all__ = [
    "make_coordinates",
    "fit_modes",
    "pooled_unexplained",
    "worst_unexplained",
    "choose_coordinates",
    "fit_in_coordinates",
    "save_coordinates",
]


def save_coordinates(coords: Coordinates, path: Path) -> None:
    """C and m of the fit coordinates as safetensors (atomically), beside the fits or the report."""
    tensors, metadata = coords.tensors()
    atomic_save_safetensors(tensors, path, metadata=metadata)


def make_coordinates(cfg: Config, plan: Plan, tset: TrajectorySet, split: np.ndarray) -> tuple[list[Coordinates], str]:
    """The candidate coordinates of sindy.coordinates (the latent's own first) and, if the modes are missing, why."""
    train = np.flatnonzero(split >= 0)
    if plan.kind != "conv":
        base = Coordinates.identity(tset.dim)
    else:
        z0 = np.concatenate([blk.z[-1][np.isin(blk.index, train)] for blk in tset.blocks()])
        base = Coordinates.fit_pca(z0, cfg.sindy.pca_components)
    if cfg.sindy.coordinates == "latent":
        return [base], ""
    modes = fit_modes(plan, tset, split, base)
    if modes is None:
        why = (
            f"the linear modes need more than d + 1 = {base.dim + 1} training trajectories (the per-step affine "
            f"fit), these have {len(train)}"
        )
        if cfg.sindy.coordinates == "modes":
            raise UserError(
                f"sindy.coordinates=modes: {why}; raise sindy.n_trajectories or use sindy.coordinates=latent"
            )
        return [base], why
    return ([base, modes] if cfg.sindy.coordinates == "auto" else [modes]), ""


MODES_MAX_TRAJECTORIES = 4096  # per-step affine fits of d + 1 unknowns: a few thousand rows pin them down


def fit_modes(plan: Plan, tset: TrajectorySet, split: np.ndarray, base: Coordinates) -> Coordinates | None:
    """``base`` rotated to the dynamics' linear modes (analysis/sindy/coordinates.py), from the fit target of up to
    MODES_MAX_TRAJECTORIES training trajectories; None when there are too few."""
    train = np.flatnonzero(split >= 0)
    zs, ys, got = [], [], 0
    for blk in tset.blocks():
        keep = np.flatnonzero(np.isin(blk.index, train))[: MODES_MAX_TRAJECTORIES - got]
        if keep.size == 0:
            continue
        z = base.states(blk.z[:, keep])
        drift = None if blk.drift is None else base.velocities(blk.drift[:, keep])
        eps = None if blk.eps is None else base.velocities(blk.eps[:, keep])
        zr, _, yr = regression_samples(z, blk.t, drift, plan.targets[:1], eps)
        zs.append(zr.reshape(-1, keep.size, base.dim))
        ys.append(yr.reshape(-1, keep.size, base.dim))
        got += keep.size
        if got >= MODES_MAX_TRAJECTORIES:
            break
    rot = linear_modes(np.concatenate(zs, axis=1), np.concatenate(ys, axis=1)) if zs else None
    return None if rot is None else base.then_modes(rot)


def pooled_unexplained(fits: list[dict]) -> float:
    """Held-out unexplained variance over all dimensions, sum RSS / sum TSS: unchanged by a rotation of the
    coordinates (the total sum of squares of centred vectors is), so the latent's and the modes' compare."""
    tss = sum(r["tss_heldout"] for r in fits)
    return float(sum(r["rss_heldout"] for r in fits) / tss) if tss > 0 else float("nan")


def worst_unexplained(fits: list[dict]) -> float:
    """The largest held-out unexplained variance 1 - R^2 of any one dimension."""
    return float(max(1.0 - r["r2_heldout"] for r in fits))


def choose_coordinates(cands: list[dict], tol: float) -> int:
    """The candidate with the fewest terms in all among those that are within (1 + tol) x the best (+ 1e-10 for
    round-off) on both the pooled held-out unexplained variance (the whole system: the per-dimension rule applied
    to it) and the worst dimension's (a reader judges each equation: a rotation that concentrates a nonlinearity in
    one coordinate can lower the pooled figure and still leave that equation worse); ties go to the first (the
    latent's own coordinates), and so does the choice when no candidate is within both."""
    ok = [
        i
        for i, c in enumerate(cands)
        if all(c[k] <= (1 + tol) * min(o[k] for o in cands) + 1e-10 for k in ("unexplained", "worst"))
    ]
    return min(ok, key=lambda i: (cands[i]["terms"], i)) if ok else 0


def fit_in_coordinates(
    cfg: Config, plan: Plan, tset: TrajectorySet, split: np.ndarray, times: dict
) -> tuple[Coordinates, list[dict], Library, dict]:
    """Stage 2 in each candidate coordinate system (sindy.coordinates) and the choice between them.

    Returns:
        (coords, fits, lib, choice): the chosen coordinates, their per-dimension fits and library, and the
        JSON-able record of the choice (every candidate's pooled held-out unexplained variance and terms).
    """
    cands, why = make_coordinates(cfg, plan, tset, split)
    runs = []
    for coords in cands:
        fit_dir = plan.run_dir / "sindy" / "fits" / fit_key(cfg, plan, tset, coords)
        fit_dir.mkdir(parents=True, exist_ok=True)
        if coords.file_name:
            save_coordinates(coords, fit_dir / coords.file_name)
        atomic_write_text(fit_dir / "config.json", json.dumps(to_dict(cfg.sindy), indent=1))
        own: dict = {}
        fits, lib = stage_fits(cfg, plan, tset, coords, split, fit_dir, own)
        for k, (sec, how) in own.items():  # one line per stage, every candidate's share named
            prev = times.get(k)
            times[k] = (
                sec + (prev[0] if prev else 0.0),
                (prev[1] + "; " if prev else "") + (f"{coords.kind}: " if len(cands) > 1 else "") + how,
            )
        runs.append(
            {
                "coords": coords,
                "fits": fits,
                "lib": lib,
                "kind": coords.kind,
                "unexplained": pooled_unexplained(fits),
                "worst": worst_unexplained(fits),
                "terms": sum(r["n_terms"] for r in fits),
            }
        )
    i = choose_coordinates(runs, cfg.sindy.threshold_tol) if len(runs) > 1 else 0
    choice = {
        "setting": cfg.sindy.coordinates,
        "chosen": runs[i]["kind"],
        "rule": (
            "the fewest terms in all among the coordinates whose pooled held-out unexplained variance "
            "(sum RSS / sum TSS over dimensions) and worst dimension's unexplained variance are both within "
            f"{1 + cfg.sindy.threshold_tol:g} x the best's; ties go to the latent's own"
        )
        if len(runs) > 1
        else f"sindy.coordinates={cfg.sindy.coordinates}",
        "candidates": [
            {
                "kind": r["kind"],
                "unexplained_heldout": r["unexplained"],
                "worst_unexplained_heldout": r["worst"],
                "terms": r["terms"],
                "r2_heldout_min": min(f["r2_heldout"] for f in r["fits"]),
                "r2_heldout_median": float(np.median([f["r2_heldout"] for f in r["fits"]])),
            }
            for r in runs
        ],
    }
    if why:
        choice["modes_skipped"] = why
    print(
        "sindy: coordinates "
        + ", ".join(
            f"{c['kind']}: {c['terms']} terms, held-out 1-R^2 "
            f"{c['unexplained_heldout']:.3g} pooled, {c['worst_unexplained_heldout']:.3g} "
            "worst"
            for c in choice["candidates"]
        )
        + f" -> {choice['chosen']}",
        flush=True,
    )
    return runs[i]["coords"], runs[i]["fits"], runs[i]["lib"], choice
