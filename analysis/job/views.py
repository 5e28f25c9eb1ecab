"""The views of the SINDy job's chosen equations beside the fit: the sampler's known linear part (analysis/sindy/theory.py:
held-out R^2 in eps and in drift space), the Gaussian-mixture view of the denoiser (analysis/sindy/mixture.py: its
closed-form eps* scored against the DiT with no fitting) and what the equations generate from held-out noise
(analysis/job/validation.py). This module is their glue to the run folder (weights, latents, classifier).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from safetensors.torch import load_file

from analysis.job.plan import Plan
from analysis.job.trajectories import TrajectorySet
from analysis.job.validation import validate, windowed_r2
from analysis.sindy.coordinates import Coordinates
from analysis.sindy.library import Library
from analysis.sindy.mixture import distill_mixture, fit_mixture
from analysis.sindy.targets import time_windows
from analysis.sindy.theory import SAMPLERS_WITH_THEORY, LinearPart, linear_part, noise_levels, state_index
from configs.schema import Config
from models.artifacts import load_autoencoder, load_latent_data, load_latent_stats
from models.schedules import schedule_for

__all__ = [
    "make_decoder",
    "decode_end_states",
    "run_schedule",
    "heldout_block",
    "theory_views",
    "latent_mixture",
    "distilled_mixture",
    "mixture_view",
    "validate_equations",
]


def make_decoder(plan: Plan, coords: Coordinates):
    """c (r, d) fit coordinates -> (r, 28, 28) images in [0, 1] through the run's autoencoder; grey for non-finite rows."""

    ae, _ = load_autoencoder(plan.run_dir, "cpu")
    mean, std = load_latent_stats(plan.run_dir)
    shape = (
        tuple(plan.meta["latent_shape"])
        if plan.meta is not None
        else tuple(json.loads((plan.run_dir / "dit.json").read_text())["latent_shape"])
    )

    def dec(c: np.ndarray) -> np.ndarray:
        ok = np.all(np.isfinite(c), axis=1)
        z = torch.from_numpy(np.nan_to_num(coords.inverse(c))).float().reshape(-1, *shape)
        with torch.no_grad():
            img = torch.sigmoid(ae.decode(z * std + mean)).numpy()[:, 0]
        img[~ok] = 0.5  # a diverged rollout has no image: grey
        return img

    return dec


def run_schedule(plan: Plan):
    """The run's noise schedule, from its dit.json."""

    meta = json.loads((plan.run_dir / "dit.json").read_text())
    return schedule_for(meta["kind"], meta["schedule_kind"], meta["timesteps"])


def heldout_block(plan: Plan, tset: TrajectorySet, coords: Coordinates, split: np.ndarray, n: int) -> dict:
    """The first n held-out trajectories in fit coordinates: z (T+1, n, d), eps and drift (T, n, d) or None.

    Read once per job (``plan.heldout_cache``) and sliced: trajectory axis 1 in every array.
    """
    idx = np.flatnonzero(split < 0)[:n]
    cache = plan.heldout_cache
    if cache is None or len(cache["index"]) < len(idx):
        blk = tset.select(idx)
        cache = plan.heldout_cache = {
            "index": idx,
            "t": blk.t,
            "z": coords.states(blk.z),
            "eps": None if blk.eps is None else coords.velocities(blk.eps),
            "drift": None if blk.drift is None else coords.velocities(blk.drift),
        }
    m = len(idx)
    return {
        "index": cache["index"][:m],
        "t": cache["t"],
        **{k: None if cache[k] is None else cache[k][:, :m] for k in ("z", "eps", "drift")},
    }


