"""The `sindy:` section of the config: equation discovery (analysis/sindy_job.py) and its library."""

from __future__ import annotations

from dataclasses import dataclass, field

from configs.checks import _check, _non_negative, _path, _positive

# The library family names a config may list. The registry is analysis/sindy/registry.py (LIBRARY_FAMILIES: each
# name with the kinds it builds); configs sit below analysis and cannot import it, so this is the names alone,
# held equal to the registry by tests/analysis/test_library_config.py.
LIBRARY_FAMILY_NAMES = ("polynomial", "time", "time_state", "exp", "tanh", "terms", "mixture")


@dataclass
class SindyLibraryConfig:
    """The SINDy candidate library (analysis/sindy/build.py, build_library); defaults chosen on known systems
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
    component) | regimes (r_k(z, t) z_j, one per component and dimension: a linear regime per component) |
    gaussian (the closed-form eps of the mixture's moment-matched Gaussian, one per dimension)."""
    gated: list[str] = field(default_factory=lambda: ["tanh"])
    """Families kept per dimension only if they earn it on held-out data: the best held-out unexplained variance
    with them must be at most `gate` x the best without them (else the dimension is fitted without them)."""
    gate: float = 0.5
    """The factor of `gated` (0 < gate <= 1; 1 keeps a family whenever it helps at all)."""
    terms: list[str] = field(default_factory=list)
    """User terms for the `terms` family, e.g. ["z0 * z1", "exp(-t) * z3"]: numbers, z0..z{d-1}, t, + - * / **,
    exp log tanh sin cos sqrt abs; parsed against this grammar (by analysis/sindy/library.py, checked before any work),
    never evaluated as code."""

    def __post_init__(self) -> None:
        known = LIBRARY_FAMILY_NAMES
        _check(
            self.preset in ("standard", "reference"),
            f"sindy.library.preset must be standard | reference, got {self.preset!r}",
        )
        bad = [f for f in self.families if f not in known]
        _check(not bad, f"sindy.library.families: unknown family {bad[0] if bad else ''!r}; known: {', '.join(known)}")
        _check(
            len(set(self.families)) == len(self.families), f"sindy.library.families repeats a family: {self.families}"
        )
        _check(self.preset == "reference" or bool(self.families), "sindy.library.families is empty; list at least one")
        _check(1 <= self.poly_degree <= 4, f"sindy.library.poly_degree must be 1..4, got {self.poly_degree}")
        _check(
            self.time_basis in ("poly", "spline"),
            f"sindy.library.time_basis must be poly | spline, got {self.time_basis!r}",
        )
        _check(1 <= self.time_degree <= 8, f"sindy.library.time_degree must be 1..8, got {self.time_degree}")
        _check(
            2 <= self.spline_basis <= 32
            and (self.time_basis != "spline" or self.spline_basis > min(self.time_degree, 5)),
            f"sindy.library.spline_basis must be 2..32 and > the spline degree, got {self.spline_basis}",
        )
        _check(
            1 <= self.time_state_degree <= 3,
            f"sindy.library.time_state_degree must be 1..3, got {self.time_state_degree}",
        )
        _check(
            self.tanh_on in ("principal", "coordinates"),
            f"sindy.library.tanh_on must be principal | coordinates, got {self.tanh_on!r}",
        )
        _check(self.tanh_projections >= 1, f"sindy.library.tanh_projections must be >= 1, got {self.tanh_projections}")
        _check(
            bool(self.tanh_scales) and all(c > 0 for c in self.tanh_scales),
            f"sindy.library.tanh_scales must be a non-empty list of numbers > 0, got {self.tanh_scales}",
        )
        _check(
            0 <= self.tanh_time_degree <= 8, f"sindy.library.tanh_time_degree must be 0..8, got {self.tanh_time_degree}"
        )
        _check(
            all(f in known for f in self.gated),
            f"sindy.library.gated: unknown family in {self.gated}; known: {', '.join(known)}",
        )
        _check(0 < self.gate <= 1, f"sindy.library.gate must be in (0, 1], got {self.gate}")
        _check(
            bool(self.mixture_features)
            and all(f in ("eps", "posterior", "regimes", "gaussian") for f in self.mixture_features)
            and len(set(self.mixture_features)) == len(self.mixture_features),
            "sindy.library.mixture_features must be a non-empty subset of [eps, posterior, regimes, gaussian], got "
            f"{self.mixture_features}",
        )
        _check(
            "terms" not in self.families or bool(self.terms),
            "sindy.library.families has 'terms' but sindy.library.terms is empty",
        )


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
    Gaussian data the exact drift is uncoupled there, analysis/sindy/coordinates.py) | auto: fit in both and keep the
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
    exactly as p(t) z + q(t) eps_fit, p and q known from the schedule and sampler (analysis/sindy/theory.py) | x0:
    the same eps model, fitted by the error of the clean sample it implies, x0 = (z - s eps) / a, so each step's rows
    weigh (s/a)^2 (large at high noise; the least squares of x0 space for this model, exactly) | auto: fit in all
    three and keep the space whose rollouts from sindy.polish_noises training noises end nearest the DiT's samples
    (analysis/job/space_choice.py; three fits' time, no comparison target). The report gives the held-out R^2 of
    both eps and drift and the rollouts either way."""
    validation_noises: int = 400
    """Held-out noises the chosen equations are integrated from, decoded and classified against the DiT's
    samples from the same noise (class agreement, FD-MNIST, confidence; analysis/job/validation.py); at most the
    held-out trajectories. 0 disables the validation."""
    queries: int = 0
    """Forward-noised training latents per sampler step, labelled by the EMA DiT, added to the training rows
    (analysis/job/queries.py: the DiT's own training distribution; the trajectories alone give one state per
    trajectory and step). Needs the job's own trajectories and targets eps or drift; 0 adds none."""
    dagger_rounds: int = 0
    """Rounds of DAgger (analysis/job/queries.py): roll the fitted equations out from sindy.dagger_noises training
    noises, have the DiT label every state they visit, add those rows and fit again (in the chosen coordinates).
    Needs the job's own trajectories and targets eps or drift; 0 skips it."""
    dagger_noises: int = 1000
    """Initial noises (of training trajectories) each DAgger round rolls the equations out from."""
    polish_iterations: int = 0
    """Levenberg-Marquardt steps that move the chosen equations' nonzero coefficients (the terms stay) so that
    their Euler rollouts from training noises pass through the DiT's trajectories (analysis/sindy/polish.py); each
    step costs one rollout per nonzero coefficient. The report's regression R^2 are those of the fit before it;
    the yardstick table scores the polished equations. 0 skips it."""
    polish_noises: int = 200
    """Training trajectories the polishing matches."""
    weighting: str = "none"
    """Regression row weights per sampler step. none: every row alike (in drift space the eps error is then
    weighted by q(t)^2, large at t = 1) | sensitivity: by how far an eps error at that step moves the final
    sample, measured on the DiT (analysis/job/queries.py step_sensitivity), so the fit spends its terms where the
    generated sample depends on them; needs the job's own trajectories and a sampler with a known linear part."""
    sensitivity_noises: int = 64
    """Initial noises the step sensitivity of sindy.weighting=sensitivity is averaged over (at most one block's)."""
    yardsticks: bool = True
    """Score the equations beside their yardsticks from the same held-out noises (analysis/job/yardsticks.py): the
    DiT's raw weights (ceiling), the DiT with iid eps noise at R^2 0.999-0.95 (sensitivity), the closed-form
    Gaussian and mixture (floors) and a dense per-step affine fit (reference); report.md and equations.json."""
    peer_runs: list[str] = field(default_factory=list)
    """Run folders whose EMA DiT was trained like this run's, on the same autoencoder, with another run.seed
    (`make peer` trains runs/<name>-seed1). Each is a yardstick row: how often an equally good DiT gives the same
    digit from the same noise (the reachable yardstick for the equations, beside the raw-weights ceiling, which is
    the same training). Needs the job's own trajectories and a deterministic sampler; empty: no peer rows."""
    mixture_components: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20])
    """Gaussian-mixture view of the denoiser (analysis/sindy/mixture.py): component counts tried by EM on the
    training latents, the best by held-out (test split) log-likelihood is kept; empty disables the view."""
    mixture_samples: int = 10000
    """Training latents (a seeded random subset) the mixtures are fitted to; EM costs grow with it (local run,
    K up to 20: about 25 s of EM for 20,000 latents on 2 busy cores, half that for 10,000)."""
    mixture_fit: str = "em"
    """What the library's mixture family is fitted to: em (the training latents, by EM; never sees the DiT) | dit
    (EM's chosen mixture, then its constants refitted so that its closed-form eps* matches the DiT's eps on the
    training trajectories and any query states: analysis/sindy/mixture.py distill_mixture). Either way the family is
    a closed-form mixture whose constants the report lists; the floor yardstick stays EM's mixture."""
    mixture_distill_iterations: int = 600
    """Adam steps of sindy.mixture_fit=dit (10 random steps x 600 rows each; about 5 s for K = 20 on 2 cores)."""

    def __post_init__(self) -> None:
        _check(
            self.sampler in ("ddim", "ode", "ddpm"), f"sindy.sampler must be ddim | ode | ddpm, got {self.sampler!r}"
        )
        _check(
            self.target in ("drift", "central_diff"), f"sindy.target must be drift | central_diff, got {self.target!r}"
        )
        _positive(
            "sindy",
            n_trajectories=self.n_trajectories,
            block_size=self.block_size,
            pca_components=self.pca_components,
            chunk_size=self.chunk_size,
        )
        _non_negative("sindy", alpha=self.alpha)
        _check(
            self.threshold_tol <= 1,
            f"sindy.threshold_tol must be in 0..1 (relative to the best unexplained "
            f"variance), got {self.threshold_tol}",
        )
        _check(self.poor_r2 <= 1, f"sindy.poor_r2 must be <= 1 (an R^2), got {self.poor_r2}")
        _check(1 <= self.time_windows <= 50, f"sindy.time_windows must be 1..50, got {self.time_windows}")
        _check(0 < self.heldout_fraction < 1, f"sindy.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _check(self.n_thresholds >= 2, f"sindy.n_thresholds must be >= 2, got {self.n_thresholds}")
        _check(self.bootstrap_groups >= 2, f"sindy.bootstrap_groups must be >= 2, got {self.bootstrap_groups}")
        _non_negative(
            "sindy",
            threshold_tol=self.threshold_tol,
            n_bootstrap=self.n_bootstrap,
            rollouts=self.rollouts,
            workers=self.workers,
            num_cpus=self.num_cpus,
            max_memory_gb=self.max_memory_gb,
        )
        _check(self.optimizer in ("stlsq", "sr3"), f"sindy.optimizer must be stlsq | sr3, got {self.optimizer!r}")
        _positive("sindy", sr3_nu=self.sr3_nu, term_budget=self.term_budget)
        _check(self.ceiling_degree in (0, 1, 2, 3), f"sindy.ceiling_degree must be 0..3, got {self.ceiling_degree}")
        _check(self.integrator in ("euler", "rk4"), f"sindy.integrator must be euler | rk4, got {self.integrator!r}")
        _check(self.device in ("auto", "cpu", "cuda"), f"sindy.device must be auto | cpu | cuda, got {self.device!r}")
        _check(
            self.trajectories_order in ("descending", "ascending"),
            f"sindy.trajectories_order must be descending | ascending, got {self.trajectories_order!r}",
        )
        _check(
            self.coordinates in ("auto", "latent", "modes"),
            f"sindy.coordinates must be auto | latent | modes, got {self.coordinates!r}",
        )
        _check(
            self.fit_space in ("drift", "eps", "x0", "auto"),
            f"sindy.fit_space must be drift | eps | x0 | auto, got {self.fit_space!r}",
        )
        _check(
            self.fit_space == "drift" or self.target == "drift",
            f"sindy.fit_space={self.fit_space} fits the recorded eps and composes the drift; it cannot be combined with "
            f"sindy.target={self.target} (set sindy.target=drift or sindy.fit_space=drift)",
        )
        _non_negative("sindy", validation_noises=self.validation_noises, queries=self.queries)
        _check(
            self.weighting in ("none", "sensitivity"),
            f"sindy.weighting must be none | sensitivity, got {self.weighting!r}",
        )
        _check(
            self.fit_space not in ("x0", "auto") or self.weighting == "none",
            f"sindy.fit_space={self.fit_space} weighs the steps by (s/a)^2 in x0 space, which sindy.weighting="
            "sensitivity would replace; set sindy.weighting=none or sindy.fit_space=eps",
        )
        _positive("sindy", sensitivity_noises=self.sensitivity_noises, dagger_noises=self.dagger_noises)
        _non_negative("sindy", dagger_rounds=self.dagger_rounds, polish_iterations=self.polish_iterations)
        for peer in self.peer_runs:
            _check(isinstance(peer, str) and bool(peer), f"sindy.peer_runs takes run folders, got {peer!r}")
            _path("sindy.peer_runs", peer)
        _positive("sindy", polish_noises=self.polish_noises)
        _check(
            all(isinstance(k, int) and k >= 1 for k in self.mixture_components),
            f"sindy.mixture_components must be a list of ints >= 1, got {list(self.mixture_components)}",
        )
        _positive("sindy", mixture_samples=self.mixture_samples)
        _check(self.mixture_fit in ("em", "dit"), f"sindy.mixture_fit must be em | dit, got {self.mixture_fit!r}")
        _positive("sindy", mixture_distill_iterations=self.mixture_distill_iterations)
        _check(
            self.mixture_fit == "em" or (self.library.preset != "reference" and "mixture" in self.library.families),
            "sindy.mixture_fit=dit refits the library's mixture family to the DiT, but sindy.library.families does "
            "not list mixture (or the preset is reference); set sindy.mixture_fit=em",
        )
        if self.trajectories:
            _path("sindy.trajectories", self.trajectories)
