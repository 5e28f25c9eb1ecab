"""The equations beside their yardsticks, from the same held-out noise (issue 22).

Each generator starts from the initial noise of the held-out DiT trajectories the equations are validated on
and runs the sampler's grid to t = 0; its end states are decoded and classified like the DiT's own samples:

    ceiling     the DiT's raw weights instead of its EMA weights (another DiT as close as training gets)
    peer        the EMA DiT of each sindy.peer_runs folder: the same recipe on the same autoencoder with another
                seed (`make peer`), an equally good model of the data that did not share this DiT's training; on
                the make-run DiT it gives the same digit about as often as the best equations do
    sensitivity the EMA DiT with iid noise on its eps at R^2 0.999 / 0.99 / 0.97 / 0.95 (translates an eps R^2
                into agreement, whatever the model)
    floors      the closed-form eps* of a Gaussian (K = 1) and of the chosen Gaussian mixture of the training
                latents (analysis/sindy/mixture.py): no fit to the DiT at all
    reference   a dense per-step affine eps = A_k z + b_k fitted by least squares on the training trajectories
    equations   the report's equations

The DiT-based rows run models.diffusion.sample on the latent (the sampler itself); the others integrate
p(t) z + q(t) eps(z, t) with Euler on the sampler's grid, which is that sampler exactly (analysis/sindy/theory.py).
Only deterministic samplers (DDIM with eta = 0, the probability-flow ODE) give "the same noise" a meaning for a
second DiT; the stochastic DDPM's rows are skipped with that reason.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from analysis.job.plan import Plan
from analysis.job.trajectories import TrajectorySet
from analysis.job.validation import windowed_r2
from analysis.job.views import heldout_block, latent_mixture, make_decoder, run_schedule
from analysis.quality import scoring as quality
from analysis.quality.agreement import (
    NOISE_R2,
    end_state_errors,
    gap_share,
    noise_sigma,
    paired_difference,
    same_digit,
)
from analysis.sindy.coordinates import Coordinates
from analysis.sindy.integration import integrate
from analysis.sindy.targets import time_windows
from analysis.sindy.theory import noise_levels, state_index
from configs.schema import Config
from models.artifacts import load_denoiser
from models.classifier import TRAIN_HINT, load_classifier
from models.diffusion import sample

__all__ = ["DETERMINISTIC", "measure_yardsticks", "dense_affine"]

DETERMINISTIC = ("ddim", "ode")
MAX_DENSE_TRAJECTORIES = 4000  # the dense reference's least squares: (d + 1)^2 per step, bounded memory


def dense_affine(z: np.ndarray, eps: np.ndarray, ridge: float = 1e-8) -> np.ndarray:
    """Per-step least squares eps_k = W_k [z_k, 1]: z (T, n, d), eps (T, n, d) -> W (T, d + 1, d).

    The dense reference of the table: d (d + 1) coefficients per step, no sparsity, no shared time law.
    """
    T, n, d = z.shape
    X = np.concatenate([z, np.ones((T, n, 1))], axis=2)
    G = np.einsum("tni,tnj->tij", X, X) + ridge * n * np.eye(d + 1)
    return np.linalg.solve(G, np.einsum("tni,tnj->tij", X, eps))


def _rollout_fit_coords(eps_fn, lp, c0: np.ndarray, t: np.ndarray) -> np.ndarray:
    """End states (n, d) of Euler on the sampler's grid with drift p z + q eps_fn(z, t) (NaN rows: diverged)."""
    sim, _ = integrate(lp.composed_rhs(eps_fn), c0, t, "euler")
    return sim[-1]


def _dit_rollout(model, schedule, sampler: str, z_T, eps_noise: np.ndarray | None, seed: int):
    """The DiT's own sampler from z_T (n, N, C): end states (n, D); with eps_noise (m, D), m rollouts in one batch
    (a batch of m n is cheaper per sample on a CPU than m batches of n), rollout i with iid N(0, diag(eps_noise[i]^2))
    added to every eps call: end states (m, n, D)."""

    n = len(z_T)
    if eps_noise is None:
        eps_model, m = model, 1
    else:
        m = len(eps_noise)
        sig = torch.as_tensor(np.asarray(eps_noise), dtype=torch.float32).reshape(m, 1, *z_T.shape[1:])
        gen = torch.Generator().manual_seed(seed)

        def eps_model(x, tt):
            return model(x, tt) + (sig * torch.randn((m, n, *x.shape[1:]), generator=gen)).reshape(x.shape)

    noise = z_T.repeat(m, *([1] * (z_T.dim() - 1)))
    with torch.no_grad():
        x0 = sample(eps_model, schedule, tuple(noise.shape), sampler=sampler, noise=noise).x0
    return x0.reshape(n, -1) if eps_noise is None else x0.reshape(m, n, -1)


