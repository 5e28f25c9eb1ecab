"""Stages 1 and 3 of the SINDy job: the trajectories (Ray actors generate seeded blocks, or reuse checked ones), the
split by trajectory, and the report (the chosen equations integrated from held-out noise, the views, every output).
Stage 2 is analysis/job/coordinate_choice.py and analysis/job/fits.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from analysis.job import ray_utils
from analysis.job.fits import coefficient_matrix
from analysis.job.plan import Plan
from analysis.job.queries import step_sensitivity
from analysis.job.report_folders import ReportFolders, point_report_at
from analysis.job.trajectories import (
    T_CONVENTION,
    TrajectorySet,
    block_is_complete,
    block_name,
    block_problems,
    plan_blocks,
    read_trajectory_manifest,
    trajectory_dir,
    write_manifest,
)
from analysis.job.views import decode_end_states, run_schedule, theory_views, validate_equations
from analysis.job.yardsticks import measure_yardsticks
from analysis.report.context import ReportContext
from analysis.report.write import write_report
from analysis.sindy.coordinates import Coordinates
from analysis.sindy.integration import integrate, sindy_rhs
from analysis.sindy.library import Library
from analysis.sindy.polish import polish_coefficients
from analysis.sindy.theory import LinearPart, linear_part, noise_levels
from configs.cli import UserError
from configs.io import atomic_write_text
from configs.schema import Config
from models.artifacts import load_denoiser

__all__ = [
    "stage_trajectories",
    "stage_queries",
    "stage_sensitivity",
    "x0_step_weights",
    "generate_set",
    "split_trajectories",
    "stage_report",
    "provenance",
]

TARGET_NOTES = {
    "drift": "the sampler's deterministic mean step as dz/dt, free of injected noise",
    "central_diff": "(z[k+1] - z[k-1]) / (2 dt), one-sided at the ends (the reference method)",
    "eps": "the DiT's own output eps_theta(z, t); the drift is composed exactly as p(t) z + q(t) eps_fit "
    "(sindy.fit_space=eps, analysis/sindy/theory.py)",
}


def stage_trajectories(cfg: Config, plan: Plan) -> tuple[TrajectorySet, str]:
    """Stage 1: generate (or reuse) the trajectories; returns the set and what happened."""
    # optional heavy dependency: ray, imported when the stage runs

    if plan.external is not None:
        return plan.external, f"external file {cfg.sindy.trajectories}"
    s = cfg.sindy
    folder = trajectory_dir(plan.run_dir, s.sampler, s.seed, s.block_size, plan.digests["dit_ema_sha256"])
    return generate_set(cfg, plan, folder, s.n_trajectories, s.seed, "generate", "trajectories")


def stage_queries(cfg: Config, plan: Plan) -> tuple[TrajectorySet | None, str]:
    """Stage 1b: sindy.queries forward-noised training latents per step, labelled by the DiT (analysis/job/queries.py);
    reused like the trajectories. Returns (None, why) when there are none."""
    s = cfg.sindy
    if not s.queries:
        return None, "none (sindy.queries=0)"
    folder = (
        plan.run_dir
        / "sindy"
        / "queries"
        / trajectory_dir(Path("."), s.sampler, s.seed, s.block_size, plan.digests["dit_ema_sha256"]).name
    )
    # Another seed than the trajectories' (their blocks must not share noise); the same for every rerun.
    return generate_set(cfg, plan, folder, s.queries, s.seed + QUERY_SEED_OFFSET, "forward", "forward queries")


QUERY_SEED_OFFSET = 1_000_003


def stage_polish(
    cfg: Config, plan: Plan, tset: TrajectorySet, coords: Coordinates, split: np.ndarray, fits: list[dict], lib: Library
) -> tuple[list[dict], dict]:
    """sindy.polish_iterations Levenberg-Marquardt steps on the chosen coefficients (analysis/sindy/polish.py) against
    sindy.polish_noises training trajectories; the support stays. Returns (fits with the polished coefficients,
    a JSON-able record). Cached in the fit folder by its settings, so a rerun does not polish again."""

    s = cfg.sindy
    d = coords.dim
    xi = coefficient_matrix(fits, d, lib.n_terms)
    key = hashlib.sha256(xi.tobytes() + coords.fingerprint().encode()).hexdigest()[:16]
    cache = plan.run_dir / "sindy" / "fits" / f"polish-{key}-i{s.polish_iterations}-n{s.polish_noises}.json"
    if cache.is_file():
        rec = json.loads(cache.read_text())
        new = np.asarray(rec.pop("xi"))
    else:
        sampler = tset.manifest.get("sampler") or s.sampler
        if plan.targets[0] == "eps":
            p, q = linear_part(run_schedule(plan), sampler)
            lp = LinearPart(p, q, coords.components @ coords.mean if coords.kind != "latent" else None)

            def rhs_of(x):
                return lp.composed_rhs(sindy_rhs(lib, x))

        else:

            def rhs_of(x):
                return sindy_rhs(lib, x)

        idx = np.flatnonzero(split >= 0)[: s.polish_noises]
        blk = tset.select(idx)
        new, rec = polish_coefficients(rhs_of, xi, coords.states(blk.z), blk.t, iterations=s.polish_iterations)
        rec["noises"] = len(idx)
        atomic_write_text(cache, json.dumps({**rec, "xi": new.tolist()}))
    out = []
    for r in fits:
        terms = [{**term, "coef": float(new[r["dim"], term["index"]])} for term in r["terms"]]
        out.append({**r, "terms": terms})
    return out, rec


def stage_sensitivity(cfg: Config, plan: Plan, tset: TrajectorySet) -> tuple[list[float], dict]:
    """Row weights per state for sindy.weighting=sensitivity: the DiT's measured step sensitivity g_k
    (analysis/job/queries.py), divided by q_k^2 when the target is the drift (a drift error is q_k times an eps error),
    scaled to mean 1. Returns (weights, a JSON-able record for the report)."""

    s = cfg.sindy
    model, schedule, meta = load_denoiser(plan.run_dir, "cpu", ema=True)
    z0 = tset.block(0).z[0]  # the first block's initial noises (enough: the gain is an average over them)
    n = min(s.sensitivity_noises, z0.shape[0])
    z_T = torch.from_numpy(np.ascontiguousarray(z0[:n], np.float32)).reshape(n, *meta["latent_shape"])
    sampler = tset.manifest.get("sampler") or s.sampler
    gain = step_sensitivity(model, schedule, sampler, z_T, s.seed)
    _, q = linear_part(run_schedule(plan), sampler)
    w = gain if plan.targets[0] == "eps" else gain / q**2
    w = w / w.mean()
    return w.tolist(), {"gain": gain.tolist(), "weights": w.tolist(), "noises": n, "target": plan.targets[0]}


def x0_step_weights(plan: Plan) -> list[float]:
    """Row weights per state for sindy.fit_space=x0: an eps error e at noise levels (a, s) is an error s e / a in the
    clean sample it implies, x0 = (z - s eps) / a, so least squares on x0 weighs each step's rows by (s/a)^2;
    scaled to mean 1 (a scale does not change the fit)."""
    a, sg = noise_levels(run_schedule(plan))
    w = (sg / a) ** 2
    return (w / w.mean()).tolist()


def generate_set(
    cfg: Config, plan: Plan, folder: Path, n: int, seed: int, method: str, what: str
) -> tuple[TrajectorySet, str]:
    """Generate (or reuse) ``n`` rows of seeded blocks in ``folder`` with the Ray actors' ``method`` ("generate":
    sampler trajectories, "forward": forward-noised queries), then write the manifest."""
    # optional heavy dependency, imported when this runs
    import ray

    s, meta = cfg.sindy, plan.meta
    manifest_path, regenerated = folder / "manifest.json", ""
    if manifest_path.is_file():
        # Reuse only blocks that still match their recorded sha256 and metadata; a bad one is deleted
        # (with the manifest first, so an interrupted rerun never finds a manifest over a missing block)
        # and generated again below like any missing block.
        try:
            bad = block_problems(manifest_path, read_trajectory_manifest(manifest_path))
        except UserError as e:  # a torn manifest: its blocks are checked by their metadata below
            print(f"sindy: warning: {e}; rewriting it", file=sys.stderr, flush=True)
            bad = []
        else:
            tset = TrajectorySet.from_manifest(manifest_path, verify=False)
            if not bad and tset.n == n:
                return tset, "reused"
        manifest_path.unlink()
        for f, why in bad:
            print(f"sindy: warning: {what} block {f} {why}; regenerating it", file=sys.stderr, flush=True)
            f.unlink(missing_ok=True)
        regenerated = f" ({len(bad)} failed their check on reuse)" if bad else ""
    blocks = plan_blocks(n, s.block_size)
    bmeta = {"seed": seed, "sampler": s.sampler, **plan.digests}
    todo = [
        (b, c) for b, c in blocks if not block_is_complete(folder / block_name(b, c), {**bmeta, "block": b, "count": c})
    ]
    if todo:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if s.device != "cpu" else 0
        if s.device == "cuda" and gpus == 0:
            raise UserError("sindy.device=cuda but the Ray cluster has no GPU; use sindy.device=auto or cpu")
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_workers = min(s.workers or (gpus or cpus), len(todo))
        Actor = ray_utils.trajectory_actor_class(1 if gpus else 0)
        threads = max(1, cpus // n_workers)
        actors = [
            Actor.remote(str(plan.run_dir.resolve()), "cuda" if gpus else "cpu", threads) for _ in range(n_workers)
        ]
        refs = [
            getattr(actors[i % n_workers], method).remote(str(folder.resolve()), b, c, s.sampler, seed, bmeta)
            for i, (b, c) in enumerate(todo)
        ]
        ray_utils.wait_all(refs, f"{what} ({n_workers} {'GPU' if gpus else 'CPU'} workers)")
        for a in actors:
            ray.kill(a)
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
            **({"rows": "forward-noised training latents labelled by the DiT"} if method == "forward" else {}),
        },
    )
    return (
        TrajectorySet.from_manifest(manifest_path, verify=False),
        f"generated {len(todo)} of {len(blocks)} blocks{regenerated}",
    )


def split_trajectories(n: int, n_heldout: int, n_groups: int, seed: int) -> np.ndarray:
    """(n,) -1 for held-out trajectories, else the training group; a seeded permutation, worker-independent."""
    perm = np.random.default_rng(seed).permutation(n)
    split = np.empty(n, dtype=np.int64)
    split[perm[:n_heldout]] = -1
    split[perm[n_heldout:]] = np.arange(n - n_heldout) % n_groups
    return split


def stage_report(
    cfg: Config,
    plan: Plan,
    tset: TrajectorySet,
    coords: Coordinates,
    split: np.ndarray,
    fits: list[dict],
    lib: Library,
    times: dict,
    ray_how: str,
    choice: dict,
    folders: ReportFolders,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Stage 3: integrate the equations from held-out noise, decode, write everything into the settings'
    own report folder (``extra`` writes more files into it before it is swapped in), then point
    ``runs/<name>/report`` at it (analysis/job/report_folders.py); returns its report.md."""
    report_t0 = time.time()
    s, d = cfg.sindy, coords.dim
    xi = coefficient_matrix(fits, d, lib.n_terms)
    heldout = np.flatnonzero(split < 0)[: max(1, s.rollouts)]
    blk = tset.select(heldout)
    ref = coords.states(blk.z)  # (T+1, r, d)
    rhs = sindy_rhs(lib, xi)
    views = theory_views(cfg, plan, tset, coords, split, lib, xi)
    views["coordinate_choice"] = choice
    if plan.sensitivity is not None:
        views["sensitivity"] = plan.sensitivity
    if plan.polish is not None:
        views["polish"] = plan.polish
    lp = views["linear_part"]
    models_eps = plan.targets[0] == "eps"  # fit_space eps or x0
    eq_eps = rhs if models_eps else (lambda z, t, f=rhs: lp.eps(z, t, f(z, t)))  # noqa: E731
    if models_eps:  # the library models eps; the drift adds the sampler's exact linear part
        rhs = lp.composed_rhs(rhs)
    views["validation"] = validate_equations(cfg, plan, tset, coords, split, rhs, views)
    if s.yardsticks and lp is not None:
        views["yardsticks"] = measure_yardsticks(
            cfg, plan, tset, coords, split, views, eq_eps, sum(len(r["terms"]) for r in fits)
        )
    sim, diverged = integrate(rhs, ref[0], blk.t, s.integrator)
    with np.errstate(invalid="ignore"):
        rmse_step = np.sqrt(np.nanmean((sim - ref) ** 2, axis=(1, 2)))
    roll = {
        "t": blk.t,
        "index": heldout,
        "reference": ref,
        "sindy": sim,
        "rmse_per_step": rmse_step,
        "diverged": diverged,
    }
    images = decode_end_states(plan, coords, ref[-1], sim[-1]) if tset.source == "generated" else None
    ctx = ReportContext(
        run=cfg.run.name,
        n=tset.n,
        n_train=int((split >= 0).sum()),
        n_heldout=int((split < 0).sum()),
        settings=s,
        sampler=tset.manifest.get("sampler"),
        T=tset.T,
        target=plan.targets[0],
        target_note=(
            "the file's 'velocities' array (dz/dt given with the states)"
            if tset.source == "npz" and plan.targets[0] == "drift"
            else TARGET_NOTES[plan.targets[0]]
        ),
        t_convention=tset.manifest.get("t_convention", T_CONVENTION),
        coordinates=coords.describe(),
        report_t0=report_t0,
        n_groups=plan.n_groups,
        stage_times=times,
        source=tset.source,
        warnings=plan.warnings,
        digests=plan.digests or {"external_sha256": tset.manifest.get("sha256")},
        provenance=provenance(plan, tset, ray_how),
        fingerprint=folders.settings,
    )
    md = write_report(folders.report, folders.tb, fits, lib, ctx, roll, images, views=views, extra=extra)
    point_report_at(folders)
    return md


def provenance(plan: Plan, tset: TrajectorySet, ray_how: str) -> str:
    """Where the trajectories come from and how Ray ran, in one line for the report."""
    m = tset.manifest
    if tset.source == "npz":
        return f"{m['path']} (sha256 {m['sha256'][:16]}, arrays {m['extra_arrays']}); Ray: {ray_how}"
    return (
        f"dit_ema sha256 {m['dit_ema_sha256'][:16]}, ae sha256 {m['ae_sha256'][:16]}, "
        f"schedule {m.get('schedule')}, blocks of {m['block_size']}; Ray: {ray_how}"
    )
