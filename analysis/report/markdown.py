"""The report's text, report.md: one function per section, and the sections on the views (what the equations
generate, the sampler's linear part, the Gaussian-mixture view)."""

from __future__ import annotations

import numpy as np

from analysis.report.context import ReportContext
from analysis.report.theory import theory_sections
from analysis.report.usage import coordinate_choice_lines, usage_lines
from analysis.report.yardsticks import yardstick_section
from analysis.sindy.export import equation_text  # the one formatter of equation text
from analysis.sindy.families import Polynomial
from analysis.sindy.integration import DIVERGED

__all__ = [
    "report_markdown",
    "fmt",
    "optimizer_text",
    "library_text",
    "windows_text",
    "validation_section",
]


def fmt(x: float) -> str:
    """Four significant digits."""
    return f"{x:.4g}"


def optimizer_text(ctx: ReportContext) -> str:
    """The optimizer and its settings in words (report.md and equations.json)."""
    if ctx.settings.optimizer == "sr3":
        return f"SR3 (L0 prox, nu {ctx.settings.sr3_nu}, normalised columns {ctx.settings.normalize}; pysindy.SR3 on the Gram square root)"
    return f"STLSQ (alpha {ctx.settings.alpha}, normalised columns {ctx.settings.normalize})"


def library_text(library, xi) -> str:
    """The library family by family (Library.family_slices) with how many of its terms the equations use."""
    parts = []
    for fam, sl in library.family_slices():
        used = int(np.count_nonzero(np.any(xi[:, sl] != 0, axis=0)))
        parts.append(f"{fam.kind} {sl.stop - sl.start} ({used} used)")
    return ", ".join(parts)


def windows_text(windows: list[dict]) -> str:
    """Held-out R^2 per window of t, "-" for an empty window."""
    return " / ".join("-" if w["r2_heldout"] is None else f"{w['r2_heldout']:.3f}" for w in windows)


def report_markdown(
    fits: list[dict],
    library,
    xi: np.ndarray,
    ctx: ReportContext,
    roll: dict,
    images: dict | None,
    views: dict | None,
    pngs: list[str],
    end_err: float,
) -> str:
    """report.md: what the equations generate, the setup, fit quality, the free-time reference, the target comparison,
    the equations, the rollouts, the views, the plots and the stage times (every fit's "flag" already set)."""
    L = _overview(fits, library, xi, ctx, views)
    L += _fit_quality(fits, ctx)
    L += _free_time(fits)
    L += _target_comparison(fits, ctx)
    L += _equations(fits)
    L += _integration(ctx, roll, images, end_err)
    where = f"runs/{ctx.run}/reports/{ctx.fingerprint['id']}" if ctx.fingerprint else f"runs/{ctx.run}/report"
    L += usage_lines(where, library.uses_time, ctx.T, ctx.coordinates)
    L += theory_sections(views)
    L += _plots_and_times(pngs, ctx)
    return "\n".join(L) + "\n"