def theory_views(
    cfg: Config, plan: Plan, tset: TrajectorySet, coords: Coordinates, split: np.ndarray, lib: Library, xi: np.ndarray
) -> dict:
    """Held-out R^2 of the chosen model in eps and drift space, and the Gaussian-mixture view.

    Returns:
        {"linear_part": LinearPart or None, "fit_space": dict (JSON-able) or {"skipped": reason},
        "mixture": dict or {"skipped": reason}, "_mixture": (GaussianMixtureEps, rhs) for the rollouts}.
    """

    s = cfg.sindy
    views: dict = {"linear_part": None}
    sampler = tset.manifest.get("sampler")
    if tset.source != "generated" or sampler not in SAMPLERS_WITH_THEORY:
        reason = (
            f"these trajectories ({tset.source}, sampler {sampler}) carry no recorded eps and no known schedule"
            if tset.source != "generated"
            else f"sampler {sampler} has no closed-form linear part"
        )
        views["fit_space"] = views["mixture"] = {"skipped": reason}
        return views
    t0 = time.time()
    schedule = run_schedule(plan)
    p, q = linear_part(schedule, sampler)
    offset = coords.components @ coords.mean if coords.kind != "latent" else None  # C z = c + C m
    lp = views["linear_part"] = LinearPart(p, q, offset)
    # R^2 on up to 2,000 held-out trajectories (100k rows at T = 50): enough for 4 digits, bounded cost.
    ho = heldout_block(plan, tset, coords, split, min(int((split < 0).sum()), 2000))
    edges = time_windows(tset.block(0).t, s.time_windows)
    T, n, d = ho["eps"].shape
    zs, ts = ho["z"][:-1].reshape(-1, d), np.repeat(ho["t"][:-1], n)
    pred = np.concatenate([lib.transform(zs[i : i + 8192], ts[i : i + 8192]) @ xi.T for i in range(0, len(zs), 8192)])
    if plan.targets[0] == "eps":  # fit_space eps or x0: the library models eps
        eps_pred, drift_pred = pred, lp.drift(zs, ts, pred)
    else:
        eps_pred, drift_pred = lp.eps(zs, ts, pred), pred
    shape = (T, n, d)
    views["fit_space"] = {
        "fit_space": plan.fit_space or s.fit_space,
        "choice": plan.space_choice,
        "sampler": sampler,
        "n_heldout": n,
        "theory": lp.describe(sampler),
        "p": p.tolist(),
        "q": q.tolist(),
        "eps": windowed_r2(ho["eps"], eps_pred.reshape(shape), ho["t"][:-1], edges),
        "drift": windowed_r2(ho["drift"], drift_pred.reshape(shape), ho["t"][:-1], edges),
        "seconds": round(time.time() - t0, 2),
    }
    if not s.mixture_components:
        views["mixture"] = {"skipped": "sindy.mixture_components is empty"}
    elif not (coords.kind == "latent" or coords.is_rotation):
        views["mixture"] = {
            "skipped": f"the mixture view works in the latent's own coordinates or a rotation of "
            f"them; this fit uses {coords.kind} coordinates of a "
            f"{coords.components.shape[1]}-D latent"
        }
    elif not (plan.run_dir / "latents" / "train.safetensors").is_file():
        views["mixture"] = {
            "skipped": f"{plan.run_dir / 'latents' / 'train.safetensors'} not found (the mixture is "
            "fitted to the training latents; run training/encode_latents.py for this run)"
        }
    else:
        views["mixture"], views["_mixture"] = mixture_view(cfg, plan, ho, lp, schedule, coords, edges)
        if s.mixture_fit == "dit":
            dist = distilled_mixture(cfg, plan, tset, coords, split)
            a, sg = noise_levels(schedule)
            k = state_index(ts, T)
            eps_m = dist["mix"].eps(zs, a[k], sg[k]).reshape(T, n, d)
            views["mixture"]["distilled"] = {
                **dist["info"],
                "k": dist["mix"].K,
                "eps": windowed_r2(ho["eps"], eps_m, ho["t"][:-1], edges),
                "drift": windowed_r2(
                    ho["drift"], lp.drift(zs, ts, eps_m.reshape(-1, d)).reshape(T, n, d), ho["t"][:-1], edges
                ),
                "weights": dist["mix"].weights.tolist(),
                "means": dist["mix"].means.tolist(),
                "covariances": dist["mix"].covariances.tolist(),
            }
    return views


