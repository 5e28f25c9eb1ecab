"""Validation by what the equations generate: rollouts from held-out noise, decoded and classified.

References:
    S. L. Brunton, J. L. Proctor, J. N. Kutz, PNAS 113(15):3932, 2016 (a model of a dynamical system is
    judged by simulating it); M. Heusel et al., NeurIPS 2017 (the Frechet distance of classifier features;
    FD-MNIST here, analysis/quality/scoring.py); M. J. Chong, D. Forsyth, CVPR 2020 (FD is biased by the sample
    count, so the equations and the DiT are scored on the same number of images).

Why: the regression's R^2 (pooled over t) is dominated by the first steps, where the DDIM drift is
~50 (eps - z) and carries most of the variance, and says little about what the equations produce.
Integrated from the same initial noise as held-out DiT trajectories and decoded, the equations'
end states can be compared with the DiT's own samples image by image (does the MNIST classifier
see the same digit?) and as a set (FD-MNIST of both, mean classifier confidence of both), and the
latent error can be followed step by step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from analysis.quality import scoring as quality
from analysis.sindy.integration import integrate
from analysis.sindy.metrics import r2_score
from analysis.sindy.targets import window_index
from models.classifier import TRAIN_HINT, load_classifier


def r2_per_dim(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """R^2 per last-axis column over all other axes: (..., d) x (..., d) -> (d,); NaN where constant."""

    yt = np.asarray(y_true, np.float64).reshape(-1, y_true.shape[-1])
    yp = np.asarray(y_pred, np.float64).reshape(-1, y_true.shape[-1])
    ok = np.all(np.isfinite(yp), axis=1)  # rows of a diverged prediction are left out
    return r2_score(yt[ok], yp[ok])


def windowed_r2(y_true: np.ndarray, y_pred: np.ndarray, t: np.ndarray, edges: list[float]) -> dict:
    """R^2 per dimension, pooled over all states and per window of t (analysis.sindy.targets.window_index).

    Args:
        y_true, y_pred: (T, b, d) per state (state k at t[k]).
        t: (T,) times of the states.
        edges: W + 1 increasing window edges (analysis.sindy.targets.time_windows of the data's t).

    Returns:
        {"pooled": [d], "median": float, "windows": [{"t_from", "t_to", "r2": [d]}]} with windows in increasing t
        (the empty ones left out), as the fit's per-window R^2.
    """

    win = window_index(t, edges)
    wins = []
    for w in range(len(edges) - 1):
        sel = win == w
        if sel.any():
            wins.append(
                {
                    "t_from": float(edges[w]),
                    "t_to": float(edges[w + 1]),
                    "r2": r2_per_dim(y_true[sel], y_pred[sel]).tolist(),
                }
            )
    pooled = r2_per_dim(y_true, y_pred)
    return {"pooled": pooled.tolist(), "median": float(np.nanmedian(pooled)), "windows": wins}


# ----------------------------------------------------------------------------- rollouts


def rollout(rhs: Callable, reference: np.ndarray, t: np.ndarray, integrator: str = "euler") -> dict:
    """Integrate ``rhs`` from the reference trajectories' initial states and compare step by step.

    Args:
        rhs: f(z (b, d), t float) -> (b, d), dz/dt in increasing t.
        reference: (T+1, b, d) the DiT's trajectories (initial noise first).
        t: (T+1,) descending grid.
        integrator: "euler" | "rk4" (analysis.sindy.integration.integrate).

    Returns:
        {"states": (T+1, b, d), "rmse_per_step": (T+1,) over the rollouts that never diverge (a diverging
        one would dominate every step before it blows up; they are counted in "diverged"), "diverged": int,
        "end_rmse": float}.
    """

    sim, diverged_at = integrate(rhs, reference[0], t, integrator)
    ok = diverged_at < 0
    with np.errstate(invalid="ignore"):
        rmse = (
            np.sqrt(np.mean((sim[:, ok] - reference[:, ok]) ** 2, axis=(1, 2))) if ok.any() else np.full(len(t), np.nan)
        )
    return {
        "states": sim,
        "rmse_per_step": rmse,
        "diverged": int((diverged_at >= 0).sum()),
        "end_rmse": float(rmse[-1]),
    }


def image_metrics(
    dit_images: np.ndarray, gen_images: np.ndarray, classifier_path: str | Path, shard_dir: str | Path | None
) -> dict:
    """Class agreement, FD-MNIST and confidence of generated images next to the DiT's from the same noise.

    Args:
        dit_images: (n, 28, 28) in [0, 1], the DiT's samples.
        gen_images: (n, 28, 28) in [0, 1], the images of another generator from the same noises
            (NaN-free; a diverged rollout is decoded as grey by the caller and counts as it is).
        classifier_path: weights of analysis/quality/scoring.py's classifier.
        shard_dir: MNIST shards (only read if the classifier's test statistics cache is stale).

    Returns:
        {"n", "class_agreement", "fd_mnist": {"generated", "dit"}, "mean_confidence": {"generated", "dit"},
        "fd_floor_at_n", "fd_floor_n", "class_counts": {"generated", "dit"}, "seconds"}, or
        {"skipped": reason} when the classifier file is missing.
    """

    path = Path(classifier_path)
    if not path.is_file():
        return {"skipped": f"no MNIST classifier at {path} ({TRAIN_HINT})"}
    t0 = time.time()
    clf = load_classifier(path, "cpu")
    ref = quality.load_reference_stats(clf, shard_dir if shard_dir and Path(shard_dir).is_dir() else None)
    out: dict = {"n": int(dit_images.shape[0])}
    scores, labels = {}, {}
    for name, imgs in (("dit", dit_images), ("generated", gen_images)):
        x = np.clip(np.nan_to_num(np.asarray(imgs, np.float32), nan=0.5), 0.0, 1.0)
        _, probs = quality.features(clf, x)
        labels[name] = probs.argmax(axis=1)
        scores[name] = quality.score(x, clf, ref)
    out["class_agreement"] = float(np.mean(labels["dit"] == labels["generated"]))
    out["fd_mnist"] = {k: scores[k]["fd_mnist"] for k in ("generated", "dit")}
    out["mean_confidence"] = {k: scores[k]["mean_confidence"] for k in ("generated", "dit")}
    out["class_counts"] = {k: scores[k]["class_counts"] for k in ("generated", "dit")}
    out["fd_floor_at_n"], out["fd_floor_n"] = scores["dit"]["fd_floor_at_n"], scores["dit"]["fd_floor_n"]
    out["seconds"] = round(time.time() - t0, 2)
    return out


def validate(
    rhs: Callable,
    reference: np.ndarray,
    t: np.ndarray,
    integrator: str,
    decode: Callable | None,
    classifier_path: str | Path,
    shard_dir: str | Path | None,
    no_images_reason: str = "",
) -> dict:
    """Rollouts of ``rhs`` from the reference's initial noise, their latent error, and image metrics.

    Args:
        rhs, reference, t, integrator: see ``rollout``.
        decode: c (n, d) fit coordinates -> (n, 28, 28) images in [0, 1] (grey for non-finite rows), or
            None when there is no decoder (external trajectories).
        classifier_path, shard_dir: see ``image_metrics``.
        no_images_reason: what to say when ``decode`` is None.

    Returns:
        JSON-able {"n_noises", "integrator", "latent_rmse_per_step", "latent_rmse_end",
        "latent_rmse_mid", "diverged", "images" (see image_metrics) or "images_skipped", "seconds"},
        and the private "_states" (T+1, n, d) / "_images" {"dit", "generated"} for plots (not for JSON).
    """
    t0 = time.time()
    roll = rollout(rhs, reference, t, integrator)
    T = reference.shape[0] - 1
    out = {
        "n_noises": int(reference.shape[1]),
        "integrator": integrator,
        "latent_rmse_per_step": [float(x) for x in roll["rmse_per_step"]],
        "latent_rmse_mid": float(roll["rmse_per_step"][T // 2]),
        "latent_rmse_end": roll["end_rmse"],
        "latent_scale_end": float(np.sqrt(np.mean(reference[-1] ** 2))),
        "diverged": roll["diverged"],
        "_states": roll["states"],
    }
    if decode is None:
        out["images_skipped"] = no_images_reason or "no decoder for these trajectories"
    else:
        dit_img, gen_img = decode(reference[-1]), decode(roll["states"][-1])
        out["_images"] = {"dit": dit_img, "generated": gen_img}
        m = image_metrics(dit_img, gen_img, classifier_path, shard_dir)
        if "skipped" in m:
            out["images_skipped"] = m["skipped"]
        else:
            out["images"] = m
    out["seconds"] = round(time.time() - t0, 2)
    return out


def public(result: dict) -> dict:
    """The JSON-able part of a ``validate`` result (drops the arrays kept for plots)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}