def _overview(fits: list[dict], library, xi: np.ndarray, ctx: ReportContext, views: dict | None) -> list[str]:
    """The title, what the equations generate, then the data, target, library, rule and provenance, and the warnings."""
    d, names = len(fits), library.get_feature_names("text")
    L = [f"# SINDy equations of `{ctx.run}`", ""]
    L += validation_section(views, ctx)
    L += yardstick_section((views or {}).get("yardsticks"))
    L += [
        f"- data: {ctx.n} trajectories ({ctx.source}), sampler **{ctx.sampler}**, T = {ctx.T} steps, "
        f"seed {ctx.settings.seed}; split by trajectory: {ctx.n_train} training / {ctx.n_heldout} held-out",
        f"- target: **{ctx.target}** ({ctx.target_note})",
        f"- time: {ctx.t_convention}",
        f"- coordinates: {ctx.coordinates}",
        *coordinate_choice_lines(views.get("coordinate_choice")),
        f"- library: {len(names)} terms per dimension: {library_text(library, xi)} (spec in equations.json)",
        *(
            [
                f"- families that must earn their place (best held-out unexplained variance at most "
                f"{fits[0]['gated_families']['gate']:g} x that without them): kept in "
                f"{sum(bool(r['gated_families']['kept']) for r in fits)} of {d} dimensions"
            ]
            if fits and fits[0].get("gated_families")
            else []
        ),
        f"- threshold: {optimizer_text(ctx)}, {ctx.settings.n_thresholds} thresholds; rule: {fits[0]['rule']}",
        f"- uncertainty: bagging over {ctx.n_groups} trajectory groups, {ctx.settings.n_bootstrap} resamples",
        f"- provenance: {ctx.provenance}",
        *(
            [
                f"- settings fingerprint **{ctx.fingerprint['id']}** (the sindy.* settings and inputs in equations.json, "
                f"`settings_fingerprint`); other settings' reports: `runs/{ctx.run}/reports/`, the latest at "
                f"`runs/{ctx.run}/report`"
            ]
            if ctx.fingerprint
            else []
        ),
        "",
    ]
    for w in ctx.warnings:
        L += [f"> **Warning:** {w}", ""]
    return L


def _fit_quality(fits: list[dict], ctx: ReportContext) -> list[str]:
    """The per-dimension table: terms, R^2 train and held-out, flag, the unrestricted model, R^2 per window of t."""
    d, flagged = len(fits), [r for r in fits if r["flag"]]
    budget = ctx.settings.term_budget
    wins = fits[0].get("r2_heldout_windows") or []
    wlabel = " / ".join(f"{w['t_from']:.2g}-{w['t_to']:.2g}" for w in wins)
    L: list[str] = []
    L += [
        "## Fit quality per dimension",
        "",
        f"Held-out trajectories never enter the fit. Flag: held-out R^2 < {ctx.settings.poor_r2} or more than 0.2 "
        "below training R^2.",
        "",
        f"The equations keep at most {budget} terms (`sindy.term_budget`); beside them the model the same rule picks "
        "without the budget, and the cost of the budget in held-out R^2. "
        + (f"R^2 per window of t ({wlabel}) shows where the equations fail." if wins else ""),
        "",
        "| dim | terms | R^2 train | R^2 held-out | RMSE held-out | flag | unrestricted: terms, R^2 held-out | cost |"
        + (" R^2 held-out per window of t |" if wins else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if wins else ""),
    ]
    for r in fits:
        u = r.get("unrestricted")
        un = f"{u['n_terms']}, {u['r2_heldout']:.4f} | {u['r2_heldout'] - r['r2_heldout']:+.4f}" if u else "- | -"
        L.append(
            f"| z{r['dim']} | {r['n_terms']} | {r['r2_train']:.4f} | {r['r2_heldout']:.4f} | "
            f"{fmt(r['rmse_heldout'])} | {'**POOR** ' + r['flag'] if r['flag'] else 'ok'} | {un} |"
            + (f" {windows_text(r['r2_heldout_windows'])} |" if wins else "")
        )
    L += [
        "",
        f"**{len(flagged)} of {d} dimensions do not generalise.**"
        if flagged
        else f"All {d} dimensions generalise to held-out trajectories.",
        "",
    ]
    return L


def _free_time(fits: list[dict]) -> list[str]:
    """The free-time reference beside SINDy's held-out R^2 (or why it was skipped)."""
    L: list[str] = []
    d = len(fits)
    if fits and fits[0].get("free_time", {}).get("skipped"):
        L += ["### Free-time reference: skipped", "", fits[0]["free_time"]["skipped"], ""]
    elif all("free_time" in r and "r2_heldout" in r["free_time"] for r in fits):
        deg = fits[0]["free_time"]["degree"]
        L += [
            "### What limits the fit: a free-time reference",
            "",
            f"A separate degree-{deg} polynomial in z for every sampler step (ridge; any time dependence, "
            f"{Polynomial(degree=deg).n_output_features(d)} terms per step), fitted on the same training and scored "
            "on the same held-out "
            "trajectories. If it also stays far below 1, the time terms are not the bottleneck: the velocity is not "
            "a low-degree polynomial of the state (for a trained DiT, the denoiser's nonlinearity). Where SINDy beats "
            "it, its cubic and exponential terms capture state dependence that a quadratic cannot.",
            "",
            f"| dim | R^2 held-out (SINDy) | R^2 held-out (per-step degree {deg}) | R^2 train (per-step) |",
            "|---|---|---|---|",
        ]
        for r in fits:
            f = r["free_time"]
            L.append(f"| z{r['dim']} | {r['r2_heldout']:.4f} | {f['r2_heldout']:.4f} | {f['r2_train']:.4f} |")
        L.append("")
    return L


