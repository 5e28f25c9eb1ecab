"""The report's sections on the fit space (eps, drift, x0 and sindy.fit_space=auto's choice; the sampler's exact linear
part) and on the Gaussian-mixture view of the denoiser (EM's mixture and, with sindy.mixture_fit=dit, the one
distilled to the DiT), as Markdown lines."""

from __future__ import annotations

import numpy as np

__all__ = ["median_text", "range_text", "theory_sections"]


def median_text(r2: list) -> str:
    v = np.asarray(r2, dtype=np.float64)
    return "n/a" if not np.isfinite(v).any() else f"{np.nanmedian(v):.3f}"


def range_text(r2: list) -> str:
    v = np.asarray(r2, dtype=np.float64)
    return "n/a" if not np.isfinite(v).any() else f"{np.nanmin(v):.3f} to {np.nanmax(v):.3f}"


def theory_sections(views: dict | None) -> list[str]:
    """Sections on the fit space (eps vs drift, the sampler's exact linear part) and on the mixture view."""
    if not views:
        return []
    L: list[str] = []
    fs = views.get("fit_space")
    if fs and "skipped" not in fs:
        other = "eps" if fs["fit_space"] == "drift" else "drift"
        L += [
            "## The sampler's linear part: eps and drift",
            "",
            f"{fs['theory']}. The chosen model was fitted in **{fs['fit_space']}** space; its {other} follows exactly "
            f"({'drift = p z + q eps_fit' if other == 'drift' else 'eps = (drift_fit - p z) / q'}). Held-out R^2 of both "
            f"on {fs['n_heldout']} held-out trajectories, pooled and per window of t. q multiplies an eps "
            f"error in the drift (here |q| reaches {np.max(np.abs(fs['q'])):.3g}; about 50 at t = 1 for DDIM with the "
            "cosine schedule at T = 50), and the steps with large q hold much of the drift's variance, so drift R^2 "
            "mostly reflects those steps; the rollouts at the top say what the errors do to the samples.",
            "",
        ]
        if fs.get("choice"):
            ch = fs["choice"]
            L += [
                f"sindy.fit_space=auto chose **{ch['chosen']}**: {ch['rule']} (drift: the library models the drift; "
                "eps: it models eps, drift composed; x0: the eps model fitted by the error of x0 = (z - s eps) / a).",
                "",
                "| space | final error (training noises) | per-sample R^2 | diverged | terms | fit R^2 held out (median) |",
                "|---|---|---|---|---|---|",
            ]
            for c in ch["candidates"]:
                L.append(
                    f"| {'**' + c['space'] + '**' if c['space'] == ch['chosen'] else c['space']} | "
                    f"{c['final_error']:.4f} | {c['per_sample_r2']:.4f} | {c['diverged']} | {c['terms']} | "
                    f"{c['r2_heldout_median']:.4f} |"
                )
            L.append("")
        wins = fs["eps"]["windows"]
        head = " | ".join(f"t {w['t_from']:.2g}-{w['t_to']:.2g}" for w in wins)
        L += [
            f"| space | R^2 pooled (median over dims) | range over dims | {head} |",
            "|---|---|---|" + "---|" * len(wins),
        ]
        for space in ("eps", "drift"):
            r = fs[space]
            L.append(
                f"| {space} | {median_text(r['pooled'])} | {range_text(r['pooled'])} | "
                + " | ".join(median_text(w["r2"]) for w in r["windows"])
                + " |"
            )
        L += ["", "| dim | R^2 eps | R^2 drift |", "|---|---|---|"]
        for j, (a, b) in enumerate(zip(fs["eps"]["pooled"], fs["drift"]["pooled"])):
            L.append(f"| z{j} | {a:.4f} | {b:.4f} |")
        L.append("")
    mx = views.get("mixture")
    if mx and "skipped" in mx:
        L += ["## Gaussian-mixture view of the denoiser", "", f"Not run: {mx['skipped']}.", ""]
    elif mx:
        L += [
            "## Gaussian-mixture view of the denoiser",
            "",
            f"A K-component Gaussian mixture fitted by EM (scikit-learn, full covariances) to {mx['n_train']} "
            f"normalised training latents, K chosen by the mean log-likelihood of {mx['heldout']}. Its exact "
            "eps*(z, t) = s sum_k r_k(z, t) (a^2 S_k + s^2 I)^-1 (z - a mu_k) and drift p z + q eps* are scored "
            "against the DiT's eps and drift on the held-out trajectories **with no fitting to the DiT**.",
            "",
            "| K | log-lik train | log-lik held-out | EM seconds | R^2 eps (median over dims) | R^2 drift (median) | chosen |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in mx["grid"]:
            L.append(
                f"| {r['k']} | {r['loglik_train']:.3f} | {r['loglik_heldout']:.3f} | {r['seconds']:.1f} | "
                f"{median_text(r['eps']['pooled'])} | {median_text(r['drift']['pooled'])} | {'**yes**' if r['chosen'] else ''} |"
            )
        wins = mx["eps"]["windows"]
        L += [
            "",
            f"K = {mx['k']} per window of t (median over dims):",
            "",
            "| | " + " | ".join(f"t {w['t_from']:.2g}-{w['t_to']:.2g}" for w in wins) + " |",
            "|---|" + "---|" * len(wins),
        ]
        for space in ("eps", "drift"):
            L.append(f"| R^2 {space} | " + " | ".join(median_text(w["r2"]) for w in mx[space]["windows"]) + " |")
        L += ["", f"| dim | R^2 eps (K = {mx['k']}) | R^2 drift (K = {mx['k']}) |", "|---|---|---|"]
        for j, (a, b) in enumerate(zip(mx["eps"]["pooled"], mx["drift"]["pooled"])):
            L.append(f"| z{j} | {a:.4f} | {b:.4f} |")
        L.append("")
        if "_mean_images" in mx:
            L += ["The component means decoded (weight above each):", "", "![mixture means](mixture_means.png)", ""]
        if "distilled" in mx:
            L += _distilled_lines(mx["distilled"])
    return L


def _distilled_lines(dm: dict) -> list[str]:
    """The library's mixture family when sindy.mixture_fit=dit: what the distillation did and its constants."""
    wins = dm["eps"]["windows"]
    L = [
        "### The mixture distilled to the DiT (the library's mixture family)",
        "",
        f"sindy.mixture_fit=dit: the chosen K = {dm['k']} mixture's constants (weights, means, covariances) refitted "
        f"by {dm['iterations']} Adam steps so that its closed-form eps* above matches the DiT's eps on "
        f"{dm['rows_used']} training states (trajectories and query states; analysis/sindy/mixture.py "
        f"distill_mixture). Mean squared eps error per coordinate {dm['loss_start']:.4f} -> {dm['loss_end']:.4f}, "
        f"{dm['seconds']:.1f} s. It is still the closed form of a Gaussian mixture; the library's mixture columns "
        "use these constants (the covariances are in equations.json, library.json and the family's spec).",
        "",
        "| held-out | " + " | ".join(f"t {w['t_from']:.2g}-{w['t_to']:.2g}" for w in wins) + " | pooled |",
        "|---|" + "---|" * (len(wins) + 1),
    ]
    for space in ("eps", "drift"):
        L.append(
            f"| R^2 {space} | "
            + " | ".join(median_text(w["r2"]) for w in dm[space]["windows"])
            + f" | {median_text(dm[space]['pooled'])} |"
        )
    L += ["", "| component | weight | mean |", "|---|---|---|"]
    for k, (w, m) in enumerate(zip(dm["weights"], dm["means"])):
        L.append(f"| {k} | {w:.4f} | " + ", ".join(f"{v:.3f}" for v in m) + " |")
    L.append("")
    return L
