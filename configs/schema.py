"""Typed configuration: the dataclasses below are the schema, YAML files only override them.

OmegaConf structured configs merge the defaults, a YAML file and dotted ``key=value``
overrides; unknown keys and wrong types are errors before any work (DESIGN.md, "Config").
Value checks live in each dataclass's ``__post_init__``, which OmegaConf.to_object runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs.cli import UserError
from configs.io import atomic_write_text

MIXED_PRECISION = ("no", "fp16", "bf16")


class ConfigError(UserError, ValueError):
    """A configuration problem the user must fix; the message names the key and the fix."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(section: str, **values: float) -> None:
    for k, v in values.items():
        _check(v > 0, f"{section}.{k} must be > 0, got {v}")


def _non_negative(section: str, **values: float) -> None:
    for k, v in values.items():
        _check(v >= 0, f"{section}.{k} must be >= 0, got {v}")


def _at_most(section: str, bound: float, **values: float) -> None:
    for k, v in values.items():
        _check(v <= bound, f"{section}.{k} must be <= {bound}, got {v}")


# Names become folder names, Slurm job names and words of generated shell scripts: a strict
# pattern (no shell metacharacters, whitespace, quotes or path separators) keeps all three safe.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _name(key: str, value: str) -> None:
    _check(NAME_RE.fullmatch(value) is not None and ".." not in value,
           f"{key} must be 1-100 characters of letters, digits, '.', '_' or '-', starting with a letter or "
           f"digit and without '..', got {value!r}")


# Slurm partition/account/qos names, constraint expressions and single sbatch options as #SBATCH
# values (sbatch splits #SBATCH lines on whitespace and interprets quotes).
SLURM_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")
SLURM_NAMES_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}(,[A-Za-z0-9_][A-Za-z0-9._+-]{0,127})*")
CONSTRAINT_RE = re.compile(r"[A-Za-z0-9_.:*&|,!\[\]()-]{1,512}")
SBATCH_ARG_RE = re.compile(r"--?[A-Za-z][A-Za-z0-9-]*(=[^\s'\"`$\\\x00-\x1f\x7f]+)?")


def _one_line(key: str, value: str) -> None:
    """Paths and shell lines: a newline or other control character would split a generated script line."""
    _check(_CONTROL_RE.search(value) is None, f"{key} must not contain newlines or control characters, got {value!r}")