def _target_comparison(fits: list[dict], ctx: ReportContext) -> list[str]:
    """Held-out R^2 and terms of the main target beside the other one, if compared."""
    L: list[str] = []
    if any("other_target" in r for r in fits):
        o = fits[0]["other_target"]["target"]
        L += [
            f"## Target comparison: {ctx.target} vs {o}",
            "",
            "Same states, same library, same threshold rule; only the velocity estimate differs.",
            "",
            f"| dim | R^2 held-out ({ctx.target}) | R^2 held-out ({o}) | terms ({ctx.target}) | terms ({o}) |",
            "|---|---|---|---|---|",
        ]
        for r in fits:
            a = r["other_target"]
            L.append(
                f"| z{r['dim']} | {r['r2_heldout']:.4f} | {a['r2_heldout']:.4f} | {r['n_terms']} | {a['n_terms']} |"
            )
        L.append("")
    return L


def _equations(fits: list[dict]) -> list[str]:
    """Every dimension's equation, with inclusion probabilities and coefficient std."""
    L: list[str] = []
    L += [
        "## Equations",
        "",
        "Coefficients of the chosen model; in brackets the bagging inclusion probability "
        "and the coefficient std over resamples.",
        "",
    ]
    for r in fits:
        how = "forward stepwise" if r.get("method") == "forward stepwise" else f"threshold {fmt(r['threshold'])}"
        L.append(f"### z{r['dim']} ({r['n_terms']} terms, {how})")
        L += ["", "```", equation_text(r["dim"], r["terms"]), "```", ""]
        if r["terms"] and r["terms"][0]["inclusion_probability"] is not None:
            L.append(
                ", ".join(
                    f"{t['name']} [{t['inclusion_probability']:.2f}, ±{fmt(t['coef_std'])}]" for t in r["terms"][:30]
                )
                + (" ..." if len(r["terms"]) > 30 else "")
            )
            L.append("")
    return L


def _integration(ctx: ReportContext, roll: dict, images: dict | None, end_err: float) -> list[str]:
    """The rollouts from held-out noise against the DiT's trajectories, and the decoded end states."""
    L: list[str] = []
    L += [
        "## Validation by integration",
        "",
        f"The discovered equations integrated with **{ctx.settings.integrator}** on the sampler's grid (t from 1 to 0, "
        f"dt = 1/{ctx.T}) from the initial noise of {len(roll['index'])} held-out trajectories, compared with "
        "the DiT's trajectories from the same noise.",
        "",
        f"- RMSE per step at t = 1, 0.5, 0: {fmt(roll['rmse_per_step'][0])}, "
        f"{fmt(roll['rmse_per_step'][len(roll['t']) // 2])}, {fmt(roll['rmse_per_step'][-1])}",
        f"- mean |SINDy - DiT| of the end state: {fmt(end_err)}",
        f"- diverged rollouts (|z| > {DIVERGED:g} or non-finite): {int((roll['diverged'] >= 0).sum())} of "
        f"{len(roll['index'])}",
        "",
    ]
    if images is not None:
        L += [
            f"Decoded end states (mean absolute pixel difference DiT vs SINDy: {images['pixel_diff']:.4f}); "
            "the SINDy row decodes the rollout's own end state.",
            "",
            "![samples](samples_vs_sindy.png)",
            "",
        ]
    else:
        L += [
            "No decoded images: these trajectories come from outside this run, so no decoder of theirs is available.",
            "",
        ]
    return L


