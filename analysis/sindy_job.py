"""Discover the sparse equations of a trained latent DiT's denoising dynamics (Ray driver).

    python analysis/sindy_job.py --config configs/X.yaml [key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- python analysis/sindy_job.py --config ...
    ray submit cluster/ray/local.yaml analysis/sindy_job.py --config ...

Method: SINDy (Brunton, Proctor & Kutz, PNAS 2016) on denoising trajectories, as in
the SINDy study (docs/REFERENCES.md), with held-out validation, the sampler's
drift as the default target and bagging (Fasel et al. 2022) for uncertainties.

Stages (each reused on rerun when its outputs exist, so a preempted job resumes):
    1. trajectories   Ray actors (one per GPU, else one per CPU) generate seeded blocks   sindy/trajectories/
    2. fits           statistics streamed once per block (tasks), then one task per dimension
                      sharing the Gram statistics through the object store                 sindy/fits/<key>/
    3. report         integration of the equations on held-out noise, plots, TensorBoard   report/, tb/sindy
Every input is checked before Ray starts; bad inputs are one line on stderr and exit code 2.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence


def _find_repo() -> Path:
    # `ray submit` copies this file alone to ~/sindy_job.py on the head; the code is then found via
    # LATENT_SINDY_REPO (set for the CI key in tests/analysis_job/setup_sshd.sh) and paths in the
    # command line are taken relative to it, as from the repository root.
    here = Path(__file__).resolve().parents[1]
    if (here / "configs" / "schema.py").is_file():
        return here
    env = os.environ.get("LATENT_SINDY_REPO", "")
    if env and (Path(env) / "configs" / "schema.py").is_file():
        os.chdir(env)
        return Path(env)
    sys.exit(f"{Path(__file__).name}: error: cannot find the latent-sindy repository next to {__file__}; "
             "set LATENT_SINDY_REPO=/path/to/repo")


REPO = _find_repo()

import numpy as np  # noqa: E402

from analysis import ray_utils  # noqa: E402
from analysis.job_plan import estimate_memory  # noqa: E402
from analysis.library import Library, build_library, principal_directions  # noqa: E402
from analysis.coordinates import Coordinates, linear_modes  # noqa: E402
from analysis.targets import time_windows  # noqa: E402
from analysis.trajectories import (T_CONVENTION, TrajectorySet, plan_blocks,  # noqa: E402
                                   trajectory_dir, write_manifest, block_is_complete, block_name, block_problems,
                                   read_trajectory_manifest)
from configs.cli import UserError, parse_cli, run_cli  # noqa: E402
from configs.io import file_sha256  # noqa: E402
from configs.schema import Config, to_dict  # noqa: E402

OTHER = {"drift": "central_diff", "central_diff": "drift", "eps": "drift"}
TARGET_NOTES = {"drift": "the sampler's deterministic mean step as dz/dt, free of injected noise",
                "central_diff": "(z[k+1] - z[k-1]) / (2 dt), one-sided at the ends (the reference method)",
                "eps": "the DiT's own output eps_theta(z, t); the drift is composed exactly as p(t) z + q(t) eps_fit "
                       "(sindy.fit_space=eps, analysis/theory.py)"}


# ----------------------------------------------------------------------------- checks (before any work)


def _sha_or_none(p: Path) -> str | None:
    return file_sha256(p) if p.is_file() else None


def check_inputs(cfg: Config) -> dict:
    """Everything the job needs, validated; raises UserError naming the bad value and the fix."""
    s, run_dir = cfg.sindy, cfg.run.dir
    plan: dict = {"run_dir": run_dir, "external": None, "warnings": []}
    dit_meta_file = run_dir / "dit.json"
    run_meta = json.loads(dit_meta_file.read_text()) if dit_meta_file.is_file() else None
    if s.trajectories:
        path = Path(s.trajectories)
        if path.suffix == ".npz":
            tset = TrajectorySet.from_npz(path, s.trajectories_order)  # a missing file: "file not found"
            if s.target == "drift" and not tset.has_drift:
                raise UserError(f"sindy.trajectories={path} holds states only (no 'velocities' array): set "
                                "sindy.target=central_diff or add 'velocities' (n, T+1, d) to the file")
            if run_meta is not None and int(np.prod(run_meta["latent_shape"])) != tset.dim:
                raise UserError(f"sindy.trajectories={path} has latent dimension {tset.dim} but the model in "
                                f"{run_dir} has latent {run_meta['latent_shape']}: these trajectories come from "
                                "another model; use another run.name or drop sindy.trajectories")
            plan["warnings"].append(f"external trajectories {path} (sha256 {tset.manifest['sha256'][:12]}): no "
                                    "checkpoint digest ties them to a model of this project")
        else:
            tset = TrajectorySet.from_manifest(path)
            ema_sha = _sha_or_none(run_dir / "dit_ema.safetensors")
            ae_sha = _sha_or_none(run_dir / "ae.safetensors")
            m = tset.manifest
            if ema_sha is None or ae_sha is None:
                raise UserError(f"cannot check sindy.trajectories={path} against {run_dir}: it has no "
                                "dit_ema.safetensors / ae.safetensors; train that run first")
            if (m["dit_ema_sha256"], m["ae_sha256"]) != (ema_sha, ae_sha):
                raise UserError(f"sindy.trajectories={path} was generated by another model (dit_ema sha256 "
                                f"{m['dit_ema_sha256'][:12]}, ae {m['ae_sha256'][:12]}) than {run_dir} "
                                f"({ema_sha[:12]}, {ae_sha[:12]}); use that model's run or drop sindy.trajectories")
            if s.target == "drift" and not tset.has_drift:
                raise UserError(f"{path} has no drift; set sindy.target=central_diff")
            plan["meta"] = {"latent_shape": m["latent_shape"]}  # decode_end_states reshapes with it
        plan["external"] = tset
        plan["n"], plan["T"], plan["D"] = tset.n, tset.T, tset.dim
        plan["kind"] = run_meta["kind"] if (run_meta and tset.source == "generated") else "external"
    else:
        from models.artifacts import load_autoencoder, load_denoiser, load_latent_stats

        if not (run_dir / "dit_ema.safetensors").is_file():
            raise UserError(f"{run_dir} has no EMA checkpoint dit_ema.safetensors: run training/train_dit.py "
                            f"--config ... run.name={cfg.run.name} first (or point sindy.trajectories at a file)")
        _, schedule, meta = load_denoiser(run_dir, "cpu")
        _, ae_meta = load_autoencoder(run_dir, "cpu")
        mean, std = load_latent_stats(run_dir)
        ema_sha, ae_sha = file_sha256(run_dir / "dit_ema.safetensors"), file_sha256(run_dir / "ae.safetensors")
        if meta.get("ae_sha256") and meta["ae_sha256"] != ae_sha:
            raise UserError(f"{run_dir}/dit_ema.safetensors was trained on latents of another autoencoder than "
                            f"{run_dir}/ae.safetensors; retrain the DiT of this run")
        plan.update(n=s.n_trajectories, T=schedule.T, D=int(np.prod(meta["latent_shape"])), kind=meta["kind"],
                    meta=meta, digests={"dit_ema_sha256": ema_sha, "ae_sha256": ae_sha})
    if plan["kind"] == "conv":
        plan["d"] = s.pca_components
        if s.pca_components > plan["D"]:
            raise UserError(f"sindy.pca_components={s.pca_components} exceeds the latent size {plan['D']}")
    else:
        plan["d"] = plan["D"]
        if plan["D"] > 64:
            raise UserError(f"a {plan['D']}-D state is too large for the degree-3 library; reduce it first")
    n_ho = int(round(s.heldout_fraction * plan["n"]))
    if n_ho < 1 or plan["n"] - n_ho < 2:
        raise UserError(f"{plan['n']} trajectories with sindy.heldout_fraction={s.heldout_fraction} leave "
                        f"{n_ho} held-out and {plan['n'] - n_ho} training; raise sindy.n_trajectories")
    plan["n_heldout"] = n_ho
    plan["n_groups"] = min(s.bootstrap_groups, plan["n"] - n_ho)
    if s.fit_space == "eps" and not (plan["external"] is None or plan["external"].source == "generated"):
        raise UserError(f"sindy.fit_space=eps needs the DiT's recorded eps, which {s.trajectories} does not hold; "
                        "use sindy.fit_space=drift for external trajectories")
    main_target = "eps" if s.fit_space == "eps" else s.target
    plan["targets"] = (main_target, OTHER[main_target]) if (s.compare_targets and _has_drift(plan)) else (main_target,)
    plan["library_cfg"] = s.library
    if s.library.preset != "reference" and "mixture" in s.library.families:
        why = mixture_unavailable(cfg, plan)
        rest = [f for f in s.library.families if f != "mixture"]
        if why and not rest:
            raise UserError(f"sindy.library.families is [mixture] only, but {why}; list other families")
        if why:  # the default library lists it; inputs without a mixture get the rest, and are told so
            plan["library_cfg"] = dataclasses.replace(s.library, families=rest)
            plan["warnings"].append(f"the mixture family is left out of the library: {why}")
    try:  # the library as configured (placeholder projections and mixture: the real ones come from the data)
        plan["library_terms"] = placeholder_library(cfg, plan, plan["d"]).n_terms
    except ValueError as e:
        raise UserError(f"sindy.library: {e}") from None
    check_memory(cfg, plan)
    return plan


def mixture_unavailable(cfg: Config, plan: dict) -> str:
    """Why the mixture family cannot be built here ("" if it can): it needs the run's training latents, a sampler
    with a known linear part and coordinates the mixture can live in (the latent's own or a rotation of them)."""
    from analysis.theory import SAMPLERS_WITH_THEORY

    s = cfg.sindy
    sampler = plan["external"].manifest.get("sampler") if plan["external"] is not None else s.sampler
    if plan["external"] is not None and plan["external"].source != "generated":
        return f"{s.trajectories} is an external file (no schedule, no training latents)"
    if sampler not in SAMPLERS_WITH_THEORY:
        return f"sampler {sampler} has no closed-form linear part (needed: {', '.join(SAMPLERS_WITH_THEORY)})"
    if plan["kind"] == "conv":
        return "a conv latent is fitted in principal components, which a mixture of the latents does not map to"
    if not s.mixture_components:
        return "sindy.mixture_components is empty"
    if not (plan["run_dir"] / "latents" / "train.safetensors").is_file():
        return f"{plan['run_dir'] / 'latents' / 'train.safetensors'} not found (run training/encode_latents.py)"
    return ""


def placeholder_library(cfg: Config, plan: dict, d: int) -> Library:
    """The configured library's shape before the data: identity projections and, for the mixture family, a mixture
    of the largest K on the grid (the real one is fitted in make_library)."""
    from analysis.mixture import GaussianMixtureEps, MixtureEps

    lib_cfg, mixture = plan["library_cfg"], None
    if lib_cfg.preset != "reference" and "mixture" in lib_cfg.families:
        k = max(cfg.sindy.mixture_components)
        mix = GaussianMixtureEps(np.full(k, 1.0 / k), np.zeros((k, d)), np.stack([np.eye(d)] * k))
        mixture = MixtureEps.from_mixture(mix, np.full(2, 0.5), tuple(lib_cfg.mixture_features))
    return build_library(lib_cfg, d, (0.0, 1.0), np.eye(d), mixture)


def _has_drift(plan: dict) -> bool:
    return plan["external"] is None or plan["external"].has_drift


def check_memory(cfg: Config, plan: dict) -> None:
    """The Gram path holds G + 2 statistics (twice: driver and object store) plus a Theta chunk per task."""
    s, d = cfg.sindy, plan["d"]
    lib = placeholder_library(cfg, plan, d)
    est = estimate_memory(plan["n"] * plan["T"], d, lib, n_targets=d * len(plan["targets"]), chunk_size=s.chunk_size)
    need = 2 * (plan["n_groups"] + 2 + s.time_windows) * est.gram_bytes + 3 * est.chunk_bytes
    if s.max_memory_gb > 0:
        have, where = s.max_memory_gb * 2**30, f"sindy.max_memory_gb={s.max_memory_gb}"
    else:
        import psutil

        have, where = psutil.virtual_memory().available, "available memory"
    if need > have:
        raise UserError(f"the fit needs {need / 2**30:.2f} GiB ({est.n_terms} library terms, "
                        f"{plan['n']} trajectories x {plan['T']} steps, {plan['n_groups']} bootstrap groups, chunks of "
                        f"{s.chunk_size} rows) but {where} is {have / 2**30:.2f} GiB; lower sindy.bootstrap_groups, "
                        "sindy.chunk_size or the state dimension, or raise the budget")
    plan["memory_gib"] = need / 2**30


# ----------------------------------------------------------------------------- stages


def stage_trajectories(cfg: Config, plan: dict) -> tuple[TrajectorySet, str]:
    """Stage 1: generate (or reuse) the trajectories; returns the set and what happened."""
    import ray

    if plan["external"] is not None:
        return plan["external"], f"external file {cfg.sindy.trajectories}"
    s, meta = cfg.sindy, plan["meta"]
    folder = trajectory_dir(plan["run_dir"], s.sampler, s.seed, s.block_size, plan["digests"]["dit_ema_sha256"])
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
            if not bad and tset.n == s.n_trajectories:
                return tset, "reused"
        manifest_path.unlink()
        for f, why in bad:
            print(f"sindy: warning: trajectory block {f} {why}; regenerating it", file=sys.stderr, flush=True)
            f.unlink(missing_ok=True)
        regenerated = f" ({len(bad)} failed their check on reuse)" if bad else ""
    blocks = plan_blocks(s.n_trajectories, s.block_size)
    bmeta = {"seed": s.seed, "sampler": s.sampler, **plan["digests"]}
    todo = [(b, c) for b, c in blocks if not block_is_complete(folder / block_name(b, c), {**bmeta, "block": b, "count": c})]
    if todo:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if s.device != "cpu" else 0
        if s.device == "cuda" and gpus == 0:
            raise UserError("sindy.device=cuda but the Ray cluster has no GPU; use sindy.device=auto or cpu")
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_workers = min(s.workers or (gpus or cpus), len(todo))
        Actor = ray_utils.trajectory_actor_class(1 if gpus else 0)
        threads = max(1, cpus // n_workers)
        actors = [Actor.remote(str(plan["run_dir"].resolve()), "cuda" if gpus else "cpu", threads)
                  for _ in range(n_workers)]
        refs = [actors[i % n_workers].generate.remote(str(folder.resolve()), b, c, s.sampler, s.seed, bmeta)
                for i, (b, c) in enumerate(todo)]
        ray_utils.wait_all(refs, f"trajectories ({n_workers} {'GPU' if gpus else 'CPU'} workers)")
        for a in actors:
            ray.kill(a)
    write_manifest(folder, s.n_trajectories, blocks, {
        **bmeta, "block_size": s.block_size, "timesteps": plan["T"], "latent_shape": meta["latent_shape"],
        "kind": meta["kind"], "schedule": meta["schedule"]})
    return (TrajectorySet.from_manifest(manifest_path, verify=False),
            f"generated {len(todo)} of {len(blocks)} blocks{regenerated}")


def split_trajectories(n: int, n_heldout: int, n_groups: int, seed: int) -> np.ndarray:
    """(n,) -1 for held-out trajectories, else the training group; a seeded permutation, worker-independent."""
    perm = np.random.default_rng(seed).permutation(n)
    split = np.empty(n, dtype=np.int64)
    split[perm[:n_heldout]] = -1
    split[perm[n_heldout:]] = np.arange(n - n_heldout) % n_groups
    return split


def make_coordinates(cfg: Config, plan: dict, tset: TrajectorySet, split: np.ndarray) -> tuple[list[Coordinates], str]:
    """The candidate coordinates of sindy.coordinates (the latent's own first) and, if the modes are missing, why."""
    train = np.flatnonzero(split >= 0)
    if plan["kind"] != "conv":
        base = Coordinates.identity(tset.dim)
    else:
        z0 = np.concatenate([blk.z[-1][np.isin(blk.index, train)] for blk in tset.blocks()])
        base = Coordinates.fit_pca(z0, cfg.sindy.pca_components)
    if cfg.sindy.coordinates == "latent":
        return [base], ""
    modes = fit_modes(plan, tset, split, base)
    if modes is None:
        why = (f"the linear modes need more than d + 1 = {base.dim + 1} training trajectories (the per-step affine "
               f"fit), these have {len(train)}")
        if cfg.sindy.coordinates == "modes":
            raise UserError(f"sindy.coordinates=modes: {why}; raise sindy.n_trajectories or use sindy.coordinates=latent")
        return [base], why
    return ([base, modes] if cfg.sindy.coordinates == "auto" else [modes]), ""


MODES_MAX_TRAJECTORIES = 4096  # per-step affine fits of d + 1 unknowns: a few thousand rows pin them down


def fit_modes(plan: dict, tset: TrajectorySet, split: np.ndarray, base: Coordinates) -> Coordinates | None:
    """``base`` rotated to the dynamics' linear modes (analysis/coordinates.py), from the fit target of up to
    MODES_MAX_TRAJECTORIES training trajectories; None when there are too few."""
    from analysis.targets import regression_samples

    train = np.flatnonzero(split >= 0)
    zs, ys, got = [], [], 0
    for blk in tset.blocks():
        keep = np.flatnonzero(np.isin(blk.index, train))[: MODES_MAX_TRAJECTORIES - got]
        if keep.size == 0:
            continue
        z = base.states(blk.z[:, keep])
        drift = None if blk.drift is None else base.velocities(blk.drift[:, keep])
        eps = None if blk.eps is None else base.velocities(blk.eps[:, keep])
        zr, _, yr = regression_samples(z, blk.t, drift, plan["targets"][:1], eps)
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


def choose_coordinates(cands: list[dict], tol: float) -> int:
    """The candidate with the fewest terms in all among those whose pooled held-out unexplained variance is within
    (1 + tol) x the best's (+ 1e-10 for round-off): the per-dimension rule, applied to the whole system; ties go to
    the first (the latent's own coordinates)."""
    best = min(c["unexplained"] for c in cands)
    ok = [i for i, c in enumerate(cands) if c["unexplained"] <= (1 + tol) * best + 1e-10]
    return min(ok, key=lambda i: (cands[i]["terms"], i))


def make_library(cfg: Config, plan: dict, tset: TrajectorySet, coords: Coordinates, split: np.ndarray) -> Library:
    """The configured library on this data: the spline basis spans the data's t range, tanh on principal
    projections uses the leading principal directions of the training trajectories' end states, and the mixture
    family the mixture fitted to the training latents in these coordinates (with the sampler's p, q)."""
    train = np.flatnonzero(split >= 0)
    end = np.concatenate([coords.states(blk.z[-1][np.isin(blk.index, train)]) for blk in tset.blocks()])
    t = tset.block(0).t
    lib_cfg = plan["library_cfg"]
    proj = principal_directions(end, lib_cfg.tanh_projections)
    mixture = None
    if lib_cfg.preset != "reference" and "mixture" in lib_cfg.families:
        from analysis.mixture import MixtureEps
        from analysis.theory import linear_part

        schedule = _run_schedule(plan)
        steps = np.arange(schedule.T - 1, -1, -1)  # network step of state k (analysis/theory.py's order)
        p, q = linear_part(schedule, tset.manifest.get("sampler") or cfg.sindy.sampler)
        feats = tuple("drift" if (f == "eps" and plan["targets"][0] != "eps") else f for f in lib_cfg.mixture_features)
        mixture = MixtureEps.from_mixture(latent_mixture(cfg, plan, coords)["mix"],
                                          schedule.alpha_bars.double().cpu().numpy()[steps], feats, p, q)
    return build_library(lib_cfg, coords.dim, (float(np.min(t)), float(np.max(t))), proj, mixture)


# Config family names -> the TermFamily kinds they build (analysis.library.build_library).
FAMILY_KINDS = {"polynomial": ("Polynomial",), "time": ("TimePolynomial", "TimeSpline"), "time_state": ("TimeProduct",),
                "exp": ("ExpNegTimeState", "ExpNegSquare"), "tanh": ("Tanh",), "terms": ("CustomTerms",),
                "mixture": ("MixtureEps",)}


def gated_columns(lib: Library, gated: list[str]) -> list[int]:
    """Column indices of the families in sindy.library.gated (none for the reference preset's families)."""
    kinds = {k for name in gated for k in FAMILY_KINDS[name]}
    return [i for fam, sl in lib.family_slices() if fam.kind in kinds for i in range(sl.start, sl.stop)]


def fit_key(cfg: Config, plan: dict, tset: TrajectorySet, coords: Coordinates) -> str:
    s = cfg.sindy
    ident = {"data": tset.manifest.get("sha256") or [b["sha256"] for b in tset.manifest["blocks"]],
             "n": tset.n, "split": [s.seed, s.heldout_fraction, plan["n_groups"]], "targets": plan["targets"],
             "coords": coords.kind, "pca": s.pca_components if coords.kind == "pca" else 0,
             "components": (hashlib.sha256(coords.components.tobytes() + coords.mean.tobytes()).hexdigest()
                            if coords.kind == "modes" else None), "record": 2,
             "fit": [s.alpha, s.normalize, s.n_thresholds, s.threshold_tol, s.n_bootstrap, s.term_budget, s.time_windows],
             "library": to_dict(plan["library_cfg"]),
             "optimizer": [s.optimizer, s.sr3_nu if s.optimizer == "sr3" else None],
             "free_time_degree": s.ceiling_degree}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def stage_fits(cfg: Config, plan: dict, tset: TrajectorySet, coords: Coordinates, split: np.ndarray,
               fit_dir: Path, times: dict) -> list[dict]:
    """Stage 2: stream the statistics once (one task per block), then one fit task per dimension."""
    import ray

    s, d = cfg.sindy, coords.dim
    files = [fit_dir / f"dim-{j:03d}.json" for j in range(d)]
    todo = [j for j in range(d) if not files[j].is_file()]
    lib_file = fit_dir / "library.json"
    if todo or not lib_file.is_file():
        lib_file.write_text(json.dumps(make_library(cfg, plan, tset, coords, split).spec()))
    lib = Library.from_spec(json.loads(lib_file.read_text()))
    edges = time_windows(tset.block(0).t, s.time_windows)
    if todo:
        t0 = time.time()
        gpus = 1 if (s.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0) else 0
        device = "cuda" if gpus else "cpu"
        task = ray_utils.accumulate_task(gpus)
        tref = ray.put(tset)
        refs = [task.remote(tref, i, coords, split, plan["targets"], lib.spec(), plan["n_groups"], device, s.chunk_size,
                            s.ceiling_degree, edges) for i in range(tset.n_blocks)]
        parts = ray_utils.wait_all(refs, "statistics (blocks)")
        if s.ceiling_degree > 0:
            write_free_time(parts, s.ceiling_degree, fit_dir / "free_time.json")
        groups = [ray_utils.merge_numpy_stats([p["groups"][g] for p in parts]) for g in range(plan["n_groups"])]
        heldout = ray_utils.merge_numpy_stats([p["heldout"] for p in parts])
        windows = [ray_utils.merge_numpy_stats([p["windows"][w] for p in parts]) for w in range(s.time_windows)]
        train = groups[0]
        for g in groups[1:]:
            train = train.merge(g)
        if not all(bool(x.gram.isfinite().all() and x.cross.isfinite().all()) for x in (train, heldout)):
            zmax = max(float(np.abs(coords.states(b.z)).max()) for b in tset.blocks())
            raise UserError(f"the library overflows on these trajectories (max |z| = {zmax:.3g}; exp(-t z) and cubes "
                            "need O(1) states): the DiT's sampler diverges, usually an undertrained model (with the cosine "
                            "T=50 schedule the first step amplifies eps errors ~31x); train the DiT longer")
        times["statistics"] = (time.time() - t0, f"{tset.n_blocks} block tasks, {lib.n_terms} terms, "
                                                 f"{int(train.n_samples)} training + {int(heldout.n_samples)} held-out rows")
        t0 = time.time()
        settings = {"optimizer": s.optimizer, "sr3_nu": s.sr3_nu, "alpha": s.alpha, "normalize": s.normalize, "n_thresholds": s.n_thresholds, "tol": s.threshold_tol,
                    "n_bootstrap": s.n_bootstrap, "seed": s.seed, "d": d, "compare": len(plan["targets"]) > 1,
                    "targets": list(plan["targets"]), "names": lib.get_feature_names("text"),
                    "term_budget": s.term_budget, "window_edges": edges,
                    "gated_columns": gated_columns(lib, s.library.gated), "gate": s.library.gate}
        train_ref, ho_ref, groups_ref = ray.put(train), ray.put(heldout), ray.put(groups)
        win_ref = ray.put(windows)
        fit = ray_utils.fit_task()
        refs = [fit.remote(j, train_ref, ho_ref, groups_ref, settings, str(files[j]), win_ref) for j in todo]
        ray_utils.wait_all(refs, f"fits ({len(todo)} dimensions)")
        times["fits"] = (time.time() - t0, f"{len(todo)} dimension tasks" + (f", {d - len(todo)} reused" if len(todo) < d else ""))
    else:
        times["statistics"] = (0.0, "skipped: all fits reused")
        times["fits"] = (0.0, f"reused {fit_dir}")
    fits = [json.loads(f.read_text()) for f in files]
    ceiling = fit_dir / "free_time.json"
    if s.ceiling_degree > 0 and ceiling.is_file():
        ref = json.loads(ceiling.read_text())
        for r in fits:
            r["free_time"] = ({"degree": ref["degree"], "skipped": ref["skipped"]} if "skipped" in ref else
                              {"degree": ref["degree"], "r2_train": ref["r2_train"][r["dim"]],
                               "r2_heldout": ref["r2_heldout"][r["dim"]]})
    return fits, lib


def write_free_time(parts: list[dict], degree: int, path: Path) -> None:
    """Merge the blocks' per-step statistics and write the free-time reference R^2 per dimension."""
    from analysis.gram import GramStats
    from analysis.metrics import free_time_r2

    def merged(split: str) -> list[GramStats]:
        blocks = [p["steps"][split] for p in parts if p["steps"][split] is not None]
        return [ray_utils.merge_numpy_stats([b[k] for b in blocks]) for k in range(len(blocks[0]))]

    train, heldout = merged("train"), merged("heldout")
    rows, unknowns = min(int(s.n_samples) for s in train), train[0].n_terms
    if rows <= unknowns:  # an underdetermined fit per step would print a meaningless "reference"
        path.write_text(json.dumps({"degree": degree, "skipped": (
            f"The free-time reference (a separate degree-{degree} polynomial in z per sampler step) needs more training "
            f"rows per step than its {unknowns} unknowns, but these data have {rows} training trajectories per step; "
            "it is not computed. Lower sindy.ceiling_degree or use more trajectories.")}))
        return
    r2_tr, r2_ho = free_time_r2(train, heldout)
    path.write_text(json.dumps({"degree": degree, "r2_train": r2_tr.tolist(), "r2_heldout": r2_ho.tolist(),
                                "rows_per_step": rows, "unknowns": unknowns}))


def stage_report(cfg: Config, plan: dict, tset: TrajectorySet, coords: Coordinates, split: np.ndarray,
                 fits: list[dict], lib: Library, times: dict, ray_how: str, choice: dict) -> Path:
    """Stage 3: integrate the equations from held-out noise, decode, write everything."""
    from analysis import report

    report_t0 = time.time()
    s, d = cfg.sindy, coords.dim
    xi = np.zeros((d, lib.n_terms))
    for r in fits:
        for term in r["terms"]:
            xi[r["dim"], term["index"]] = term["coef"]
    heldout = np.flatnonzero(split < 0)[: max(1, s.rollouts)]
    blk = tset.select(heldout)
    ref = coords.states(blk.z)  # (T+1, r, d)
    rhs = report.sindy_rhs(lib, xi)
    views = theory_views(cfg, plan, tset, coords, split, lib, xi)  # issue 10 items 2-4, see below
    views["coordinate_choice"] = choice
    if s.fit_space == "eps":  # the library models eps; the drift adds the sampler's exact linear part
        rhs = views["linear_part"].composed_rhs(rhs)
    views["validation"] = validate_equations(cfg, plan, tset, coords, split, rhs, views)
    sim, diverged = report.integrate(rhs, ref[0], blk.t, s.integrator)
    with np.errstate(invalid="ignore"):
        rmse_step = np.sqrt(np.nanmean((sim - ref) ** 2, axis=(1, 2)))
    roll = {"t": blk.t, "index": heldout, "reference": ref, "sindy": sim, "rmse_per_step": rmse_step, "diverged": diverged}
    images = decode_end_states(plan, coords, ref[-1], sim[-1]) if tset.source == "generated" else None
    ctx = {"run": cfg.run.name, "n": tset.n, "n_train": int((split >= 0).sum()), "n_heldout": int((split < 0).sum()),
           "seed": s.seed, "sampler": tset.manifest.get("sampler"), "T": tset.T, "target": plan["targets"][0],
           "target_note": ("the file's 'velocities' array (dz/dt given with the states)" if tset.source == "npz"
                           and plan["targets"][0] == "drift" else TARGET_NOTES[plan["targets"][0]]),
           "t_convention": tset.manifest.get("t_convention", T_CONVENTION), "coordinates": coords.describe(),
           "optimizer": s.optimizer, "sr3_nu": s.sr3_nu, "term_budget": s.term_budget, "report_t0": report_t0,
           "alpha": s.alpha, "normalize": s.normalize, "n_thresholds": s.n_thresholds, "n_groups": plan["n_groups"],
           "n_bootstrap": s.n_bootstrap, "poor_r2": s.poor_r2, "integrator": s.integrator, "stage_times": times,
           "source": tset.source, "warnings": plan["warnings"],
           "digests": plan.get("digests") or {"external_sha256": tset.manifest.get("sha256")},
           "provenance": provenance(plan, tset, ray_how)}
    return report.write_report(plan["run_dir"] / "report", plan["run_dir"] / "tb" / "sindy", fits, lib, ctx, roll, images,
                               views=views)


def fit_in_coordinates(cfg: Config, plan: dict, tset: TrajectorySet, split: np.ndarray, times: dict) -> tuple:
    """Stage 2 in each candidate coordinate system (sindy.coordinates) and the choice between them.

    Returns:
        (coords, fits, lib, choice): the chosen coordinates, their per-dimension fits and library, and the
        JSON-able record of the choice (every candidate's pooled held-out unexplained variance and terms).
    """
    cands, why = make_coordinates(cfg, plan, tset, split)
    runs = []
    for coords in cands:
        fit_dir = plan["run_dir"] / "sindy" / "fits" / fit_key(cfg, plan, tset, coords)
        fit_dir.mkdir(parents=True, exist_ok=True)
        if coords.file_name:
            coords.save(fit_dir / coords.file_name)
        (fit_dir / "config.json").write_text(json.dumps(to_dict(cfg.sindy), indent=1))
        own: dict = {}
        fits, lib = stage_fits(cfg, plan, tset, coords, split, fit_dir, own)
        for k, (sec, how) in own.items():  # one line per stage, every candidate's share named
            prev = times.get(k)
            times[k] = (sec + (prev[0] if prev else 0.0), (prev[1] + "; " if prev else "")
                        + (f"{coords.kind}: " if len(cands) > 1 else "") + how)
        runs.append({"coords": coords, "fits": fits, "lib": lib, "kind": coords.kind,
                     "unexplained": pooled_unexplained(fits), "terms": sum(r["n_terms"] for r in fits)})
    i = choose_coordinates(runs, cfg.sindy.threshold_tol) if len(runs) > 1 else 0
    choice = {"setting": cfg.sindy.coordinates, "chosen": runs[i]["kind"],
              "rule": ("the fewest terms in all among the coordinates whose pooled held-out unexplained variance "
                       f"(sum RSS / sum TSS over dimensions) is within {1 + cfg.sindy.threshold_tol:g} x the best's; "
                       "ties go to the latent's own") if len(runs) > 1 else f"sindy.coordinates={cfg.sindy.coordinates}",
              "candidates": [{"kind": r["kind"], "unexplained_heldout": r["unexplained"], "terms": r["terms"],
                              "r2_heldout_min": min(f["r2_heldout"] for f in r["fits"]),
                              "r2_heldout_median": float(np.median([f["r2_heldout"] for f in r["fits"]]))}
                             for r in runs]}
    if why:
        choice["modes_skipped"] = why
    print("sindy: coordinates " + ", ".join(f"{c['kind']}: {c['terms']} terms, pooled held-out 1-R^2 "
                                            f"{c['unexplained_heldout']:.3g}" for c in choice["candidates"])
          + f" -> {choice['chosen']}", flush=True)
    return runs[i]["coords"], runs[i]["fits"], runs[i]["lib"], choice


def provenance(plan: dict, tset: TrajectorySet, ray_how: str) -> str:
    m = tset.manifest
    if tset.source == "npz":
        return f"{m['path']} (sha256 {m['sha256'][:16]}, arrays {m['extra_arrays']}); Ray: {ray_how}"
    return (f"dit_ema sha256 {m['dit_ema_sha256'][:16]}, ae sha256 {m['ae_sha256'][:16]}, "
            f"schedule {m.get('schedule')}, blocks of {m['block_size']}; Ray: {ray_how}")


def decode_end_states(plan: dict, coords: Coordinates, dit_end: np.ndarray, sindy_end: np.ndarray) -> dict:
    """Images (r, 28, 28) of the DiT's end states and of the rollouts' own end states."""
    dec = make_decoder(plan, coords)
    a, b = dec(dit_end), dec(sindy_end)
    return {"dit": a, "sindy": b, "pixel_diff": float(np.mean(np.abs(a - b)))}


# ----------------------------------------------------------------------------- issue 10 items 2-4: theory, mixture, validation
# The sampler's known linear part (analysis/theory.py), the Gaussian-mixture view of the denoiser
# (analysis/mixture.py) and the validation by what the equations generate (analysis/validation.py);
# this is only their glue to the run folder (weights, latents, classifier).


def make_decoder(plan: dict, coords: Coordinates):
    """c (r, d) fit coordinates -> (r, 28, 28) images in [0, 1] through the run's autoencoder; grey for non-finite rows."""
    import torch

    from models.artifacts import load_autoencoder, load_latent_stats

    ae, _ = load_autoencoder(plan["run_dir"], "cpu")
    mean, std = load_latent_stats(plan["run_dir"])
    shape = tuple(plan["meta"]["latent_shape"]) if "meta" in plan else tuple(json.loads(
        (plan["run_dir"] / "dit.json").read_text())["latent_shape"])

    def dec(c: np.ndarray) -> np.ndarray:
        ok = np.all(np.isfinite(c), axis=1)
        z = torch.from_numpy(np.nan_to_num(coords.inverse(c))).float().reshape(-1, *shape)
        with torch.no_grad():
            img = torch.sigmoid(ae.decode(z * std + mean)).numpy()[:, 0]
        img[~ok] = 0.5  # a diverged rollout has no image: grey
        return img

    return dec


def _run_schedule(plan: dict):
    from models.diffusion import schedule_for

    meta = json.loads((plan["run_dir"] / "dit.json").read_text())
    return schedule_for(meta["kind"], meta["schedule_kind"], meta["timesteps"])


def _heldout_block(plan: dict, tset: TrajectorySet, coords: Coordinates, split: np.ndarray, n: int) -> dict:
    """The first n held-out trajectories in fit coordinates: z (T+1, n, d), eps and drift (T, n, d) or None.

    Read once per job (``plan["heldout_cache"]``) and sliced: trajectory axis 1 in every array.
    """
    idx = np.flatnonzero(split < 0)[:n]
    cache = plan.get("heldout_cache")
    if cache is None or len(cache["index"]) < len(idx):
        blk = tset.select(idx)
        cache = plan["heldout_cache"] = {
            "index": idx, "t": blk.t, "z": coords.states(blk.z),
            "eps": None if blk.eps is None else coords.velocities(blk.eps),
            "drift": None if blk.drift is None else coords.velocities(blk.drift)}
    m = len(idx)
    return {"index": cache["index"][:m], "t": cache["t"],
            **{k: None if cache[k] is None else cache[k][:, :m] for k in ("z", "eps", "drift")}}


def theory_views(cfg: Config, plan: dict, tset: TrajectorySet, coords: Coordinates, split: np.ndarray,
                 lib: Library, xi: np.ndarray) -> dict:
    """Held-out R^2 of the chosen model in eps and drift space, and the Gaussian-mixture view.

    Returns:
        {"linear_part": LinearPart or None, "fit_space": dict (JSON-able) or {"skipped": reason},
        "mixture": dict or {"skipped": reason}, "_mixture": (GaussianMixtureEps, rhs) for the rollouts}.
    """
    from analysis.theory import SAMPLERS_WITH_THEORY, LinearPart, linear_part
    from analysis.validation import windowed_r2

    s = cfg.sindy
    views: dict = {"linear_part": None}
    sampler = tset.manifest.get("sampler")
    if tset.source != "generated" or sampler not in SAMPLERS_WITH_THEORY:
        reason = (f"these trajectories ({tset.source}, sampler {sampler}) carry no recorded eps and no known schedule"
                  if tset.source != "generated" else f"sampler {sampler} has no closed-form linear part")
        views["fit_space"] = views["mixture"] = {"skipped": reason}
        return views
    t0 = time.time()
    schedule = _run_schedule(plan)
    p, q = linear_part(schedule, sampler)
    offset = coords.components @ coords.mean if coords.kind != "latent" else None  # C z = c + C m
    lp = views["linear_part"] = LinearPart(p, q, offset)
    # R^2 on up to 2,000 held-out trajectories (100k rows at T = 50): enough for 4 digits, bounded cost.
    ho = _heldout_block(plan, tset, coords, split, min(int((split < 0).sum()), 2000))
    edges = time_windows(tset.block(0).t, s.time_windows)
    T, n, d = ho["eps"].shape
    zs, ts = ho["z"][:-1].reshape(-1, d), np.repeat(ho["t"][:-1], n)
    pred = np.concatenate([lib.transform(zs[i:i + 8192], ts[i:i + 8192]) @ xi.T for i in range(0, len(zs), 8192)])
    if s.fit_space == "eps":
        eps_pred, drift_pred = pred, lp.drift(zs, ts, pred)
    else:
        eps_pred, drift_pred = lp.eps(zs, ts, pred), pred
    shape = (T, n, d)
    views["fit_space"] = {
        "fit_space": s.fit_space, "sampler": sampler, "n_heldout": n, "theory": lp.describe(sampler),
        "p": p.tolist(), "q": q.tolist(),
        "eps": windowed_r2(ho["eps"], eps_pred.reshape(shape), ho["t"][:-1], edges),
        "drift": windowed_r2(ho["drift"], drift_pred.reshape(shape), ho["t"][:-1], edges),
        "seconds": round(time.time() - t0, 2)}
    if not s.mixture_components:
        views["mixture"] = {"skipped": "sindy.mixture_components is empty"}
    elif not (coords.kind == "latent" or coords.is_rotation):
        views["mixture"] = {"skipped": f"the mixture view works in the latent's own coordinates or a rotation of "
                                       f"them; this fit uses {coords.kind} coordinates of a "
                                       f"{coords.components.shape[1]}-D latent"}
    elif not (plan["run_dir"] / "latents" / "train.safetensors").is_file():
        views["mixture"] = {"skipped": f"{plan['run_dir'] / 'latents' / 'train.safetensors'} not found (the mixture is "
                                       "fitted to the training latents; run training/encode_latents.py for this run)"}
    else:
        views["mixture"], views["_mixture"] = mixture_view(cfg, plan, ho, lp, schedule, coords, edges)
    return views


def latent_mixture(cfg: Config, plan: dict, coords: Coordinates) -> dict:
    """The Gaussian mixtures of the run's training latents in ``coords`` (a rotation: the noising a x + s eps keeps
    its form, so the mixture of the rotated latents has the rotated closed-form eps*), K by held-out likelihood;
    fitted once per coordinates and kept in ``plan`` for the library and the mixture view.

    Returns:
        {"mix": the chosen GaussianMixtureEps, "rows": one per K, "mixtures": every K's, "n_train", "heldout"}.
    """
    from safetensors.torch import load_file

    from analysis.mixture import fit_mixture
    from models.artifacts import load_latent_data

    cache = plan.setdefault("_mixtures", {})
    key = hashlib.sha256(coords.components.tobytes() + coords.mean.tobytes()).hexdigest()
    if key in cache:
        return cache[key]
    s = cfg.sindy
    data = load_latent_data(plan["run_dir"], plan["kind"])
    train = data.train.reshape(data.train.shape[0], -1).double().numpy()
    rng = np.random.default_rng(s.seed)
    train = train[rng.permutation(len(train))[: s.mixture_samples]]
    test_file = plan["run_dir"] / "latents" / "test.safetensors"
    if test_file.is_file():
        test = ((load_file(str(test_file))["latents"] - data.mean) / data.std).reshape(-1, train.shape[1]).double().numpy()
        held_what = f"the encoded test split ({len(test)} latents)"
    else:  # keep a tenth of the training subset aside
        cut = len(train) // 10
        test, train = train[:cut], train[cut:]
        held_what = f"{cut} training latents kept out of EM"
    if coords.kind != "latent":
        train, test = coords.states(train), coords.states(test)
    t0 = time.time()
    mix, rows, mixtures = fit_mixture(train, test, s.mixture_components, seed=s.seed, max_iter=100)
    cache[key] = {"mix": mix, "rows": rows, "mixtures": mixtures, "n_train": len(train), "heldout": held_what,
                  "seconds": round(time.time() - t0, 2)}
    return cache[key]


def mixture_view(cfg: Config, plan: dict, ho: dict, lp, schedule, coords: Coordinates,
                 edges: list[float]) -> tuple[dict, tuple]:
    """Fit the mixtures (K by held-out likelihood) and score their closed-form eps* against the DiT, no fitting.

    In rotated coordinates u = C z the latents are rotated before EM: the noising a x + s eps keeps its form, so the
    mixture of the rotated latents has the rotated closed-form eps*."""
    from analysis.theory import noise_levels, state_index
    from analysis.validation import windowed_r2

    t0 = time.time()
    fitted = latent_mixture(cfg, plan, coords)
    mix, rows, mixtures = fitted["mix"], [dict(r) for r in fitted["rows"]], fitted["mixtures"]
    T, n, d = ho["eps"].shape
    a, sg = noise_levels(schedule)
    zs, ts = ho["z"][:-1].reshape(-1, d), np.repeat(ho["t"][:-1], n)
    k_state = state_index(ts, T)
    for row, m in zip(rows, mixtures):  # every K's no-fit R^2, so a reader sees whether K matters
        eps_m = m.eps(zs, a[k_state], sg[k_state]).reshape(T, n, d)
        drift_m = lp.drift(zs, ts, eps_m.reshape(-1, d)).reshape(T, n, d)
        row["eps"] = windowed_r2(ho["eps"], eps_m, ho["t"][:-1], edges)
        row["drift"] = windowed_r2(ho["drift"], drift_m, ho["t"][:-1], edges)
    best = next(r for r in rows if r["chosen"])

    def rhs(z: np.ndarray, t: float) -> np.ndarray:
        k = int(state_index(t, T))
        return lp.drift(z, t, mix.eps(z, a[k], sg[k]))

    out = {"n_train": fitted["n_train"], "heldout": fitted["heldout"], "grid": rows,
           "k": mix.K, "eps": best["eps"], "drift": best["drift"], "weights": mix.weights.tolist(),
           "means": mix.means.tolist(), "seconds": round(time.time() - t0, 2)}
    return out, (mix, rhs)


def validate_equations(cfg: Config, plan: dict, tset: TrajectorySet, coords: Coordinates, split: np.ndarray,
                       rhs, views: dict) -> dict:
    """Integrate the equations (and the mixture's ODE) from held-out noise; decode, classify, compare with the DiT.

    Also decodes the mixture's component means into ``views["mixture"]["_mean_images"]`` for the report.
    """
    from analysis.validation import validate

    mixture = views.get("_mixture")
    s = cfg.sindy
    n_ho = int((split < 0).sum())
    n = min(s.validation_noises, n_ho)
    if n == 0:
        return {"skipped": "sindy.validation_noises=0"}
    ho = _heldout_block(plan, tset, coords, split, n)
    decode, why = None, ""
    if tset.source == "generated":
        decode = make_decoder(plan, coords)
    else:
        why = f"external trajectories ({tset.manifest.get('path')}): no decoder of theirs, so no images to classify"
    out = {"equations": validate(rhs, ho["z"], ho["t"], s.integrator, decode, cfg.dit.classifier, cfg.data.shards, why),
           "heldout_available": n_ho, "classifier": str(cfg.dit.classifier)}
    if mixture is not None and decode is not None:
        views["mixture"]["_mean_images"] = decode(mixture[0].means)
    if mixture is not None:
        out["mixture"] = validate(mixture[1], ho["z"], ho["t"], "euler", decode, cfg.dit.classifier,
                                  cfg.data.shards, why)
    return out


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    cfg: Config = parse_cli(argv, __doc__)
    times: dict = {}
    # 1. Check every input before starting anything.
    plan = check_inputs(cfg)
    print(f"sindy: {plan['n']} trajectories, {plan['d']}-D fit ({plan['kind']}), targets {plan['targets']}, "
          f"~{plan['memory_gib']:.2f} GiB for the statistics", flush=True)
    # 2. Ray: join the cluster the user named or start a private one (a lone copy of this script
    # outside the repository is one `ray submit` put on a head: that head's cluster is named).
    ray_how = ray_utils.connect(cfg.sindy.ray_address, cfg.sindy.num_cpus,
                                submitted=REPO != Path(__file__).resolve().parents[1])
    print(f"sindy: Ray {ray_how}", flush=True)
    # 3. Stage 1: trajectories.
    t0 = time.time()
    tset, how = stage_trajectories(cfg, plan)
    times["trajectories"] = (time.time() - t0, how)
    # 4. Stage 2: split, coordinates, statistics and per-dimension fits.
    split = split_trajectories(tset.n, plan["n_heldout"], plan["n_groups"], cfg.sindy.seed)
    coords, fits, lib, choice = fit_in_coordinates(cfg, plan, tset, split, times)
    # 5. Stage 3: the report.
    t0 = time.time()
    path = stage_report(cfg, plan, tset, coords, split, fits, lib, times, ray_how, choice)
    if coords.file_name:
        coords.save(path.parent / coords.file_name)
    print(f"sindy: report stage {time.time() - t0:.1f} s; stage times "
          + ", ".join(f"{k} {v[0]:.1f} s" for k, v in times.items()), flush=True)
    flagged = json.loads((path.parent / "equations.json").read_text())["flagged_dims"]
    print(f"sindy: {len(flagged)} of {len(fits)} dimensions flagged as not generalising", flush=True)
    print(f"sindy: report {path.resolve()}")
    print(f"sindy: TensorBoard {(plan['run_dir'] / 'tb' / 'sindy').resolve()}")


if __name__ == "__main__":
    run_cli(main)