def latent_mixture(cfg: Config, plan: Plan, coords: Coordinates) -> dict:
    """The Gaussian mixtures of the run's training latents in ``coords``, K by held-out likelihood; kept in ``plan``
    for the library and the mixture view. EM runs once in the latent; rotated coordinates take the latent's mixtures
    rotated (the noising a x + s eps keeps its form under a rotation, so that is their exact closed-form eps*);
    other coordinates (PCA) get their own EM.

    Returns:
        {"mix": the chosen GaussianMixtureEps, "rows": one per K, "mixtures": every K's, "n_train", "heldout"}.
    """

    cache = plan.mixtures
    key = coords.fingerprint()
    if key in cache:
        return cache[key]
    if coords.is_rotation and coords.kind != "latent":
        # EM once, in the latent: a rotation maps the fitted mixture exactly (GaussianMixtureEps.rotated) and keeps
        # every K's held-out likelihood, so refitting in rotated coordinates would only repeat EM (about 20 s of
        # the make-run job) and land in a slightly different local optimum.
        base = latent_mixture(cfg, plan, Coordinates.identity(coords.dim))
        mixtures = [m.rotated(coords.components) for m in base["mixtures"]]
        chosen = next(i for i, r in enumerate(base["rows"]) if r["chosen"])
        cache[key] = {**base, "mix": mixtures[chosen], "mixtures": mixtures, "rows": [dict(r) for r in base["rows"]]}
        return cache[key]
    s = cfg.sindy
    data = load_latent_data(plan.run_dir, plan.kind)
    train = data.train.reshape(data.train.shape[0], -1).double().numpy()
    rng = np.random.default_rng(s.seed)
    train = train[rng.permutation(len(train))[: s.mixture_samples]]
    test_file = plan.run_dir / "latents" / "test.safetensors"
    if test_file.is_file():
        test = (
            ((load_file(str(test_file))["latents"] - data.mean) / data.std).reshape(-1, train.shape[1]).double().numpy()
        )
        held_what = f"the encoded test split ({len(test)} latents)"
    else:  # keep a tenth of the training subset aside
        cut = len(train) // 10
        test, train = train[:cut], train[cut:]
        held_what = f"{cut} training latents kept out of EM"
    if coords.kind != "latent":
        train, test = coords.states(train), coords.states(test)
    mix, rows, mixtures = fit_mixture(train, test, s.mixture_components, seed=s.seed, max_iter=100)
    cache[key] = {"mix": mix, "rows": rows, "mixtures": mixtures, "n_train": len(train), "heldout": held_what}
    return cache[key]


def distilled_mixture(cfg: Config, plan: Plan, tset: TrajectorySet, coords: Coordinates, split: np.ndarray) -> dict:
    """EM's chosen mixture with its constants refitted to the DiT's eps (sindy.mixture_fit=dit,
    analysis/sindy/mixture.py distill_mixture) on the training trajectories' states and the query blocks', in fit
    coordinates; at most 4,000 rows per state (a seeded draw: each Adam step reads 600 rows of 10 states).
    Fitted once per coordinates and kept in ``plan``.

    Returns:
        {"mix": the distilled GaussianMixtureEps, "from": EM's mixture, "info": distill_mixture's info}.
    """

    key = coords.fingerprint() + ":dit"
    if key in plan.mixtures:
        return plan.mixtures[key]
    if coords.is_rotation and coords.kind != "latent":
        # Distilled once, in the latent, as EM is (latent_mixture): the loss, a sum of squared eps errors over the
        # dimensions, and the rows are the same under a rotation, so the rotated mixture is the same fit's exact
        # closed form there; a second distillation cost 33 s of the make-run job and lands elsewhere only by Adam's path.
        base = distilled_mixture(cfg, plan, tset, Coordinates.identity(coords.dim), split)
        plan.mixtures[key] = {
            "mix": base["mix"].rotated(coords.components),
            "from": latent_mixture(cfg, plan, coords)["mix"],
            "info": {**base["info"], "rotated_from": "latent"},
        }
        return plan.mixtures[key]
    s = cfg.sindy
    em = latent_mixture(cfg, plan, coords)["mix"]
    train = np.flatnonzero(split >= 0)
    zs, es = [], []
    for blk in tset.blocks():
        keep = np.isin(blk.index, train)
        if keep.any():
            zs.append(coords.states(blk.z[:-1, keep]))
            es.append(coords.velocities(blk.eps[:, keep]))
    for q in plan.queries:
        for blk in q.blocks():
            zs.append(coords.states(blk.z[:-1]))
            es.append(coords.velocities(blk.eps))
    z, eps = np.concatenate(zs, axis=1), np.concatenate(es, axis=1)  # (T, n, d)
    T, n, d = z.shape
    rng = np.random.default_rng(s.seed)
    cols = rng.permutation(n)[:4000]
    a, sg = noise_levels(run_schedule(plan))
    mix, info = distill_mixture(
        em,
        z[:, cols].reshape(-1, d),
        eps[:, cols].reshape(-1, d),
        np.repeat(np.arange(T), len(cols)),
        a,
        sg,
        iterations=s.mixture_distill_iterations,
        seed=s.seed,
    )
    info["rows_used"] = int(T * len(cols))
    plan.mixtures[key] = {"mix": mix, "from": em, "info": info}
    return plan.mixtures[key]