def _plots_and_times(pngs: list[str], ctx: ReportContext) -> list[str]:
    """The plots' links and the stage times."""
    L = (
        ["## Plots", ""]
        + [f"![{p}]({p})" for p in pngs if p not in ("samples_vs_sindy.png", "mixture_means.png")]
        + [""]
    )
    L += ["## Stage times", "", "| stage | seconds | |", "|---|---|---|"]
    for k, (sec, note) in ctx.stage_times.items():
        L.append(f"| {k} | {sec:.1f} | {note} |")
    return L


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def validation_section(views: dict | None, ctx: ReportContext) -> list[str]:
    """The top of report.md: what the chosen equations (and the mixture's ODE) generate from held-out noise."""
    if not views or "validation" not in views:
        return []
    val = views["validation"]
    L = ["## What the equations generate", ""]
    if "skipped" in val:
        return L + [f"Not run: {val['skipped']}.", ""]
    eq = val["equations"]
    mix = val.get("mixture")
    k = views.get("mixture", {}).get("k")
    fit_space = views.get("fit_space", {}).get("fit_space", "drift")
    L += [
        f"The chosen equations (fitted in **{fit_space}** space) integrated with {eq['integrator']} on the sampler's "
        f"grid from the initial noise of **{eq['n_noises']} held-out trajectories** (never seen by the fit), "
        "decoded by the run's autoencoder and compared with the DiT's own sample from the same noise"
        + (
            f"; beside them the closed-form ODE of a {k}-component Gaussian mixture of the training latents "
            "(no fitting to the DiT at all)"
            if mix
            else ""
        )
        + ".",
        "",
    ]
    cols = [("equations", eq)] + ([(f"mixture ODE (K = {k})", mix)] if mix else [])
    L += ["| | " + " | ".join(c for c, _ in cols) + " | DiT |", "|---|" + "---|" * (len(cols) + 1)]
    img = [m.get("images") for _, m in cols]
    if all(img):
        n = img[0]["n"]
        L.append(
            "| same digit as the DiT (MNIST classifier) | "
            + " | ".join(f"**{_pct(m['class_agreement'])}**" for m in img)
            + " | 100% |"
        )
        L.append(
            f"| FD-MNIST ({n} images each) | "
            + " | ".join(f"{m['fd_mnist']['generated']:.2f}" for m in img)
            + f" | {img[0]['fd_mnist']['dit']:.2f} |"
        )
        L.append(
            "| mean classifier confidence | "
            + " | ".join(f"{m['mean_confidence']['generated']:.3f}" for m in img)
            + f" | {img[0]['mean_confidence']['dit']:.3f} |"
        )
    L.append(
        "| latent RMSE vs the DiT at t = 0.5 | " + " | ".join(fmt(m["latent_rmse_mid"]) for _, m in cols) + " | 0 |"
    )
    L.append(
        "| latent RMSE vs the DiT at t = 0 | "
        + " | ".join(fmt(m["latent_rmse_end"]) for _, m in cols)
        + f" | 0 (RMS of its samples: {fmt(eq['latent_scale_end'])}) |"
    )
    L.append(
        f"| diverged rollouts (a coordinate beyond {DIVERGED:g}: grey images, left out of the RMSE) | "
        + " | ".join(str(m["diverged"]) for _, m in cols)
        + " | |"
    )
    L.append("")
    if all(img):
        floor = img[0].get("fd_floor_at_n")
        L += [
            f"FD-MNIST is biased upward at small N: compare the columns with each other (same {img[0]['n']} noises), "
            + (
                f"and with real digits at about this N (floor {floor:.2f} at N = {img[0]['fd_floor_n']})."
                if floor
                else "not with FDs at other N."
            ),
            "",
        ]
    else:
        why = eq.get("images_skipped") or (mix or {}).get("images_skipped")
        L += [f"No image metrics: {why}.", ""]
    L += ["Per-step latent error: `validation_rmse.png`; equations.json holds it under `validation`.", ""]
    return L
