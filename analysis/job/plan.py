"""The SINDy job's plan: every input checked before any work, and the memory the Gram path will need.

``check_inputs(cfg)`` returns a ``Plan``: where the trajectories come from (a file, or the run's EMA DiT, checked
against the run's checkpoints), the sizes, the targets, the split, the library as configured (the mixture family
left out, with a warning, where no mixture can be fitted) and the memory estimate. Bad inputs raise
``configs.cli.UserError`` naming the value and the fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from analysis.job.trajectories import TrajectorySet
from analysis.sindy.build import build_library
from analysis.sindy.library import Library
from analysis.sindy.mixture import GaussianMixtureEps, MixtureEps
from analysis.sindy.theory import SAMPLERS_WITH_THEORY
from configs.cli import UserError
from configs.io import file_sha256
from configs.schema import Config
from models.artifacts import load_autoencoder, load_denoiser, load_latent_stats, read_dit_meta

__all__ = ["Plan", "check_inputs", "mixture_unavailable", "placeholder_library", "MemoryEstimate", "estimate_memory"]


@dataclasses.dataclass
class Plan:
    """What the checks found, for the stages (filled by ``check_inputs``; the job's one mutable record).

    Attributes:
        run_dir: runs/<name>.
        external: the TrajectorySet of sindy.trajectories, or None (the job generates them).
        n, T, D: trajectories, sampler steps, latent size.
        d: the fit's state dimension (D, or sindy.pca_components for a conv latent).
        kind: the latent kind ("vae", "conv", ...) or "external".
        meta: the DiT's metadata (at least latent_shape), None for an external .npz.
        digests: sha256 of dit_ema and ae when the job generates trajectories, else None.
        targets: the main target, then the compared one if any.
        n_heldout, n_groups: held-out trajectories and bootstrap groups of the training ones.
        library_terms: the configured library's size; memory_gib: the statistics' estimated memory.
        warnings: lines for the report.
        library_cfg: sindy.library, without the mixture family where none can be fitted.
        mixtures: the latent mixtures fitted so far, by coordinates (analysis.job.views.latent_mixture).
        heldout_cache: the held-out trajectories read so far in fit coordinates (analysis.job.views.heldout_block).
        queries: the TrajectorySets of DiT-labelled query states (analysis/job/queries.py: forward-noised latents,
            then one per DAgger round), training rows only.
        step_weights: (T,) regression row weight per state (sindy.weighting=sensitivity or sindy.fit_space=x0), or
            None.
        fit_space: the space the chosen equations were fitted in (sindy.fit_space, resolved when it is auto);
            space_choice: the record of sindy.fit_space=auto (analysis/job/space_choice.py), else None.
        peers: the checked sindy.peer_runs, {"dir": Path, "dit_ema_sha256": str} each (the yardsticks' peer rows).
    """

    run_dir: Path
    external: TrajectorySet | None = None
    n: int = 0
    T: int = 0
    D: int = 0
    d: int = 0
    kind: str = ""
    meta: dict | None = None
    digests: dict | None = None
    targets: tuple = ()
    n_heldout: int = 0
    n_groups: int = 0
    library_terms: int = 0
    memory_gib: float = 0.0
    warnings: list = dataclasses.field(default_factory=list)
    library_cfg: Any = None
    mixtures: dict = dataclasses.field(default_factory=dict)
    heldout_cache: dict | None = None
    queries: list = dataclasses.field(default_factory=list)
    step_weights: list | None = None
    sensitivity: dict | None = None
    polish: dict | None = None
    fit_space: str = ""
    space_choice: dict | None = None
    peers: list = dataclasses.field(default_factory=list)

    @property
    def has_drift(self) -> bool:
        return self.external is None or self.external.has_drift


OTHER = {"drift": "central_diff", "central_diff": "drift", "eps": "drift"}


def _sha_or_none(p: Path) -> str | None:
    return file_sha256(p) if p.is_file() else None


def _check_source(cfg: Config) -> Plan:
    """Where the trajectories come from (a file, or the run's EMA DiT), checked against the run; the plan's first fields."""
    s, run_dir = cfg.sindy, cfg.run.dir
    plan = Plan(run_dir=run_dir)
    dit_meta_file = run_dir / "dit.json"
    run_meta = read_dit_meta(run_dir) if dit_meta_file.is_file() else None  # a damaged one: one line
    if s.trajectories:
        path = Path(s.trajectories)
        if path.suffix == ".npz":
            tset = TrajectorySet.from_npz(path, s.trajectories_order)  # a missing file: "file not found"
            if s.target == "drift" and not tset.has_drift:
                raise UserError(
                    f"sindy.trajectories={path} holds states only (no 'velocities' array): set "
                    "sindy.target=central_diff or add 'velocities' (n, T+1, d) to the file"
                )
            if run_meta is not None and int(np.prod(run_meta["latent_shape"])) != tset.dim:
                raise UserError(
                    f"sindy.trajectories={path} has latent dimension {tset.dim} but the model in "
                    f"{run_dir} has latent {run_meta['latent_shape']}: these trajectories come from "
                    "another model; use another run.name or drop sindy.trajectories"
                )
            plan.warnings.append(
                f"external trajectories {path} (sha256 {tset.manifest['sha256'][:12]}): no "
                "checkpoint digest ties them to a model of this project"
            )
        else:
            tset = TrajectorySet.from_manifest(path)
            ema_sha = _sha_or_none(run_dir / "dit_ema.safetensors")
            ae_sha = _sha_or_none(run_dir / "ae.safetensors")
            m = tset.manifest
            if ema_sha is None or ae_sha is None:
                raise UserError(
                    f"cannot check sindy.trajectories={path} against {run_dir}: it has no "
                    "dit_ema.safetensors / ae.safetensors; train that run first"
                )
            if (m["dit_ema_sha256"], m["ae_sha256"]) != (ema_sha, ae_sha):
                raise UserError(
                    f"sindy.trajectories={path} was generated by another model (dit_ema sha256 "
                    f"{m['dit_ema_sha256'][:12]}, ae {m['ae_sha256'][:12]}) than {run_dir} "
                    f"({ema_sha[:12]}, {ae_sha[:12]}); use that model's run or drop sindy.trajectories"
                )
            if s.target == "drift" and not tset.has_drift:
                raise UserError(f"{path} has no drift; set sindy.target=central_diff")
            plan.meta = {"latent_shape": m["latent_shape"]}  # decode_end_states reshapes with it
        plan.external = tset
        plan.n, plan.T, plan.D = tset.n, tset.T, tset.dim
        plan.kind = run_meta["kind"] if (run_meta and tset.source == "generated") else "external"
    else:
        if not (run_dir / "dit_ema.safetensors").is_file():
            raise UserError(
                f"{run_dir} has no EMA checkpoint dit_ema.safetensors: run training/train_dit.py "
                f"--config ... run.name={cfg.run.name} first (or point sindy.trajectories at a file)"
            )
        _, schedule, meta = load_denoiser(run_dir, "cpu")
        _, ae_meta = load_autoencoder(run_dir, "cpu")
        mean, std = load_latent_stats(run_dir)
        ema_sha, ae_sha = file_sha256(run_dir / "dit_ema.safetensors"), file_sha256(run_dir / "ae.safetensors")
        if meta.get("ae_sha256") and meta["ae_sha256"] != ae_sha:
            raise UserError(
                f"{run_dir}/dit_ema.safetensors was trained on latents of another autoencoder than "
                f"{run_dir}/ae.safetensors; retrain the DiT of this run"
            )
        plan.n, plan.T, plan.D, plan.kind = (
            s.n_trajectories,
            schedule.T,
            int(np.prod(meta["latent_shape"])),
            meta["kind"],
        )
        plan.meta, plan.digests = meta, {"dit_ema_sha256": ema_sha, "ae_sha256": ae_sha}
    return plan


def _check_peers(cfg: Config, plan: Plan) -> list[dict]:
    """sindy.peer_runs checked against the run: each a trained EMA DiT on this run's autoencoder, with its latent
    shape and schedule, so that "the same noise" means the same thing to both DiTs."""
    if cfg.sindy.peer_runs and plan.external is not None:
        raise UserError(
            f"sindy.peer_runs compares DiTs from the noise of the job's own trajectories, but these come from "
            f"{cfg.sindy.trajectories}; drop sindy.peer_runs or sindy.trajectories"
        )
    peers = []
    for entry in cfg.sindy.peer_runs:
        folder, key = Path(entry), f"sindy.peer_runs entry {entry}"
        if not (folder / "dit_ema.safetensors").is_file():
            raise UserError(
                f"{key} has no dit_ema.safetensors: train the peer first (`make peer`, or training/train_dit.py with "
                "another run.seed on a copy of this run's ae.safetensors, latent_stats.safetensors and latents/)"
            )
        meta = read_dit_meta(folder)  # a damaged dit.json: one line naming it
        ours = plan.meta or {}
        for field in ("latent_shape", "schedule", "timesteps"):
            if meta.get(field) != ours.get(field):
                raise UserError(
                    f"{key}: its DiT has {field} {meta.get(field)!r}, this run's {ours.get(field)!r}; a peer is the "
                    "same recipe with another seed"
                )
        if meta.get("ae_sha256") != plan.digests["ae_sha256"]:
            raise UserError(
                f"{key}: its DiT was trained on the latents of another autoencoder (ae sha256 "
                f"{str(meta.get('ae_sha256'))[:12]}, this run's {plan.digests['ae_sha256'][:12]}); train the peer on a "
                "copy of this run's ae.safetensors, latent_stats.safetensors and latents/ (`make peer` does)"
            )
        # Loaded once here, not first at the report stage: truncated, corrupt or NaN weights, or weights that do
        # not fit its dit.json, are refused in one line before the job's minutes of work.
        load_denoiser(folder, "cpu")
        peers.append({"dir": folder, "dit_ema_sha256": file_sha256(folder / "dit_ema.safetensors")})
    return peers


def check_inputs(cfg: Config) -> Plan:
    """Everything the job needs, validated; raises UserError naming the bad value and the fix."""
    s = cfg.sindy
    plan = _check_source(cfg)
    plan.peers = _check_peers(cfg, plan)
    if plan.kind == "conv":
        plan.d = s.pca_components
        if s.pca_components > plan.D:
            raise UserError(f"sindy.pca_components={s.pca_components} exceeds the latent size {plan.D}")
    else:
        plan.d = plan.D
        if plan.D > 64:
            raise UserError(f"a {plan.D}-D state is too large for the degree-3 library; reduce it first")
    n_ho = int(round(s.heldout_fraction * plan.n))
    if n_ho < 1 or plan.n - n_ho < 2:
        raise UserError(
            f"{plan.n} trajectories with sindy.heldout_fraction={s.heldout_fraction} leave "
            f"{n_ho} held-out and {plan.n - n_ho} training; raise sindy.n_trajectories"
        )
    plan.n_heldout = n_ho
    plan.n_groups = min(s.bootstrap_groups, plan.n - n_ho)
    if s.fit_space != "drift" and not (plan.external is None or plan.external.source == "generated"):
        raise UserError(
            f"sindy.fit_space={s.fit_space} needs the DiT's recorded eps, which {s.trajectories} does not hold; "
            "use sindy.fit_space=drift for external trajectories"
        )
    main_target = "eps" if s.fit_space in ("eps", "x0", "auto") else s.target
    plan.targets = (main_target, OTHER[main_target]) if (s.compare_targets and plan.has_drift) else (main_target,)
    if s.weighting == "sensitivity" and plan.external is not None:
        raise UserError(
            f"sindy.weighting=sensitivity measures the run's DiT, but these trajectories come from {s.trajectories}; "
            "set sindy.weighting=none for external trajectories"
        )
    for key, value in (("queries", s.queries), ("dagger_rounds", s.dagger_rounds)):
        if not value:
            continue
        if plan.external is not None:
            raise UserError(
                f"sindy.{key}={value} asks the run's DiT to label states, but these trajectories come from "
                f"{s.trajectories}; set sindy.{key}=0 for external trajectories"
            )
        if "central_diff" in plan.targets:
            raise UserError(
                f"sindy.{key} adds independent states, between which a finite difference means nothing: use "
                "sindy.target=drift or sindy.fit_space=eps with sindy.compare_targets=false"
            )
    plan.library_cfg = s.library
    if s.library.preset != "reference" and "mixture" in s.library.families:
        why = mixture_unavailable(cfg, plan)
        rest = [f for f in s.library.families if f != "mixture"]
        if why and not rest:
            raise UserError(f"sindy.library.families is [mixture] only, but {why}; list other families")
        if why:  # the default library lists it; inputs without a mixture get the rest, and are told so
            plan.library_cfg = dataclasses.replace(s.library, families=rest)
            plan.warnings.append(f"the mixture family is left out of the library: {why}")
    if s.mixture_fit == "dit" and "mixture" not in plan.library_cfg.families:  # configs/sindy.py checked the rest
        raise UserError(
            f"sindy.mixture_fit=dit refits the library's mixture family to the DiT, but {mixture_unavailable(cfg, plan)}"
            "; set sindy.mixture_fit=em"
        )
    try:  # the library as configured (placeholder projections and mixture: the real ones come from the data)
        plan.library_terms = placeholder_library(cfg, plan, plan.d).n_terms
    except ValueError as e:
        raise UserError(f"sindy.library: {e}") from None
    check_memory(cfg, plan)
    return plan


def mixture_unavailable(cfg: Config, plan: Plan) -> str:
    """Why the mixture family cannot be built here ("" if it can): it needs the run's training latents, a sampler
    with a known linear part and coordinates the mixture can live in (the latent's own or a rotation of them)."""

    s = cfg.sindy
    sampler = plan.external.manifest.get("sampler") if plan.external is not None else s.sampler
    if plan.external is not None and plan.external.source != "generated":
        return f"{s.trajectories} is an external file (no schedule, no training latents)"
    if sampler not in SAMPLERS_WITH_THEORY:
        return f"sampler {sampler} has no closed-form linear part (needed: {', '.join(SAMPLERS_WITH_THEORY)})"
    if plan.kind == "conv":
        return "a conv latent is fitted in principal components, which a mixture of the latents does not map to"
    if not s.mixture_components:
        return "sindy.mixture_components is empty"
    if not (plan.run_dir / "latents" / "train.safetensors").is_file():
        return f"{plan.run_dir / 'latents' / 'train.safetensors'} not found (run training/encode_latents.py)"
    return ""


def placeholder_library(cfg: Config, plan: Plan, d: int) -> Library:
    """The configured library's shape before the data: identity projections and, for the mixture family, a mixture
    of the largest K on the grid (the real one is fitted in make_library)."""

    lib_cfg, mixture = plan.library_cfg, None
    if lib_cfg.preset != "reference" and "mixture" in lib_cfg.families:
        k = max(cfg.sindy.mixture_components)
        mix = GaussianMixtureEps(np.full(k, 1.0 / k), np.zeros((k, d)), np.stack([np.eye(d)] * k))
        mixture = MixtureEps.from_mixture(mix, np.full(2, 0.5), tuple(lib_cfg.mixture_features))
    return build_library(lib_cfg, d, (0.0, 1.0), np.eye(d), mixture)


def check_memory(cfg: Config, plan: Plan) -> None:
    """The Gram path holds G + 2 statistics (twice: driver and object store) plus a Theta chunk per task."""
    s, d = cfg.sindy, plan.d
    lib = placeholder_library(cfg, plan, d)
    est = estimate_memory(plan.n * plan.T, d, lib, n_targets=d * len(plan.targets), chunk_size=s.chunk_size)
    need = 2 * (plan.n_groups + 2 + s.time_windows) * est.gram_bytes + 3 * est.chunk_bytes
    if s.max_memory_gb > 0:
        have, where = s.max_memory_gb * 2**30, f"sindy.max_memory_gb={s.max_memory_gb}"
    else:
        have, where = psutil.virtual_memory().available, "available memory"
    if need > have:
        raise UserError(
            f"the fit needs {need / 2**30:.2f} GiB ({est.n_terms} library terms, "
            f"{plan.n} trajectories x {plan.T} steps, {plan.n_groups} bootstrap groups, chunks of "
            f"{s.chunk_size} rows) but {where} is {have / 2**30:.2f} GiB; lower sindy.bootstrap_groups, "
            "sindy.chunk_size or the state dimension, or raise the budget"
        )
    plan.memory_gib = need / 2**30


# ------------------------------------------------------------------------------ memory


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the streamed Gram path needs (float64) to regress n_samples on a library of n_terms columns.

    Attributes:
        n_samples: rows of Theta.
        n_terms: columns p of Theta.
        n_targets: regression targets m (usually d).
        gram_bytes: Gram statistics G (p, p), b (p, m), Y^T Y (m, m), sum Y (m,).
        chunk_bytes: one streamed Theta chunk, chunk_size * p * 8.
    """

    n_samples: int
    n_terms: int
    n_targets: int
    gram_bytes: int
    chunk_bytes: int


def estimate_memory(
    n_samples: int,
    d: int,
    library: Library | None = None,
    n_targets: int | None = None,
    chunk_size: int = 65536,
) -> MemoryEstimate:
    """Memory for the Gram statistics and one Theta chunk, in bytes (float64).

    Args:
        n_samples: number of (z, t, zdot) samples.
        d: state dimension.
        library: the library (default: ``Library.reference(d)``).
        n_targets: regression targets (default d).
        chunk_size: rows per streamed chunk.

    Returns:
        MemoryEstimate. E.g. reference library, d=16: Gram statistics 8.7 MB whatever n_samples is.
    """
    if not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 1:
        raise ValueError(f"d (state dimension) must be a positive int; got {d!r}.")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0; got {n_samples}.")
    lib = Library.reference() if library is None else library
    p = lib.n_output_features(int(d))
    m = d if n_targets is None else int(n_targets)
    b = 8
    return MemoryEstimate(
        n_samples=int(n_samples),
        n_terms=p,
        n_targets=m,
        gram_bytes=(p * p + p * m + m * m + m) * b,
        chunk_bytes=min(int(n_samples), int(chunk_size)) * p * b,
    )