@dataclass
class RunConfig:
    name: str = "local"
    """Run name: outputs go to ``<root>/<name>/`` and Slurm jobs are named after it; 1-100 letters,
    digits, '.', '_' or '-', starting with a letter or digit, no '..'."""
    root: str = "runs"
    """Folder that holds all runs."""
    seed: int = 0
    """Seed for model init, data order and noise; a run is a pure function of config + seed."""

    def __post_init__(self) -> None:
        _name("run.name", self.name)
        _check(bool(self.root), "run.root must be a folder, got ''")
        _one_line("run.root", self.root)
        _check(0 <= self.seed < 2**32, f"run.seed must be in [0, 2**32), got {self.seed}")

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass
class DataConfig:
    shards: str = "data/mnist"
    """Folder with webdataset shards and manifest.json (``python -m data_pipeline.prepare --out``)."""
    source: str = "auto"
    """MNIST source used when the shards must be written: auto | pickle | idx:PATH."""
    shard_size: int = 10000
    """Samples per shard when preparing."""
    loader: str = "memory"
    """memory: the whole split as one tensor on the training device; stream: webdataset streaming."""
    num_workers: int = 0
    """DataLoader worker processes for the streaming loader."""
    shuffle_buffer: int = 5000
    """Streaming shuffle buffer (samples)."""
    on_error: str = "raise"
    """What a corrupted shard does in the streaming loader: raise (names the shard) | skip (counted warning)."""

    def __post_init__(self) -> None:
        _check(self.loader in ("memory", "stream"), f"data.loader must be 'memory' or 'stream', got {self.loader!r}")
        _check(self.on_error in ("raise", "skip"), f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        _positive("data", shard_size=self.shard_size, shuffle_buffer=self.shuffle_buffer)
        _non_negative("data", num_workers=self.num_workers)
        # MNIST's training split is 60,000 images: a larger shard or buffer only costs memory.
        _at_most("data", 60000, shard_size=self.shard_size, shuffle_buffer=self.shuffle_buffer)
        _at_most("data", 64, num_workers=self.num_workers)
        _check(bool(self.shards), "data.shards must be a folder, got ''")
        _one_line("data.shards", self.shards)
        _one_line("data.source", self.source)


@dataclass
class OptimConfig:
    """Shared optimisation settings of a training stage (AdamW + warmup + cosine)."""

    batch_size: int = 128
    """Per-process batch size."""
    epochs: float = 1.0
    """Passes over the training split (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 means derive from epochs."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.0
    """Cosine decays to lr * min_lr_ratio."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup steps before the cosine decay."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping (the norm is still logged)."""
    grad_accum: int = 1
    """Gradient accumulation steps (Accelerate)."""
    mixed_precision: str = "no"
    """no | fp16 (with loss scaling) | bf16, through Accelerate."""
    checkpoint_every: int = 500
    """Save the full training state every N optimizer steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (oldest deleted first)."""
    log_every: int = 20
    """Scalars to TensorBoard every N steps."""
    image_every: int = 500
    """Image grids to TensorBoard every N steps (and at the end)."""
    fused_adamw: bool = False
    """Use the fused AdamW kernel (CUDA only)."""

    def _validate(self, section: str) -> None:
        _positive(section, batch_size=self.batch_size, lr=self.lr, grad_accum=self.grad_accum,
                  checkpoint_every=self.checkpoint_every, keep_checkpoints=self.keep_checkpoints,
                  log_every=self.log_every, image_every=self.image_every)
        _non_negative(section, epochs=self.epochs, max_steps=self.max_steps, weight_decay=self.weight_decay,
                      warmup_steps=self.warmup_steps, grad_clip=self.grad_clip)
        _check(self.max_steps > 0 or self.epochs > 0, f"{section}: set epochs > 0 or max_steps > 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{section}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"{section}.betas must be two numbers in [0, 1), got {list(self.betas)}")
        _check(self.mixed_precision in MIXED_PRECISION,
               f"{section}.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")


@dataclass
class AEConfig(OptimConfig):
    kind: str = "vae16"
    """Autoencoder: conv (ConvAE, 7x7x6 = 49 tokens of 6) | vae16 (16-D VAE, 16 tokens of 1)."""
    kl_weight: float = 1.0
    """VAE only: weight of the KL term against the summed BCE per image (1.0 = the plain ELBO)."""

    def __post_init__(self) -> None:
        self._validate("ae")
        _check(self.kind in ("conv", "vae16"), f"ae.kind must be 'conv' or 'vae16', got {self.kind!r}")
        _non_negative("ae", kl_weight=self.kl_weight)


@dataclass
class LatentConfig:
    batch_size: int = 2048
    """Images per encoder batch."""

    def __post_init__(self) -> None:
        _positive("latents", batch_size=self.batch_size)


@dataclass
class DiTConfig(OptimConfig):
    preset: str = "reference"
    """DiT preset from models.dit.PRESETS (tiny | reference | large | xl)."""
    batch_size: int = 256
    lr: float = 5e-4
    epochs: float = 200.0
    schedule: str = "auto"
    """Noise schedule: auto (conv: cosine T=100, vae16: cosine T=50) | cosine | linear."""
    timesteps: int = 0
    """T; 0 means the latent kind's default (conv 100, vae16 50)."""
    ema_decay: float = 0.999
    """EMA decay of the unwrapped fp32 parameters, updated after every optimizer step."""
    ema_warmup: bool = True
    """Ramp the EMA decay as min(ema_decay, (1 + step) / (10 + step)) so short runs do not sample
    from an EMA still dominated by the zero-initialised net; false gives the plain 0.999 EMA."""
    compile: bool = False
    """torch.compile the denoiser."""
    sample_every: int = 1000
    """Decode an EMA sample grid to TensorBoard every N steps (and at the end)."""
    num_samples: int = 64
    """Images in each sample grid."""
    eval_samples: int = 1000
    """EMA samples scored with the quality metrics at the end (0 disables)."""
    classifier: str = "data/classifier/mnist_cnn.safetensors"
    """MNIST classifier for FD-MNIST (``python -m analysis.quality train``); scoring is skipped, with a
    message, when the file does not exist."""

    def __post_init__(self) -> None:
        self._validate("dit")
        _check(self.schedule in ("auto", "cosine", "linear"),
               f"dit.schedule must be auto | cosine | linear, got {self.schedule!r}")
        _non_negative("dit", timesteps=self.timesteps, eval_samples=self.eval_samples)
        _check(0 <= self.ema_decay < 1, f"dit.ema_decay must be in [0, 1), got {self.ema_decay}")
        _positive("dit", sample_every=self.sample_every, num_samples=self.num_samples)


@dataclass
class SindyLibraryConfig:
    """The SINDy candidate library (analysis/library.py, build_library); defaults chosen on known systems
    (benchmarks/bench_sindy_rule.py: Lorenz-63, DDIM on Gaussian and two-mode mixture data)."""

    preset: str = "standard"
    """standard: the families below | reference: the reference study's fixed library (cubic polynomial, t, t^2,
    t z_i, t^2 z_i, exp(-t z_i), exp(-z_i^2); 1035 terms for d = 16), which ignores the fields below."""
    families: list[str] = field(default_factory=lambda: ["polynomial", "time", "time_state", "tanh", "mixture"])
    """Families in column order, any of: polynomial (monomials in z up to poly_degree, with the constant) |
    time (the time basis alone) | time_state (time basis x state monomials up to time_state_degree) |
    exp (the reference's exp(-t z_i) and exp(-z_i^2)) | tanh (tanh of coordinates or principal projections) |
    terms (the user-listed expressions in `terms`) | mixture (closed-form features of the Gaussian mixture the job
    fits to the run's training latents, K by held-out likelihood over sindy.mixture_components: see
    `mixture_features`; only for the job's own trajectories of a vae16 run with a sampler of known linear part:
    elsewhere it is left out of the library, and the job and report.md say why)."""
    poly_degree: int = 2
    """Highest total degree of the monomials in z (1..4)."""
    time_basis: str = "poly"
    """poly: t, t^2, ..., t^time_degree | spline: spline_basis B-splines of degree time_degree over the data's t range."""
    time_degree: int = 4
    """Highest power of t (poly) or the spline degree (spline); 1..8."""
    spline_basis: int = 6
    """B-splines of the spline time basis (2..32; one is dropped: they sum to the constant)."""
    time_state_degree: int = 1
    """Degree of the state monomials multiplied by the time functions (1..3); 1 = linear dynamics with
    time-varying coefficients, exact for DDIM on Gaussian data."""
    tanh_on: str = "principal"
    """principal: tanh of the projections on the leading principal directions of the training end states |
    coordinates: tanh of each z_i."""
    tanh_projections: int = 2
    """Principal directions used by tanh_on=principal (1..d)."""
    tanh_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """Scales c of tanh(p / c) (each > 0)."""
    tanh_time_degree: int = 4
    """tanh terms are also multiplied by t^1..t^tanh_time_degree (0..8)."""
    mixture_features: list[str] = field(default_factory=lambda: ["eps"])
    """Columns of the mixture family: eps (the mixture's exact eps*_j, one per dimension; composed into its drift
    p z_j + q eps*_j when the fit target is a velocity) | posterior (its posterior weights r_k(z, t), one per
    component)."""
    gated: list[str] = field(default_factory=lambda: ["tanh"])
    """Families kept per dimension only if they earn it on held-out data: the best held-out unexplained variance
    with them must be at most `gate` x the best without them (else the dimension is fitted without them)."""
    gate: float = 0.5
    """The factor of `gated` (0 < gate <= 1; 1 keeps a family whenever it helps at all)."""
    terms: list[str] = field(default_factory=list)
    """User terms for the `terms` family, e.g. ["z0 * z1", "exp(-t) * z3"]: numbers, z0..z{d-1}, t, + - * / **,
    exp log tanh sin cos sqrt abs; parsed against this grammar (by analysis/library.py, checked before any work),
    never evaluated as code."""

    def __post_init__(self) -> None:
        known = ("polynomial", "time", "time_state", "exp", "tanh", "terms", "mixture")
        _check(self.preset in ("standard", "reference"),
               f"sindy.library.preset must be standard | reference, got {self.preset!r}")
        bad = [f for f in self.families if f not in known]
        _check(not bad, f"sindy.library.families: unknown family {bad[0] if bad else ''!r}; known: {', '.join(known)}")
        _check(len(set(self.families)) == len(self.families), f"sindy.library.families repeats a family: {self.families}")
        _check(self.preset == "reference" or bool(self.families), "sindy.library.families is empty; list at least one")
        _check(1 <= self.poly_degree <= 4, f"sindy.library.poly_degree must be 1..4, got {self.poly_degree}")
        _check(self.time_basis in ("poly", "spline"), f"sindy.library.time_basis must be poly | spline, got {self.time_basis!r}")
        _check(1 <= self.time_degree <= 8, f"sindy.library.time_degree must be 1..8, got {self.time_degree}")
        _check(2 <= self.spline_basis <= 32 and (self.time_basis != "spline" or self.spline_basis > min(self.time_degree, 5)),
               f"sindy.library.spline_basis must be 2..32 and > the spline degree, got {self.spline_basis}")
        _check(1 <= self.time_state_degree <= 3, f"sindy.library.time_state_degree must be 1..3, got {self.time_state_degree}")
        _check(self.tanh_on in ("principal", "coordinates"),
               f"sindy.library.tanh_on must be principal | coordinates, got {self.tanh_on!r}")
        _check(self.tanh_projections >= 1, f"sindy.library.tanh_projections must be >= 1, got {self.tanh_projections}")
        _check(bool(self.tanh_scales) and all(c > 0 for c in self.tanh_scales),
               f"sindy.library.tanh_scales must be a non-empty list of numbers > 0, got {self.tanh_scales}")
        _check(0 <= self.tanh_time_degree <= 8, f"sindy.library.tanh_time_degree must be 0..8, got {self.tanh_time_degree}")
        _check(all(f in known for f in self.gated), f"sindy.library.gated: unknown family in {self.gated}; known: {', '.join(known)}")
        _check(0 < self.gate <= 1, f"sindy.library.gate must be in (0, 1], got {self.gate}")
        _check(bool(self.mixture_features) and all(f in ("eps", "posterior") for f in self.mixture_features)
               and len(set(self.mixture_features)) == len(self.mixture_features),
               f"sindy.library.mixture_features must be a non-empty subset of [eps, posterior], got {self.mixture_features}")
        _check("terms" not in self.families or bool(self.terms), "sindy.library.families has 'terms' but sindy.library.terms is empty")


@dataclass
class SindyConfig:
    """Equation discovery (analysis/sindy_job.py); the SINDy study it checks: docs/REFERENCES.md."""

    n_trajectories: int = 1000
    """Trajectories generated from the run's EMA DiT."""
    sampler: str = "ddim"
    """ddim (eta = 0, deterministic, default) | ode (probability-flow ODE) | ddpm (stochastic)."""
    target: str = "drift"
    """drift: the sampler's deterministic mean step as a velocity | central_diff: (z[k+1]-z[k-1])/(2 dt)."""
    seed: int = 1234
    """Seed of the initial noise (and DDPM noise); trajectories do not depend on the worker count."""
    block_size: int = 1024
    """Trajectories per noise block (and per sampling batch): block b draws all its noise from a
    generator seeded by (seed, b) and workers take whole blocks, so the trajectories are the same
    whatever the number of workers."""
    heldout_fraction: float = 0.2
    """Fraction of trajectories (whole trajectories, seeded split) kept out of the fit for held-out R^2."""
    pca_components: int = 16
    """conv latents (294-D) only: PCA components the fit works in (vae16 uses its 16 coordinates)."""
    coordinates: str = "auto"
    """latent: the latent's own coordinates (conv: its sindy.pca_components principal components) | modes: those
    rotated to the linear modes of the dynamics (the eigenvectors of the per-step least-squares linear drift; for
    Gaussian data the exact drift is uncoupled there, analysis/coordinates.py) | auto: fit in both and keep the
    modes only if their pooled held-out unexplained variance is within (1 + threshold_tol) x the better one's
    with fewer terms in all (the latent's own on a tie)."""
    library: SindyLibraryConfig = field(default_factory=SindyLibraryConfig)
    """The candidate library (families and degrees; preset=reference for the reference study's)."""
    n_thresholds: int = 30
    """STLSQ thresholds swept per dimension (log grid over four decades); the choice is by held-out R^2."""
    threshold_tol: float = 0.05
    """Rule: the sparsest swept model (within the term budget) whose held-out unexplained variance 1 - R^2 is
    at most (1 + tol) x the best's (+ 1e-10 for round-off); 0..1."""
    optimizer: str = "stlsq"
    """stlsq (sequentially thresholded ridge, pysindy.STLSQ semantics) | sr3 (pysindy.SR3 with an L0
    prox, run on a square root of the Gram statistics; same threshold sweep and rule)."""
    alpha: float = 0.0
    """STLSQ ridge weight on the normalised columns (0: plain least squares; 0.05 kept spurious terms on exact data)."""
    sr3_nu: float = 1.0
    """SR3's relaxation nu (pysindy relax_coeff_nu); the L0 weight follows from the threshold: t^2 / (2 nu)."""
    term_budget: int = 30
    """The chosen model of each dimension keeps at most this many terms (readable equations); the report
    sets the unrestricted rule's model and its held-out R^2 beside it (the cost of the budget)."""
    time_windows: int = 5
    """Held-out R^2 is also reported in this many equal windows of t (where the equations fail); 1..50."""
    ceiling_degree: int = 2
    """Degree of the free-time reference fit: a separate polynomial in z for every sampler step, fitted
    on the training and scored on the held-out trajectories (0 disables). It shows how much of the
    held-out error is the state dependence (not the time terms) of the library."""
    normalize: bool = True
    """STLSQ on L2-normalised library columns (thresholds in normalised units)."""
    n_bootstrap: int = 20
    """Bootstrap resamples (of trajectory groups) for inclusion probabilities and coefficient std; 0 disables."""
    bootstrap_groups: int = 20
    """Training trajectories are dealt into this many groups, one Gram statistic each; bagging resamples groups."""
    compare_targets: bool = True
    """Also fit the other target (central differences vs the sampler's drift) and compare held-out R^2."""
    poor_r2: float = 0.5
    """Dimensions with held-out R^2 below this (or 0.2 below their training R^2) are flagged as not generalising."""
    rollouts: int = 16
    """Held-out trajectories integrated back with the discovered equations (validation and plots)."""
    integrator: str = "euler"
    """euler | rk4 on the sampler's grid, t from 1 to 0 with dt = 1/T (euler matches the drift target)."""
    device: str = "auto"
    """Device of the trajectory workers and of the statistics: auto (CUDA if there is one) | cpu | cuda."""
    workers: int = 0
    """Trajectory workers; 0: one per GPU of the cluster, or one per CPU without GPUs."""
    num_cpus: int = 0
    """CPUs of the Ray instance the job starts itself (0: all); ignored when joining a running cluster."""
    ray_address: str = ""
    """Ray to use; only a cluster the user named is joined, never one that merely runs on this machine.
    "" = $RAY_ADDRESS if set (``ray job submit`` sets it), else the head's own cluster when the script runs
    under ``ray submit``, else a private instance; "local" = a private instance even with $RAY_ADDRESS set;
    "auto" = the cluster the last ``ray start --head`` on this node recorded; HOST:PORT (the head's GCS port)
    or ray://HOST:PORT = that cluster. An address nothing answers at is one line and exit 2 within seconds."""
    max_memory_gb: float = 0.0
    """Memory budget for the fit statistics; 0: the machine's available memory."""
    chunk_size: int = 16384
    """Library rows evaluated at once while streaming the statistics (peak chunk_size * terms * 8 bytes)."""
    trajectories: str = ""
    """Use existing trajectories instead of generating: a manifest.json written by this job, or an .npz with
    'trajectories' (n, T+1, d), 'num_timesteps' and optionally 'velocities' (n, T+1, d; dz/dt at each state, the
    fit target of sindy.target=drift; the last state's is not a regression row) and 't' (T+1,) monotone times
    (default 1 - k/T, states then ordered by sindy.trajectories_order)."""
    trajectories_order: str = "descending"
    """Time order of the states in an external .npz: descending (z_T first, state k at t = 1 - k/T) | ascending."""
    fit_space: str = "drift"
    """drift: fit the velocity target itself | eps: fit the DiT's recorded eps_theta(z, t) and compose the drift
    exactly as p(t) z + q(t) eps_fit, p and q known from the schedule and sampler (analysis/theory.py); the
    report gives the held-out R^2 of both eps and drift and the rollouts either way."""
    validation_noises: int = 400
    """Held-out noises the chosen equations are integrated from, decoded and classified against the DiT's
    samples from the same noise (class agreement, FD-MNIST, confidence; analysis/validation.py); at most the
    held-out trajectories. 0 disables the validation."""
    mixture_components: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    """Gaussian-mixture view of the denoiser (analysis/mixture.py): component counts tried by EM on the
    training latents, the best by held-out (test split) log-likelihood is kept; empty disables the view."""
    mixture_samples: int = 10000
    """Training latents (a seeded random subset) the mixtures are fitted to; EM costs grow with it (local run,
    K up to 20: about 25 s of EM for 20,000 latents on 2 busy cores, half that for 10,000)."""

    def __post_init__(self) -> None:
        _check(self.sampler in ("ddim", "ode", "ddpm"), f"sindy.sampler must be ddim | ode | ddpm, got {self.sampler!r}")
        _check(self.target in ("drift", "central_diff"),
               f"sindy.target must be drift | central_diff, got {self.target!r}")
        _positive("sindy", n_trajectories=self.n_trajectories, block_size=self.block_size,
                  pca_components=self.pca_components, chunk_size=self.chunk_size)
        _non_negative("sindy", alpha=self.alpha)
        _check(self.threshold_tol <= 1, f"sindy.threshold_tol must be in 0..1 (relative to the best unexplained "
               f"variance), got {self.threshold_tol}")
        _check(self.poor_r2 <= 1, f"sindy.poor_r2 must be <= 1 (an R^2), got {self.poor_r2}")
        _check(1 <= self.time_windows <= 50, f"sindy.time_windows must be 1..50, got {self.time_windows}")
        _check(0 < self.heldout_fraction < 1,
               f"sindy.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _check(self.n_thresholds >= 2, f"sindy.n_thresholds must be >= 2, got {self.n_thresholds}")
        _check(self.bootstrap_groups >= 2, f"sindy.bootstrap_groups must be >= 2, got {self.bootstrap_groups}")
        _non_negative("sindy", threshold_tol=self.threshold_tol, n_bootstrap=self.n_bootstrap,
                      rollouts=self.rollouts, workers=self.workers, num_cpus=self.num_cpus,
                      max_memory_gb=self.max_memory_gb)
        _check(self.optimizer in ("stlsq", "sr3"), f"sindy.optimizer must be stlsq | sr3, got {self.optimizer!r}")
        _positive("sindy", sr3_nu=self.sr3_nu, term_budget=self.term_budget)
        _check(self.ceiling_degree in (0, 1, 2, 3), f"sindy.ceiling_degree must be 0..3, got {self.ceiling_degree}")
        _check(self.integrator in ("euler", "rk4"), f"sindy.integrator must be euler | rk4, got {self.integrator!r}")
        _check(self.device in ("auto", "cpu", "cuda"), f"sindy.device must be auto | cpu | cuda, got {self.device!r}")
        _check(self.trajectories_order in ("descending", "ascending"),
               f"sindy.trajectories_order must be descending | ascending, got {self.trajectories_order!r}")
        _check(self.coordinates in ("auto", "latent", "modes"),
               f"sindy.coordinates must be auto | latent | modes, got {self.coordinates!r}")
        _check(self.fit_space in ("drift", "eps"), f"sindy.fit_space must be drift | eps, got {self.fit_space!r}")
        _check(self.fit_space == "drift" or self.target == "drift",
               f"sindy.fit_space=eps fits the recorded eps and composes the drift; it cannot be combined with "
               f"sindy.target={self.target} (set sindy.target=drift or sindy.fit_space=drift)")
        _non_negative("sindy", validation_noises=self.validation_noises)
        _check(all(isinstance(k, int) and k >= 1 for k in self.mixture_components),
               f"sindy.mixture_components must be a list of ints >= 1, got {list(self.mixture_components)}")
        _positive("sindy", mixture_samples=self.mixture_samples)


@dataclass
class SlurmConfig:
    """Slurm submission (python -m cluster.submit); see cluster/slurm/ for the job templates."""

    partition: str = ""
    """Partition (empty: the cluster's default)."""
    account: str = ""
    """Account charged for the jobs (empty: the user's default)."""
    qos: str = ""
    """Quality of service (empty: the default)."""
    time: str = ""
    """Wall-clock limit per job run, e.g. 04:00:00 or 1-12:00:00 (empty: the partition's default).
    A job that reaches it is requeued and resumes, so it bounds one run, not the whole stage."""
    mem: str = ""
    """Memory per node, e.g. 64G (0: all of it; empty: the partition's default)."""
    constraint: str = ""
    """Node features (sbatch --constraint), e.g. a100|h100."""
    nodes: int = 1
    """Nodes for training and Ray jobs."""
    gpus_per_node: int = 0
    """GPUs per node (0: CPU-only job)."""
    cpu_processes_per_node: int = 1
    """CPU-only jobs (gpus_per_node = 0): training processes per node, one Slurm task each; they form
    a gloo group (2 on one node = a real two-rank run). GPU jobs run one process per GPU instead."""
    cpus_per_task: int = 0
    """CPU cores per Slurm task: per node in GPU jobs (one task runs all the node's GPU processes),
    per process in CPU-only jobs (0: the cluster's default)."""
    accelerate_config: str = "configs/accelerate/multi_gpu.yaml"
    """Accelerate config of GPU training jobs: configs/accelerate/multi_gpu.yaml (DDP) or
    configs/accelerate/deepspeed_zero2.yaml (DeepSpeed ZeRO-2). CPU-only jobs use DDP over gloo."""
    python: str = ""
    """Interpreter the jobs run (absolute path; empty: the one running cluster.submit)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines every job runs first, e.g. ["module load cuda/12.4", "source ~/env/bin/activate"]."""
    log_dir: str = ""
    """Folder for the sbatch logs (empty: <run dir>/slurm). Logs are appended to across requeues."""
    signal_seconds: int = 120
    """Seconds before the time limit Slurm sends USR1 to the batch script (checkpoint and requeue)."""
    requeue: bool = True
    """Requeue a job that was stopped by a signal before it finished (it resumes from its checkpoint)."""
    main_process_port: int = 0
    """Rendezvous port of multi-process training on the first node (0: a free port picked at job start)."""
    ray_port: int = 0
    """Port of the Ray head's GCS on the first node (0: a free port picked at job start)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra sbatch options, one per item, e.g. ["--exclusive", "--mail-type=END"]."""
    pipeline: list[str] = field(default_factory=lambda: ["train-ae", "encode", "train-dit", "sindy"])
    """Stages `python -m cluster.submit pipeline` chains with --dependency=afterok, in this order."""

    def __post_init__(self) -> None:
        _positive("slurm", nodes=self.nodes, cpu_processes_per_node=self.cpu_processes_per_node)
        _non_negative("slurm", gpus_per_node=self.gpus_per_node, cpus_per_task=self.cpus_per_task,
                      signal_seconds=self.signal_seconds, main_process_port=self.main_process_port,
                      ray_port=self.ray_port)
        _check(self.main_process_port < 65536 and self.ray_port < 65536,
               f"slurm ports must be < 65536, got main_process_port={self.main_process_port} "
               f"ray_port={self.ray_port}")
        # Generous bounds that still catch a slipped digit before sbatch queues an impossible job.
        _at_most("slurm", 4096, nodes=self.nodes)
        _at_most("slurm", 64, gpus_per_node=self.gpus_per_node)
        _at_most("slurm", 1024, cpu_processes_per_node=self.cpu_processes_per_node, cpus_per_task=self.cpus_per_task)
        _at_most("slurm", 65535, signal_seconds=self.signal_seconds)  # sbatch --signal's own limit
        time_re = r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)"
        _check(self.time == "" or re.fullmatch(time_re, self.time) is not None,
               f"slurm.time must be a Slurm time limit like 04:00:00 or 1-12:00:00, got {self.time!r}")
        _check(self.mem == "" or re.fullmatch(r"\d+[KMGT]?", self.mem) is not None,
               f"slurm.mem must be a size like 64G or 0 (all of the node), got {self.mem!r}")
        # These go into #SBATCH lines: a newline there would end the comment and run the rest as
        # shell, and sbatch stops reading #SBATCH lines after it. Slurm's own names are plain words.
        for key, value, pattern, example in (
                ("partition", self.partition, SLURM_NAMES_RE, "gpu or gpu,cpu"),
                ("account", self.account, SLURM_NAME_RE, "proj123"),
                ("qos", self.qos, SLURM_NAME_RE, "normal"),
                ("constraint", self.constraint, CONSTRAINT_RE, "a100|h100 or [rack1*2&rack2*4]")):
            _check(value == "" or pattern.fullmatch(value) is not None,
                   f"slurm.{key} must look like {example} (letters, digits and Slurm's operators only), "
                   f"got {value!r}")
        _check(self.python == "" or self.python.startswith("/"),
               f"slurm.python must be an absolute path (jobs start in other shells), got {self.python!r}")
        for key, value in (("python", self.python), ("log_dir", self.log_dir),
                           ("accelerate_config", self.accelerate_config)):
            _one_line(f"slurm.{key}", value)
        stages = ("train-ae", "encode", "train-dit", "sindy")
        _check(len(self.pipeline) > 0 and all(s in stages for s in self.pipeline),
               f"slurm.pipeline must be a non-empty list of {stages}, got {list(self.pipeline)}")
        _check(len(set(self.pipeline)) == len(self.pipeline),
               f"slurm.pipeline lists a stage twice: {list(self.pipeline)}")
        for arg in self.sbatch_args:
            _check(SBATCH_ARG_RE.fullmatch(arg) is not None,
                   f"slurm.sbatch_args items must be single sbatch options like --exclusive or --mail-type=END "
                   f"(no spaces, quotes, '$', backticks, backslashes or control characters), got {arg!r}")
        for line in self.setup:
            _one_line("slurm.setup items", line)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    latents: LatentConfig = field(default_factory=LatentConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    sindy: SindyConfig = field(default_factory=SindyConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    resume: str = "none"
    """none: start fresh (refuses a run folder that already has checkpoints of the stage);
    auto: continue the latest complete checkpoint if there is one; or a checkpoint path."""

    def __post_init__(self) -> None:
        _check(bool(self.resume), "resume must be 'none', 'auto' or a checkpoint path")


def _format_omegaconf_error(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if type(e).__name__ in ("ConfigAttributeError", "ConfigKeyError") and key:
        return f"unknown config key '{key}' (see configs/schema.py for the schema)"
    if key:
        return f"bad value for '{key}': {msg}"
    return msg


def _format_yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """``configs/x.yaml:3:9: YAML syntax error: did not find expected ',' or ']'`` (one line)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Merge defaults <- YAML file <- dotted overrides and validate.

    Args:
        path: YAML file, or None for the defaults.
        overrides: ``["ae.lr=1e-3", "resume=auto"]``.

    Raises:
        ConfigError: missing file, unknown key, wrong type or bad value, naming it.
    """
    schema = OmegaConf.structured(Config)
    try:
        if path is not None:
            path = Path(path)
            _check(path.is_file(), f"config file not found: {path}")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as e:
                raise ConfigError(_format_yaml_error(path, e)) from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
            _check(loaded is None or OmegaConf.is_dict(loaded), f"{path}: the top level must be a mapping")
            if loaded is not None:
                schema = OmegaConf.merge(schema, loaded)
        for item in overrides:
            _check("=" in item and not item.startswith("="),
                   f"override {item!r} is not of the form key=value (e.g. ae.lr=1e-3)")
        for item in overrides:  # one at a time, so that a parse error names its override
            try:
                schema = OmegaConf.merge(schema, OmegaConf.from_dotlist([item]))
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        cfg = OmegaConf.to_object(schema)
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e)) from None
    except ConfigError:
        raise
    except ValueError as e:  # __post_init__ checks wrapped by OmegaConf
        raise ConfigError(str(e).splitlines()[0]) from None
    assert isinstance(cfg, Config)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A dataclass (or mapping) as plain JSON types."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(data))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_digest(section: Any) -> str:
    """Stable short hash of a config section (what a checkpoint must agree with to resume)."""
    blob = json.dumps(to_dict(section), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: Config, run_dir: Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` atomically."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
