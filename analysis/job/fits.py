"""Stage 2 of the SINDy job in one coordinate system: the library on this data, the Gram statistics streamed once
by Ray tasks (one per trajectory block) and one fit task per dimension, resumable from ``sindy/fits/<key>/``."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from analysis.job import ray_utils
from analysis.job.plan import Plan
from analysis.job.trajectories import TrajectorySet
from analysis.job.views import distilled_mixture, latent_mixture, run_schedule
from analysis.sindy.block_stats import merge_numpy_stats
from analysis.sindy.build import build_library, principal_directions
from analysis.sindy.coordinates import Coordinates
from analysis.sindy.dimension_fit import FitSettings
from analysis.sindy.gram import GramStats
from analysis.sindy.library import Library
from analysis.sindy.metrics import free_time_r2
from analysis.sindy.mixture import MixtureEps
from analysis.sindy.registry import LIBRARY_FAMILIES
from analysis.sindy.targets import time_windows
from analysis.sindy.theory import linear_part, per_state
from configs.cli import UserError
from configs.io import atomic_write_text
from configs.schema import Config, to_dict

__all__ = ["coefficient_matrix", "make_library", "gated_columns", "fit_key", "stage_fits", "write_free_time"]


def make_library(cfg: Config, plan: Plan, tset: TrajectorySet, coords: Coordinates, split: np.ndarray) -> Library:
    """The configured library on this data: the spline basis spans the data's t range, tanh on principal
    projections uses the leading principal directions of the training trajectories' end states, and the mixture
    family the mixture fitted to the training latents in these coordinates (with the sampler's p, q)."""
    train = np.flatnonzero(split >= 0)
    end = np.concatenate([coords.states(blk.z[-1][np.isin(blk.index, train)]) for blk in tset.blocks()])
    t = tset.block(0).t
    lib_cfg = plan.library_cfg
    proj = principal_directions(end, lib_cfg.tanh_projections)
    mixture = None
    if lib_cfg.preset != "reference" and "mixture" in lib_cfg.families:
        schedule = run_schedule(plan)
        p, q = linear_part(schedule, tset.manifest.get("sampler") or cfg.sindy.sampler)
        feats = tuple("drift" if (f == "eps" and plan.targets[0] != "eps") else f for f in lib_cfg.mixture_features)
        mix = (
            distilled_mixture(cfg, plan, tset, coords, split)
            if cfg.sindy.mixture_fit == "dit"
            else latent_mixture(cfg, plan, coords)
        )["mix"]
        mixture = MixtureEps.from_mixture(mix, per_state(schedule, schedule.alpha_bars), feats, p, q)
    return build_library(lib_cfg, coords.dim, (float(np.min(t)), float(np.max(t))), proj, mixture)


def coefficient_matrix(fits: list[dict], d: int, n_terms: int) -> np.ndarray:
    """(d, n_terms) coefficients of the per-dimension fits (zeros off their supports)."""
    xi = np.zeros((d, n_terms))
    for r in fits:
        for term in r["terms"]:
            xi[r["dim"], term["index"]] = term["coef"]
    return xi


def gated_columns(lib: Library, gated: list[str]) -> list[int]:
    """Column indices of the families in sindy.library.gated (none for the reference preset's families)."""
    kinds = {k for name in gated for k in LIBRARY_FAMILIES[name]}
    return [i for fam, sl in lib.family_slices() if fam.kind in kinds for i in range(sl.start, sl.stop)]


def fit_key(cfg: Config, plan: Plan, tset: TrajectorySet, coords: Coordinates) -> str:
    s = cfg.sindy
    ident = {
        "data": tset.manifest.get("sha256") or [b["sha256"] for b in tset.manifest["blocks"]],
        "n": tset.n,
        "split": [s.seed, s.heldout_fraction, plan.n_groups],
        "targets": plan.targets,
        "coords": coords.kind,
        "pca": s.pca_components if coords.kind == "pca" else 0,
        "components": coords.fingerprint() if coords.kind == "modes" else None,
        "record": 2,
        "weighting": [s.weighting, plan.step_weights],
        "queries": [[b["sha256"] for b in q.manifest["blocks"]] for q in plan.queries] or None,
        "fit": [s.alpha, s.normalize, s.n_thresholds, s.threshold_tol, s.n_bootstrap, s.term_budget, s.time_windows],
        "library": to_dict(plan.library_cfg),
        "mixture_fit": [s.mixture_fit, s.mixture_distill_iterations] if s.mixture_fit == "dit" else None,
        "optimizer": [s.optimizer, s.sr3_nu if s.optimizer == "sr3" else None],
        "free_time_degree": s.ceiling_degree,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def stage_fits(
    cfg: Config, plan: Plan, tset: TrajectorySet, coords: Coordinates, split: np.ndarray, fit_dir: Path, times: dict
) -> tuple[list[dict], Library]:
    """Stage 2 in one coordinate system: stream the statistics once (one task per block), then one fit task per
    dimension; fits already in ``fit_dir`` are reused. Returns the per-dimension results and the library."""
    # optional heavy dependency: ray, imported when the stage runs
    import ray

    s, d = cfg.sindy, coords.dim
    files = [fit_dir / f"dim-{j:03d}.json" for j in range(d)]
    todo = [j for j in range(d) if not files[j].is_file()]
    lib_file = fit_dir / "library.json"
    if todo or not lib_file.is_file():
        t0 = time.time()
        built = make_library(cfg, plan, tset, coords, split)
        atomic_write_text(lib_file, json.dumps(built.spec()))
        mix = [f for f in built.families if f.kind == "MixtureEps"]
        times["library"] = (
            time.time() - t0,
            f"{built.n_terms} terms"
            + (f", the mixture family's EM fit ({len(cfg.sindy.mixture_components)} K)" if mix else "")
            + (
                f", distilled to the DiT ({cfg.sindy.mixture_distill_iterations} Adam steps)"
                if mix and cfg.sindy.mixture_fit == "dit"
                else ""
            ),
        )
    else:
        times["library"] = (0.0, f"reused {lib_file}")
    lib = Library.from_spec(json.loads(lib_file.read_text()))
    edges = time_windows(tset.block(0).t, s.time_windows)
    if todo:
        t0 = time.time()
        gpus = 1 if (s.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0) else 0
        device = "cuda" if gpus else "cpu"
        task = ray_utils.accumulate_task(gpus)
        # The trajectories' blocks, then the query blocks (analysis/job/queries.py): training rows only, spread over
        # the bootstrap groups like trajectories.
        sets = [(ray.put(tset), split, tset.n_blocks)]
        for q in plan.queries:
            sets.append((ray.put(q), np.arange(q.n) % plan.n_groups, q.n_blocks))
        spec = lib.spec()
        refs = [
            task.remote(
                ref,
                i,
                coords,
                sp,
                plan.targets,
                spec,
                plan.n_groups,
                device,
                s.chunk_size,
                s.ceiling_degree,
                edges,
                plan.step_weights,
            )
            for ref, sp, nb in sets
            for i in range(nb)
        ]
        parts = ray_utils.wait_all(refs, "statistics (blocks)")
        if s.ceiling_degree > 0:
            write_free_time(parts, s.ceiling_degree, fit_dir / "free_time.json")
        groups = [merge_numpy_stats([p["groups"][g] for p in parts]) for g in range(plan.n_groups)]
        heldout = merge_numpy_stats([p["heldout"] for p in parts])
        windows = [merge_numpy_stats([p["windows"][w] for p in parts]) for w in range(s.time_windows)]
        train = groups[0]
        for g in groups[1:]:
            train = train.merge(g)
        if not all(bool(x.gram.isfinite().all() and x.cross.isfinite().all()) for x in (train, heldout)):
            _refuse_nonfinite_columns(lib, tset, coords)
            zmax = max(float(np.abs(coords.states(b.z)).max()) for b in tset.blocks())
            raise UserError(
                f"the library overflows on these trajectories (max |z| = {zmax:.3g}; exp(-t z) and cubes "
                "need O(1) states): the DiT's sampler diverges, usually an undertrained model (with the cosine "
                "T=50 schedule the first step amplifies eps errors ~31x); train the DiT longer"
            )
        times["statistics"] = (
            time.time() - t0,
            f"{len(refs)} block tasks, {lib.n_terms} terms, "
            f"{int(train.n_samples)} training + {int(heldout.n_samples)} held-out rows",
        )
        t0 = time.time()
        settings = FitSettings(
            optimizer=s.optimizer,
            sr3_nu=s.sr3_nu,
            alpha=s.alpha,
            normalize=s.normalize,
            n_thresholds=s.n_thresholds,
            tol=s.threshold_tol,
            n_bootstrap=s.n_bootstrap,
            seed=s.seed,
            d=d,
            compare=len(plan.targets) > 1,
            targets=list(plan.targets),
            names=lib.get_feature_names("text"),
            term_budget=s.term_budget,
            window_edges=edges,
            gated_columns=gated_columns(lib, s.library.gated),
            gate=s.library.gate,
        )
        train_ref, ho_ref, groups_ref = ray.put(train), ray.put(heldout), ray.put(groups)
        win_ref = ray.put(windows)
        fit = ray_utils.fit_task()
        refs = [fit.remote(j, train_ref, ho_ref, groups_ref, settings, str(files[j]), win_ref) for j in todo]
        ray_utils.wait_all(refs, f"fits ({len(todo)} dimensions)")
        times["fits"] = (
            time.time() - t0,
            f"{len(todo)} dimension tasks" + (f", {d - len(todo)} reused" if len(todo) < d else ""),
        )
    else:
        times["statistics"] = (0.0, "skipped: all fits reused")
        times["fits"] = (0.0, f"reused {fit_dir}")
    fits = [json.loads(f.read_text()) for f in files]
    ceiling = fit_dir / "free_time.json"
    if s.ceiling_degree > 0 and ceiling.is_file():
        ref = json.loads(ceiling.read_text())
        for r in fits:
            r["free_time"] = (
                {"degree": ref["degree"], "skipped": ref["skipped"]}
                if "skipped" in ref
                else {
                    "degree": ref["degree"],
                    "r2_train": ref["r2_train"][r["dim"]],
                    "r2_heldout": ref["r2_heldout"][r["dim"]],
                }
            )
    return fits, lib


def _refuse_nonfinite_columns(lib: Library, tset: TrajectorySet, coords: Coordinates) -> None:
    """After the statistics came out non-finite: name the first library column that is NaN or Inf on the data
    (block, step, trajectory), e.g. a user term exp(1000*z0); returns when every column is finite (an overflow
    of the sums themselves, which the caller reports)."""
    names = lib.get_feature_names("text")
    for b in range(tset.n_blocks):
        blk = tset.block(b)
        z = coords.states(blk.z)  # (T+1, n, d)
        for k in range(z.shape[0]):
            theta = np.asarray(lib.transform(z[k], np.full(z.shape[1], blk.t[k])))  # (n, p)
            bad = ~np.isfinite(theta)
            if bad.any():
                row, col = (int(i) for i in np.argwhere(bad)[0])
                cols = np.flatnonzero(bad.any(axis=0))
                more = f" (and {cols.size - 1} more columns)" if cols.size > 1 else ""
                raise UserError(
                    f"library column {names[col]!r}{more} is not finite on the trajectories (block {b}, step {k}, "
                    f"trajectory {int(blk.index[row])}): a term overflows or divides by zero there; drop or rescale it "
                    "(sindy.library.terms, sindy.library.families)"
                )


def write_free_time(parts: list[dict], degree: int, path: Path) -> None:
    """Merge the blocks' per-step statistics and write the free-time reference R^2 per dimension."""

    def merged(split: str) -> list[GramStats]:
        blocks = [p["steps"][split] for p in parts if p["steps"][split] is not None]
        return [merge_numpy_stats([b[k] for b in blocks]) for k in range(len(blocks[0]))]

    train, heldout = merged("train"), merged("heldout")
    rows, unknowns = min(int(s.n_samples) for s in train), train[0].n_terms
    if rows <= unknowns:  # an underdetermined fit per step would print a meaningless "reference"
        atomic_write_text(
            path,
            json.dumps(
                {
                    "degree": degree,
                    "skipped": (
                        f"The free-time reference (a separate degree-{degree} polynomial in z per sampler step) needs more training "
                        f"rows per step than its {unknowns} unknowns, but these data have {rows} training trajectories per step; "
                        "it is not computed. Lower sindy.ceiling_degree or use more trajectories."
                    ),
                }
            ),
        )
        return
    r2_tr, r2_ho = free_time_r2(train, heldout)
    atomic_write_text(
        path,
        json.dumps(
            {
                "degree": degree,
                "r2_train": r2_tr.tolist(),
                "r2_heldout": r2_ho.tolist(),
                "rows_per_step": rows,
                "unknowns": unknowns,
            }
        ),
    )