def mixture_view(
    cfg: Config, plan: Plan, ho: dict, lp, schedule, coords: Coordinates, edges: list[float]
) -> tuple[dict, tuple]:
    """Fit the mixtures (K by held-out likelihood) and score their closed-form eps* against the DiT, no fitting.

    In rotated coordinates u = C z the latents are rotated before EM: the noising a x + s eps keeps its form, so the
    mixture of the rotated latents has the rotated closed-form eps*."""

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

    out = {
        "n_train": fitted["n_train"],
        "heldout": fitted["heldout"],
        "grid": rows,
        "k": mix.K,
        "eps": best["eps"],
        "drift": best["drift"],
        "weights": mix.weights.tolist(),
        "means": mix.means.tolist(),
        "seconds": round(time.time() - t0, 2),
    }
    return out, (mix, rhs)


def validate_equations(
    cfg: Config, plan: Plan, tset: TrajectorySet, coords: Coordinates, split: np.ndarray, rhs, views: dict
) -> dict:
    """Integrate the equations (and the mixture's ODE) from held-out noise; decode, classify, compare with the DiT.

    Also decodes the mixture's component means into ``views["mixture"]["_mean_images"]`` for the report.
    """

    mixture = views.get("_mixture")
    s = cfg.sindy
    n_ho = int((split < 0).sum())
    n = min(s.validation_noises, n_ho)
    if n == 0:
        return {"skipped": "sindy.validation_noises=0"}
    ho = heldout_block(plan, tset, coords, split, n)
    decode, why = None, ""
    if tset.source == "generated":
        decode = make_decoder(plan, coords)
    else:
        why = f"external trajectories ({tset.manifest.get('path')}): no decoder of theirs, so no images to classify"
    out = {
        "equations": validate(rhs, ho["z"], ho["t"], s.integrator, decode, cfg.dit.classifier, cfg.data.shards, why),
        "heldout_available": n_ho,
        "classifier": str(cfg.dit.classifier),
    }
    if mixture is not None and decode is not None:
        views["mixture"]["_mean_images"] = decode(mixture[0].means)
    if mixture is not None:
        out["mixture"] = validate(
            mixture[1], ho["z"], ho["t"], "euler", decode, cfg.dit.classifier, cfg.data.shards, why
        )
    return out


def decode_end_states(plan: Plan, coords: Coordinates, dit_end: np.ndarray, sindy_end: np.ndarray) -> dict:
    """Images (r, 28, 28) of the DiT's end states and of the rollouts' own end states."""
    dec = make_decoder(plan, coords)
    a, b = dec(dit_end), dec(sindy_end)
    return {"dit": a, "sindy": b, "pixel_diff": float(np.mean(np.abs(a - b)))}