def _dit_eps(model, z: np.ndarray, T: int, shape: tuple) -> np.ndarray:
    """The model's eps at recorded states z (T+1, n, D) (state k is the input of network step T-1-k): (T, n, D)."""

    out = np.empty((T, *z.shape[1:]), np.float64)
    with torch.no_grad():
        for k in range(T):
            x = torch.from_numpy(np.ascontiguousarray(z[k], np.float32)).reshape(-1, *shape)
            tt = torch.full((x.shape[0],), T - 1 - k, dtype=torch.long)
            out[k] = model(x, tt).reshape(x.shape[0], -1).double().numpy()
    return out


def _fit_coords_eps(fn, c: np.ndarray, t: np.ndarray) -> np.ndarray:
    """eps_fn at every recorded state (T+1, n, d) but the last: (T, n, d)."""
    return np.stack([fn(c[k], float(t[k])) for k in range(len(t) - 1)])


def measure_yardsticks(
    cfg: Config,
    plan: Plan,
    tset: TrajectorySet,
    coords: Coordinates,
    split: np.ndarray,
    views: dict,
    equations_eps,
    equations_terms: int | None = None,
) -> dict:
    """Every generator of the module docstring from the held-out noise of ``validate_equations``.

    Args:
        cfg, plan, tset, coords, split: the job's.
        views: theory_views' output ("linear_part", "mixture", "_mixture").
        equations_eps: f(c (n, d), t float) -> eps (n, d) in fit coordinates: the equations' eps model.
        equations_terms: the equations' terms in all dimensions (the table's "terms").

    Returns:
        JSON-able {"n_noises", "confident_threshold", "rows": [{"name", "kind", "terms", "eps_r2_median",
        "eps_r2_windows", "same_digit", "ci95", "confident", "final_error", "per_sample_r2", "diverged",
        "fd_mnist", "mean_confidence", ...}], "headline": {...}, "seconds"} or {"skipped": reason}.
    """

    s = cfg.sindy
    sampler = tset.manifest.get("sampler")
    lp = views.get("linear_part")
    if tset.source != "generated" or lp is None:
        return {"skipped": "the yardsticks need trajectories this job generated from a DiT of the run"}
    n = min(s.validation_noises, int((split < 0).sum()))
    if n == 0:
        return {"skipped": "sindy.validation_noises=0"}
    t0 = time.time()
    T = tset.T
    idx = np.flatnonzero(split < 0)[:n]
    lat = tset.select(idx)  # the DiT's latent: z (T+1, n, D), eps (T, n, D)
    ho = heldout_block(plan, tset, coords, split, n)  # the same trajectories in fit coordinates
    t = ho["t"]
    edges = time_windows(t, s.time_windows)
    shape = tuple(plan.meta["latent_shape"])
    eps_ref = coords.velocities(lat.eps)  # (T, n, d) the EMA DiT's eps in fit coordinates
    ref_end = ho["z"][-1]
    schedule = run_schedule(plan)
    a, sg = noise_levels(schedule)
    rows: list[dict] = []
    ends: dict[str, np.ndarray] = {}

    def add(name: str, kind: str, end: np.ndarray, eps_pred: np.ndarray | None, terms, note: str = "") -> None:
        row = {"name": name, "kind": kind, "terms": terms, "note": note}
        if eps_pred is not None:
            w = windowed_r2(eps_ref, eps_pred, t[:-1], edges)
            row["eps_r2_median"] = w["median"]
            row["eps_r2_windows"] = [
                {"t_from": x["t_from"], "t_to": x["t_to"], "median": float(np.nanmedian(x["r2"]))} for x in w["windows"]
            ]
        row.update(end_state_errors(end, ref_end))
        rows.append(row)
        ends[name] = end

    deterministic = sampler in DETERMINISTIC
    skipped = {}
    if deterministic:
        ema, sched_t, _ = load_denoiser(plan.run_dir, "cpu", ema=True)

        z_T = torch.from_numpy(np.ascontiguousarray(lat.z[0], np.float32)).reshape(n, *shape)

        def add_dit(name: str, kind: str, model, note: str) -> None:
            """Another DiT's own sampler from the same noise, and its eps at the EMA DiT's held-out states."""
            end = coords.states(_dit_rollout(model, sched_t, sampler, z_T, None, s.seed).double().numpy())
            add(name, kind, end, coords.velocities(_dit_eps(model, lat.z, T, shape)), None, note)

        raw_file = plan.run_dir / "dit.safetensors"
        if raw_file.is_file():
            raw, _, _ = load_denoiser(plan.run_dir, "cpu", ema=False)
            add_dit(
                "DiT, raw weights instead of EMA", "ceiling", raw, "another DiT as close to this one as training gets"
            )
        else:
            skipped["ceiling"] = f"{raw_file} not found (the raw weights are the ceiling)"
        for peer in plan.peers:
            other, _, _ = load_denoiser(peer["dir"], "cpu", ema=True)
            add_dit(
                f"DiT of {peer['dir']} (same recipe, another seed)",
                "peer",
                other,
                "an equally good DiT that did not share this one's training",
            )
        sigs = [noise_sigma(lat.eps, r2) for r2 in NOISE_R2]
        noisy_ends = _dit_rollout(ema, sched_t, sampler, z_T, np.stack(sigs), s.seed + 1).double().numpy()
        for i, (r2, sig) in enumerate(zip(NOISE_R2, sigs)):
            noisy = lat.eps + sig * np.random.default_rng(s.seed + 100 + i).standard_normal(lat.eps.shape)
            end = coords.states(noisy_ends[i])
            add(f"EMA DiT + iid eps noise, R^2 {r2:g}", "sensitivity", end, coords.velocities(noisy), None)
    else:
        skipped["ceiling"] = skipped["sensitivity"] = (
            f"sampler {sampler} is stochastic: a second DiT from the same initial noise would also need the same "
            "injected noise; use sindy.sampler=ddim or ode for these rows"
        )
        if plan.peers:
            skipped["peer"] = skipped["ceiling"]

    mixture = views.get("_mixture")
    if mixture is None:
        mv = views.get("mixture")
        skipped["floors"] = mv.get("skipped", "no mixture view") if isinstance(mv, dict) else "no mixture view"
    else:
        fitted = latent_mixture(cfg, plan, coords)
        ks = [m.K for m in fitted["mixtures"]]
        floors = []
        if 1 in ks:
            floors.append(("closed-form Gaussian of the training latents", fitted["mixtures"][ks.index(1)]))
        else:
            skipped["gaussian"] = "sindy.mixture_components has no 1 (the Gaussian floor is its K = 1)"
        chosen = mixture[0]
        if chosen.K != 1:
            floors.append((f"closed-form {chosen.K}-component mixture of the training latents", chosen))
        for name, mix in floors:

            def eps_fn(c, tt, mix=mix):
                k = int(state_index(tt, T))
                return mix.eps(c, a[k], sg[k])

            end = _rollout_fit_coords(eps_fn, lp, ho["z"][0], t)
            terms = mix.K * (1 + coords.dim + coords.dim * (coords.dim + 1) // 2)
            add(name, "floor", end, _fit_coords_eps(eps_fn, ho["z"], t), terms, "no fit to the DiT")

    train_idx = np.flatnonzero(split >= 0)[:MAX_DENSE_TRAJECTORIES]
    if len(train_idx) > coords.dim + 1:
        tr = tset.select(train_idx)
        W = dense_affine(coords.states(tr.z[:-1]), coords.velocities(tr.eps))

        def dense_fn(c, tt):
            k = int(state_index(tt, T))
            return np.concatenate([c, np.ones((len(c), 1))], axis=1) @ W[k]

        end = _rollout_fit_coords(dense_fn, lp, ho["z"][0], t)
        add(
            "dense per-step affine eps = A_k z + b_k",
            "reference",
            end,
            _fit_coords_eps(dense_fn, ho["z"], t),
            int(W.size),
            f"least squares on {len(train_idx)} training trajectories",
        )
    else:
        skipped["reference"] = f"{len(train_idx)} training trajectories: too few for a per-step affine fit"

    end = _rollout_fit_coords(equations_eps, lp, ho["z"][0], t)
    add("the equations", "equations", end, _fit_coords_eps(equations_eps, ho["z"], t), equations_terms)

    hits = _classify(cfg, plan, coords, rows, ends, ref_end, skipped)
    out = {
        "levers": {
            "fit_space": plan.fit_space or s.fit_space,
            "queries": s.queries,
            "dagger_rounds": s.dagger_rounds,
            "weighting": s.weighting,
            "mixture_features": list(s.library.mixture_features),
            "polish_iterations": s.polish_iterations,
            "term_budget": s.term_budget,
        },
        "n_noises": n,
        "sampler": sampler,
        "rows": rows,
        "skipped": skipped,
        "headline": headline(rows, hits),
        "seconds": round(time.time() - t0, 2),
    }
    return out


def _classify(cfg: Config, plan: Plan, coords: Coordinates, rows, ends, ref_end, skipped) -> dict[str, np.ndarray]:
    """Decode every generator's end states and the DiT's, classify, and add the image figures to the rows.

    Returns each row's per-noise hits (its sample has the DiT's class), for the paired comparisons of the
    headline; empty without a classifier."""

    path = Path(cfg.dit.classifier)
    if not path.is_file():
        skipped["images"] = f"no MNIST classifier at {path} ({TRAIN_HINT})"
        return {}
    dec = make_decoder(plan, coords)
    clf = load_classifier(path, "cpu")
    shards = cfg.data.shards if cfg.data.shards and Path(cfg.data.shards).is_dir() else None
    ref_stats = quality.load_reference_stats(clf, shards)

    def look(end: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        x = np.clip(np.nan_to_num(dec(end).astype(np.float32), nan=0.5), 0.0, 1.0)
        _, probs = quality.features(clf, x)
        sc = quality.score(x, clf, ref_stats)
        return probs.argmax(axis=1), probs.max(axis=1), sc

    ref_labels, ref_conf, ref_score = look(ref_end)
    skipped["dit_images"] = {
        "fd_mnist": ref_score["fd_mnist"],
        "mean_confidence": ref_score["mean_confidence"],
        "confident_share": float(np.mean(ref_conf >= 0.9)),
    }
    hits = {}
    for row in rows:
        labels, _, sc = look(ends[row["name"]])
        agree = same_digit(labels, ref_labels, ref_conf)
        row["same_digit"], row["ci95"], row["confident"] = agree["same_digit"], agree["ci95"], agree["confident"]
        row["fd_mnist"], row["mean_confidence"] = sc["fd_mnist"], sc["mean_confidence"]
        hits[row["name"]] = labels == ref_labels
    return hits


def headline(rows: list[dict], hits: dict[str, np.ndarray] | None = None) -> dict:
    """The share of the floor-to-ceiling gap in same digit (and in final error) the equations close, and, with peer
    rows, the equations against the mean peer (how far they are from what an equally good DiT reaches).

    With ``hits`` (each row's per-noise hits, from the same noises) the difference to the peers also gets its
    paired 95% interval and, for one peer, the counts of noises only one of the two gets right."""
    by_kind = {r["kind"]: r for r in rows if r["kind"] in ("ceiling", "equations")}
    floor = next((r for r in rows if r["kind"] == "floor"), None)  # the Gaussian comes first
    eq, ceil = by_kind.get("equations"), by_kind.get("ceiling")
    out: dict = {"floor": floor["name"] if floor else None, "ceiling": ceil["name"] if ceil else None}
    peers = [r for r in rows if r["kind"] == "peer" and "same_digit" in r]
    if eq and peers and "same_digit" in eq:
        peer = float(np.mean([r["same_digit"] for r in peers]))
        out["peer_same_digit"] = peer
        out["same_digit_minus_peer"] = eq["same_digit"] - peer
        if hits and eq["name"] in hits and all(r["name"] in hits for r in peers):
            pd = paired_difference(hits[eq["name"]], np.stack([hits[r["name"]] for r in peers]))
            out["same_digit_minus_peer_ci95"] = pd["ci95"]
            if "only_this" in pd:
                out["noises_only_equations"], out["noises_only_peer"] = pd["only_this"], pd["only_other"]
        if floor:
            out["same_digit_floor_to_peer_share"] = gap_share(eq["same_digit"], floor["same_digit"], peer)
    if eq and floor and ceil and "same_digit" in eq:
        out["same_digit_gap_share"] = gap_share(eq["same_digit"], floor["same_digit"], ceil["same_digit"])
        out["same_digit_above_floor"] = eq["same_digit"] - floor["same_digit"]
    if eq and floor and ceil:
        # lower is better: the ceiling's error is the best, so the share is (floor - eq) / (floor - ceiling)
        out["final_error_gap_share"] = gap_share(-eq["final_error"], -floor["final_error"], -ceil["final_error"])
    return out
