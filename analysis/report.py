"""The consolidated equation report: validation by integration, report.md, equations.json/.tex, plots, TensorBoard.

References:
    S. L. Brunton, J. L. Proctor, J. N. Kutz, PNAS 113(15):3932, 2016 (a SINDy model is judged by
    simulating it, not only by its regression fit); U. Fasel et al., Proc. R. Soc. A 478:20210904,
    2022 (inclusion probabilities from bagging). The study whose honesty we check: the SINDy
    study in docs/REFERENCES.md.

Validation by integration: the discovered system dz/dt = Xi Theta(z, t) is integrated from the
held-out trajectories' initial noise z(t=1) down to t = 0 on the sampler's grid t_k = 1 - k/T
(explicit Euler z[k+1] = z[k] - dt f(z[k], t_k), which is exactly how the drift target was
defined, or classical RK4 with step -dt), and compared with the DiT's own trajectories from the
same noise, step by step. The end states of both are decoded by the run's autoencoder: the
SINDy images come from the *rollout's* end state, never from the DiT's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from analysis.export import equation_latex, equation_text  # the one formatter of equation text
from analysis.families import Polynomial
from configs.io import atomic_write_text

DIVERGED = 1e4  # |z| beyond this counts as a blown-up rollout (normalised latents are O(1))


@dataclasses.dataclass
class ReportContext:
    """What the report says about the run besides the fits: data, split, settings, provenance, stage times.

    Attributes:
        run: run.name. n, n_train, n_heldout: trajectories in all, in training, held out. seed: sindy.seed.
        sampler, T: the trajectories' sampler and steps. target, target_note: the fit target and what it is.
        t_convention: the trajectories' time convention. coordinates: the fit coordinates in words.
        optimizer, sr3_nu, alpha, normalize, n_thresholds, term_budget: the fit's settings (sindy.*).
        n_groups, n_bootstrap: bagging's trajectory groups and resamples.
        poor_r2: the held-out R^2 below which a dimension is flagged. integrator: the rollouts' integrator.
        stage_times: {stage: (seconds, note)}, the report's own added by write_report (from report_t0, if given).
        source: "generated" or "npz". warnings: lines for the report. digests: the weights' or file's
        sha256. provenance: one line on where the trajectories come from and how Ray ran.
    """

    run: str
    n: int
    n_train: int
    n_heldout: int
    seed: int
    sampler: str | None
    T: int
    target: str
    target_note: str
    t_convention: str
    coordinates: str
    optimizer: str
    sr3_nu: float
    term_budget: int | None
    alpha: float
    normalize: bool
    n_thresholds: int
    n_groups: int
    n_bootstrap: int
    poor_r2: float
    integrator: str
    stage_times: dict
    source: str
    warnings: list
    digests: dict
    provenance: str
    report_t0: float | None = None


# ----------------------------------------------------------------------------- integration


def sindy_rhs(library, xi: np.ndarray):
    """f(z (b, d), t float) -> (b, d) = Theta(z, t) Xi^T, with Xi (d, p)."""

    def f(z: np.ndarray, t: float) -> np.ndarray:
        return library.transform(z, float(t)) @ xi.T

    return f


def integrate(f, z0: np.ndarray, t: np.ndarray, method: str = "euler") -> tuple[np.ndarray, np.ndarray]:
    """Integrate dz/dt = f(z, t) backwards along the grid ``t`` (1 -> 0).

    Args:
        f: right-hand side, (b, d), float -> (b, d).
        z0: (b, d) states at t[0].
        t: (T+1,) descending grid.
        method: "euler" | "rk4".

    Returns:
        z (T+1, b, d) (NaN after a trajectory blows up) and diverged_at (b,) step index or -1.
    """
    T = len(t) - 1
    out = np.full((T + 1, *z0.shape), np.nan)
    out[0] = z0
    diverged = np.full(z0.shape[0], -1)
    z = np.asarray(z0, dtype=np.float64).copy()
    alive = np.ones(z0.shape[0], dtype=bool)
    for k in range(T):
        h = t[k + 1] - t[k]  # negative: integrating towards t = 0
        with np.errstate(all="ignore"):
            za = z[alive]
            if method == "euler":
                zn = za + h * f(za, t[k])
            else:
                k1 = f(za, t[k])
                k2 = f(za + 0.5 * h * k1, t[k] + 0.5 * h)
                k3 = f(za + 0.5 * h * k2, t[k] + 0.5 * h)
                k4 = f(za + h * k3, t[k + 1])
                zn = za + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        bad = ~np.all(np.isfinite(zn) & (np.abs(zn) < DIVERGED), axis=1)
        idx = np.flatnonzero(alive)
        diverged[idx[bad]] = k + 1
        z[idx] = np.where(bad[:, None], np.nan, zn)
        alive[idx[bad]] = False
        out[k + 1, alive] = z[alive]
        if not alive.any():
            break
    return out, diverged


# ----------------------------------------------------------------------------- text


def fmt(x: float) -> str:
    return f"{x:.4g}"


def flag_of(r: dict, poor: float) -> str:
    """Why a dimension's equation does not generalise, or ''."""
    if not math.isfinite(r["r2_heldout"]) or r["r2_heldout"] < poor:
        return f"held-out R^2 {r['r2_heldout']:.3f} < {poor}"
    if r["r2_train"] - r["r2_heldout"] > 0.2:
        return f"held-out R^2 {r['r2_heldout']:.3f} far below training {r['r2_train']:.3f}"
    return ""


# ----------------------------------------------------------------------------- plots


def _plots(out: Path, fits: list[dict], xi: np.ndarray, names: list[str], roll: dict, images: dict | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    d = len(fits)

    # Pareto fronts: terms vs held-out R^2 per dimension, chosen model marked.
    cols = min(4, d)
    rows = math.ceil(d / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, fits):
        sw = r["sweep"]
        nt = [s["n_terms"] for s in sw]
        ho = [s["r2_heldout"] for s in sw]
        tr = [s["r2_train"] for s in sw]
        ax.plot(nt, tr, ".", color="0.6", label="train")
        ax.plot(nt, ho, "o", ms=3, label="held-out")
        pf = sorted((s["n_terms"], s["r2_heldout"]) for s in sw if s["pareto"])
        if pf:
            ax.plot(*zip(*pf), "-", lw=1)
        ch = [s for s in sw if s["chosen"]][0]
        ax.plot(ch["n_terms"], ch["r2_heldout"], "r*", ms=10, label="chosen")
        ax.set_xscale("symlog")
        ax.set_ylim(max(-0.5, min(ho + [0]) - 0.05), 1.02)
        ax.set_title(f"z{r['dim']}", fontsize=9)
    for ax in list(axes.flat)[d:]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=6)
    fig.supxlabel("terms")
    fig.supylabel("R^2")
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=90)
    plt.close(fig)
    made.append("pareto.png")

    # Per-dimension R^2, training vs held-out.
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * d), 3))
    x = np.arange(d)
    ax.bar(x - 0.2, [r["r2_train"] for r in fits], 0.4, label="train")
    ax.bar(x + 0.2, [r["r2_heldout"] for r in fits], 0.4, label="held-out")
    ax.set_xticks(x, [f"z{i}" for i in x], fontsize=7)
    ax.set_ylim(min(0, min(r["r2_heldout"] for r in fits)) - 0.05, 1.05)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7)
    ax.set_title("R^2 per dimension")
    fig.tight_layout()
    fig.savefig(out / "r2.png", dpi=90)
    plt.close(fig)
    made.append("r2.png")

    # Coefficient heatmap over the union of selected terms.
    used = np.flatnonzero(np.any(xi != 0, axis=0))[:60]
    fig, ax = plt.subplots(figsize=(max(5, 0.22 * len(used) + 2), 0.3 * d + 1.5))
    if used.size:
        m = xi[:, used]
        v = np.max(np.abs(m)) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
        ax.set_xticks(range(len(used)), [names[k] for k in used], rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax)
    ax.set_yticks(range(d), [f"dz{j}/dt" for j in range(d)], fontsize=6)
    ax.set_title("coefficients (union of selected terms)")
    fig.tight_layout()
    fig.savefig(out / "coefficients.png", dpi=90)
    plt.close(fig)
    made.append("coefficients.png")

    # Trajectories vs rollouts (first dims of the first held-out trajectories) and error per step.
    t, ref, sim = roll["t"], roll["reference"], roll["sindy"]
    n_show, d_show = min(3, ref.shape[1]), min(4, ref.shape[2])
    fig, axes = plt.subplots(n_show, d_show, figsize=(3 * d_show, 2.2 * n_show), squeeze=False)
    for i in range(n_show):
        for j in range(d_show):
            ax = axes[i, j]
            ax.plot(t, ref[:, i, j], "k-", lw=1, label="DiT")
            ax.plot(t, sim[:, i, j], "r--", lw=1, label="SINDy")
            ax.invert_xaxis()
            ax.set_title(f"traj {roll['index'][i]}, z{j}", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.supxlabel("t (1 = noise -> 0 = sample)")
    fig.tight_layout()
    fig.savefig(out / "rollouts.png", dpi=90)
    plt.close(fig)
    made.append("rollouts.png")

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.semilogy(t, roll["rmse_per_step"], "-")
    ax.invert_xaxis()
    ax.set_xlabel("t")
    ax.set_ylabel("RMSE SINDy vs DiT")
    ax.set_title("rollout error per step (held-out)")
    fig.tight_layout()
    fig.savefig(out / "rollout_error.png", dpi=90)
    plt.close(fig)
    made.append("rollout_error.png")

    if images is not None:
        dit, sin = images["dit"], images["sindy"]
        n = dit.shape[0]
        fig, axes = plt.subplots(2, n, figsize=(0.9 * n, 2.1), squeeze=False)
        for i in range(n):
            for r, (imgs, label) in enumerate(((dit, "DiT"), (sin, "SINDy"))):
                axes[r, i].imshow(imgs[i], cmap="gray", vmin=0, vmax=1)
                axes[r, i].set_xticks([])
                axes[r, i].set_yticks([])
            if i == 0:
                axes[0, 0].set_ylabel("DiT", fontsize=7)
                axes[1, 0].set_ylabel("SINDy", fontsize=7)
        fig.suptitle("same initial noise: DiT sample (top) vs integrated equations (bottom)", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "samples_vs_sindy.png", dpi=90)
        plt.close(fig)
        made.append("samples_vs_sindy.png")
    return made


def _tensorboard(tb_dir: Path, md: str, out: Path, pngs: list[str], fits: list[dict]) -> None:
    import matplotlib.image as mpimg
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tb_dir))
    w.add_text("sindy/report", md, 0)
    for name in pngs:
        img = mpimg.imread(out / name)[..., :3]  # (H, W, 3) float in [0, 1]
        w.add_image(f"sindy/{Path(name).stem}", img, 0, dataformats="HWC")
    for r in fits:
        w.add_scalar("sindy/r2_heldout", r["r2_heldout"], r["dim"])
        w.add_scalar("sindy/r2_train", r["r2_train"], r["dim"])
        w.add_scalar("sindy/n_terms", r["n_terms"], r["dim"])
    w.close()


# ----------------------------------------------------------------------------- report


def optimizer_text(ctx: ReportContext) -> str:
    if ctx.optimizer == "sr3":
        return f"SR3 (L0 prox, nu {ctx.sr3_nu}, normalised columns {ctx.normalize}; pysindy.SR3 on the Gram square root)"
    return f"STLSQ (alpha {ctx.alpha}, normalised columns {ctx.normalize})"


def library_text(library, xi) -> str:
    """The library family by family (Library.family_slices) with how many of its terms the equations use."""
    parts = []
    for fam, sl in library.family_slices():
        used = int(np.count_nonzero(np.any(xi[:, sl] != 0, axis=0)))
        parts.append(f"{fam.kind} {sl.stop - sl.start} ({used} used)")
    return ", ".join(parts)


def windows_text(windows: list[dict]) -> str:
    return " / ".join("-" if w["r2_heldout"] is None else f"{w['r2_heldout']:.3f}" for w in windows)


def write_report(out: Path, tb_dir: Path, fits: list[dict], library, ctx: ReportContext, roll: dict,
                 images: dict | None, views: dict | None = None) -> Path:
    """Write report.md, equations.json, equations.tex, plots and TensorBoard; returns report.md.

    Args:
        out: report folder (created).
        tb_dir: TensorBoard folder (``runs/<name>/tb/sindy``).
        fits: per-dimension results of analysis.dimension_fit.fit_dimension, in dimension order.
        library: the analysis.library.Library (bound to d).
        ctx: the run's data, settings and provenance.
        roll: rollouts: t (T+1,), index (r,), reference/sindy (T+1, r, d), rmse_per_step (T+1,),
            diverged (r,).
        images: {"dit", "sindy"} (r, 28, 28) in [0, 1], or None when there is no decoder.
        views: analysis.views.theory_views + "validation" (what the equations generate, the fit space,
            the mixture view), or None: written at the top of report.md and in equations.json.
    """
    out.mkdir(parents=True, exist_ok=True)
    d = len(fits)
    names = library.get_feature_names("text")
    latex = library.get_feature_names("latex")
    xi = np.zeros((d, len(names)))
    for r in fits:
        for term in r["terms"]:
            xi[r["dim"], term["index"]] = term["coef"]
        r["flag"] = flag_of(r, ctx.poor_r2)
    pngs = _plots(out, fits, xi, names, roll, images) + theory_plots(out, views)
    flagged = [r for r in fits if r["flag"]]
    end_err = float(np.nanmean(np.abs(roll["sindy"][-1] - roll["reference"][-1]))) if roll["sindy"].size else float("nan")

    L = [f"# SINDy equations of `{ctx.run}`", ""]
    L += validation_section(views, ctx)
    L += [f"- data: {ctx.n} trajectories ({ctx.source}), sampler **{ctx.sampler}**, T = {ctx.T} steps, "
          f"seed {ctx.seed}; split by trajectory: {ctx.n_train} training / {ctx.n_heldout} held-out",
          f"- target: **{ctx.target}** ({ctx.target_note})",
          f"- time: {ctx.t_convention}",
          f"- coordinates: {ctx.coordinates}",
          *coordinate_choice_lines(views.get("coordinate_choice")),
          f"- library: {len(names)} terms per dimension: {library_text(library, xi)} (spec in equations.json)",
          *([f"- families that must earn their place (best held-out unexplained variance at most "
             f"{fits[0]['gated_families']['gate']:g} x that without them): kept in "
             f"{sum(bool(r['gated_families']['kept']) for r in fits)} of {d} dimensions"]
            if fits and fits[0].get("gated_families") else []),
          f"- threshold: {optimizer_text(ctx)}, "
          f"{ctx.n_thresholds} thresholds; rule: {fits[0]['rule']}",
          f"- uncertainty: bagging over {ctx.n_groups} trajectory groups, {ctx.n_bootstrap} resamples",
          f"- provenance: {ctx.provenance}", ""]
    for w in ctx.warnings:
        L += [f"> **Warning:** {w}", ""]
    budget = ctx.term_budget
    wins = fits[0].get("r2_heldout_windows") or []
    wlabel = " / ".join(f"{w['t_from']:.2g}-{w['t_to']:.2g}" for w in wins)
    L += ["## Fit quality per dimension", "",
          f"Held-out trajectories never enter the fit. Flag: held-out R^2 < {ctx.poor_r2} or more than 0.2 "
          "below training R^2.", "",
          f"The equations keep at most {budget} terms (`sindy.term_budget`); beside them the model the same rule picks "
          "without the budget, and the cost of the budget in held-out R^2. "
          + (f"R^2 per window of t ({wlabel}) shows where the equations fail." if wins else ""), "",
          "| dim | terms | R^2 train | R^2 held-out | RMSE held-out | flag | unrestricted: terms, R^2 held-out | cost |"
          + (" R^2 held-out per window of t |" if wins else ""),
          "|---|---|---|---|---|---|---|---|" + ("---|" if wins else "")]
    for r in fits:
        u = r.get("unrestricted")
        un = f"{u['n_terms']}, {u['r2_heldout']:.4f} | {u['r2_heldout'] - r['r2_heldout']:+.4f}" if u else "- | -"
        L.append(f"| z{r['dim']} | {r['n_terms']} | {r['r2_train']:.4f} | {r['r2_heldout']:.4f} | "
                 f"{fmt(r['rmse_heldout'])} | {'**POOR** ' + r['flag'] if r['flag'] else 'ok'} | {un} |"
                 + (f" {windows_text(r['r2_heldout_windows'])} |" if wins else ""))
    L += ["", f"**{len(flagged)} of {d} dimensions do not generalise.**" if flagged else
          f"All {d} dimensions generalise to held-out trajectories.", ""]
    if fits and fits[0].get("free_time", {}).get("skipped"):
        L += ["### Free-time reference: skipped", "", fits[0]["free_time"]["skipped"], ""]
    elif all("free_time" in r and "r2_heldout" in r["free_time"] for r in fits):
        deg = fits[0]["free_time"]["degree"]
        L += ["### What limits the fit: a free-time reference", "",
              f"A separate degree-{deg} polynomial in z for every sampler step (ridge; any time dependence, "
              f"{Polynomial(degree=deg).n_output_features(d)} terms per step), fitted on the same training and scored on the same held-out "
              "trajectories. If it also stays far below 1, the time terms are not the bottleneck: the velocity is not "
              "a low-degree polynomial of the state (for a trained DiT, the denoiser's nonlinearity). Where SINDy beats "
              "it, its cubic and exponential terms capture state dependence that a quadratic cannot.", "",
              f"| dim | R^2 held-out (SINDy) | R^2 held-out (per-step degree {deg}) | R^2 train (per-step) |",
              "|---|---|---|---|"]
        for r in fits:
            f = r["free_time"]
            L.append(f"| z{r['dim']} | {r['r2_heldout']:.4f} | {f['r2_heldout']:.4f} | {f['r2_train']:.4f} |")
        L.append("")
    if any("other_target" in r for r in fits):
        o = fits[0]["other_target"]["target"]
        L += [f"## Target comparison: {ctx.target} vs {o}", "",
              "Same states, same library, same threshold rule; only the velocity estimate differs.", "",
              f"| dim | R^2 held-out ({ctx.target}) | R^2 held-out ({o}) | terms ({ctx.target}) | terms ({o}) |",
              "|---|---|---|---|---|"]
        for r in fits:
            a = r["other_target"]
            L.append(f"| z{r['dim']} | {r['r2_heldout']:.4f} | {a['r2_heldout']:.4f} | {r['n_terms']} | {a['n_terms']} |")
        L.append("")
    L += ["## Equations", "", "Coefficients of the chosen model; in brackets the bagging inclusion probability "
          "and the coefficient std over resamples.", ""]
    for r in fits:
        how = "forward stepwise" if r.get("method") == "forward stepwise" else f"threshold {fmt(r['threshold'])}"
        L.append(f"### z{r['dim']} ({r['n_terms']} terms, {how})")
        L += ["", "```", equation_text(r["dim"], r["terms"]), "```", ""]
        if r["terms"] and r["terms"][0]["inclusion_probability"] is not None:
            L.append(", ".join(f"{t['name']} [{t['inclusion_probability']:.2f}, ±{fmt(t['coef_std'])}]"
                               for t in r["terms"][:30]) + (" ..." if len(r["terms"]) > 30 else ""))
            L.append("")
    L += ["## Validation by integration", "",
          f"The discovered equations integrated with **{ctx.integrator}** on the sampler's grid (t from 1 to 0, "
          f"dt = 1/{ctx.T}) from the initial noise of {len(roll['index'])} held-out trajectories, compared with "
          "the DiT's trajectories from the same noise.", "",
          f"- RMSE per step at t = 1, 0.5, 0: {fmt(roll['rmse_per_step'][0])}, "
          f"{fmt(roll['rmse_per_step'][len(roll['t']) // 2])}, {fmt(roll['rmse_per_step'][-1])}",
          f"- mean |SINDy - DiT| of the end state: {fmt(end_err)}",
          f"- diverged rollouts (|z| > {DIVERGED:g} or non-finite): {int((roll['diverged'] >= 0).sum())} of "
          f"{len(roll['index'])}", ""]
    if images is not None:
        L += [f"Decoded end states (mean absolute pixel difference DiT vs SINDy: {images['pixel_diff']:.4f}); "
              "the SINDy row decodes the rollout's own end state.", "", "![samples](samples_vs_sindy.png)", ""]
    else:
        L += ["No decoded images: these trajectories come from outside this run, so no decoder of theirs is available.", ""]
    L += theory_sections(views)
    L += ["## Plots", ""] + [f"![{p}]({p})" for p in pngs if p not in ("samples_vs_sindy.png", "mixture_means.png")] + [""]
    if ctx.report_t0 is not None:
        ctx.stage_times["report"] = (time.time() - ctx.report_t0, "integration, decoding, plots (until report.md)")
    L += ["## Stage times", "", "| stage | seconds | |", "|---|---|---|"]
    for k, (sec, note) in ctx.stage_times.items():
        L.append(f"| {k} | {sec:.1f} | {note} |")
    md = "\n".join(L) + "\n"
    atomic_write_text(out / "report.md", md)

    eq = {"format": "latent-sindy.equations/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
          "run": ctx.run, "source": ctx.source, "n_trajectories": ctx.n, "n_train": ctx.n_train,
          "n_heldout": ctx.n_heldout, "seed": ctx.seed, "sampler": ctx.sampler, "target": ctx.target,
          "timesteps": ctx.T, "t_convention": ctx.t_convention, "coordinates": ctx.coordinates,
          "digests": ctx.digests, "library": library.spec(), "n_terms": len(names), "term_names": names,
          "optimizer": optimizer_text(ctx), "selection_rule": fits[0]["rule"], "term_budget": ctx.term_budget, "poor_r2": ctx.poor_r2, "integrator": ctx.integrator,
          "dims": [{k: v for k, v in r.items() if k != "rule"} for r in fits],
          "flagged_dims": [r["dim"] for r in flagged],
          "rollout": {"index": [int(i) for i in roll["index"]], "rmse_per_step": [float(x) for x in roll["rmse_per_step"]],
                      "diverged_at": [int(x) for x in roll["diverged"]], "end_state_mean_abs_diff": end_err},
          "stage_times": {k: v[0] for k, v in ctx.stage_times.items()}}
    if views:
        eq.update({k: _json_safe(views[k]) for k in ("validation", "fit_space", "mixture", "coordinate_choice")
                   if k in views})
    atomic_write_text(out / "equations.json", json.dumps(eq, indent=1, allow_nan=True))

    tex = ["% Generated by analysis/sindy_job.py", r"\begin{align*}"]
    tex += [equation_latex(r["dim"], r["terms"], latex) + (r" \\" if i < d - 1 else "") for i, r in enumerate(fits)]
    tex.append(r"\end{align*}")
    atomic_write_text(out / "equations.tex", "\n".join(tex) + "\n")
    np.savez_compressed(out / "rollouts.npz", t=roll["t"], index=roll["index"], reference=roll["reference"],
                        sindy=roll["sindy"], **({} if images is None else {"images_dit": images["dit"],
                                                                          "images_sindy": images["sindy"]}))
    _tensorboard(tb_dir, md, out, pngs, fits)
    return out / "report.md"


# ----------------------------------------------------------------------------- issue 10 items 2-4
# What the equations generate (analysis/validation.py), the fit space with the sampler's exact linear
# part (analysis/theory.py) and the Gaussian-mixture view of the denoiser (analysis/mixture.py).


def _json_safe(x):
    """Drop the private ("_"-prefixed) entries and objects of the views; keep what JSON can hold."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items() if not str(k).startswith("_") and k != "linear_part"}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _median(r2: list) -> str:
    v = np.asarray(r2, dtype=np.float64)
    return "n/a" if not np.isfinite(v).any() else f"{np.nanmedian(v):.3f}"


def _range(r2: list) -> str:
    v = np.asarray(r2, dtype=np.float64)
    return "n/a" if not np.isfinite(v).any() else f"{np.nanmin(v):.3f} to {np.nanmax(v):.3f}"


def coordinate_choice_lines(choice: dict | None) -> list[str]:
    """One line saying which coordinates were compared and why these were kept (sindy.coordinates=auto)."""
    if not choice or len(choice["candidates"]) < 2:
        return [f"- coordinates not compared: {choice['modes_skipped']}"] if choice and "modes_skipped" in choice else []
    parts = [f"{c['kind']} {c['terms']} terms, 1-R^2 {c['unexplained_heldout']:.3g}" for c in choice["candidates"]]
    return [f"- coordinates compared (pooled held-out unexplained variance, terms in all): {'; '.join(parts)}; "
            f"kept **{choice['chosen']}** ({choice['rule']})"]


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
    L += [f"The chosen equations (fitted in **{fit_space}** space) integrated with {eq['integrator']} on the sampler's "
          f"grid from the initial noise of **{eq['n_noises']} held-out trajectories** (never seen by the fit), "
          "decoded by the run's autoencoder and compared with the DiT's own sample from the same noise"
          + (f"; beside them the closed-form ODE of a {k}-component Gaussian mixture of the training latents "
             "(no fitting to the DiT at all)" if mix else "") + ".", ""]
    cols = [("equations", eq)] + ([(f"mixture ODE (K = {k})", mix)] if mix else [])
    L += ["| | " + " | ".join(c for c, _ in cols) + " | DiT |", "|---|" + "---|" * (len(cols) + 1)]
    img = [m.get("images") for _, m in cols]
    if all(img):
        n = img[0]["n"]
        L.append("| same digit as the DiT (MNIST classifier) | " + " | ".join(f"**{_pct(m['class_agreement'])}**"
                                                                           for m in img) + " | 100% |")
        L.append(f"| FD-MNIST ({n} images each) | " + " | ".join(f"{m['fd_mnist']['generated']:.2f}" for m in img)
                 + f" | {img[0]['fd_mnist']['dit']:.2f} |")
        L.append("| mean classifier confidence | " + " | ".join(f"{m['mean_confidence']['generated']:.3f}" for m in img)
                 + f" | {img[0]['mean_confidence']['dit']:.3f} |")
    L.append("| latent RMSE vs the DiT at t = 0.5 | " + " | ".join(fmt(m["latent_rmse_mid"]) for _, m in cols) + " | 0 |")
    L.append("| latent RMSE vs the DiT at t = 0 | " + " | ".join(fmt(m["latent_rmse_end"]) for _, m in cols)
             + f" | 0 (RMS of its samples: {fmt(eq['latent_scale_end'])}) |")
    L.append(f"| diverged rollouts (a coordinate beyond {DIVERGED:g}: grey images, left out of the RMSE) | "
             + " | ".join(str(m["diverged"]) for _, m in cols) + " | |")
    L.append("")
    if all(img):
        floor = img[0].get("fd_floor_at_n")
        L += [f"FD-MNIST is biased upward at small N: compare the columns with each other (same {img[0]['n']} noises), "
              + (f"and with real digits at about this N (floor {floor:.2f} at N = {img[0]['fd_floor_n']})." if floor
                 else "not with FDs at other N."), ""]
    else:
        why = eq.get("images_skipped") or (mix or {}).get("images_skipped")
        L += [f"No image metrics: {why}.", ""]
    L += ["Per-step latent error: `validation_rmse.png`; equations.json holds it under `validation`.", ""]
    return L


def theory_sections(views: dict | None) -> list[str]:
    """Sections on the fit space (eps vs drift, the sampler's exact linear part) and on the mixture view."""
    if not views:
        return []
    L: list[str] = []
    fs = views.get("fit_space")
    if fs and "skipped" not in fs:
        other = "drift" if fs["fit_space"] == "eps" else "eps"
        L += ["## The sampler's linear part: eps and drift", "",
              f"{fs['theory']}. The chosen model was fitted in **{fs['fit_space']}** space; its {other} follows exactly "
              f"({'drift = p z + q eps_fit' if other == 'drift' else 'eps = (drift_fit - p z) / q'}). Held-out R^2 of both "
              f"on {fs['n_heldout']} held-out trajectories, pooled and per window of t. q multiplies an eps "
              f"error in the drift (here |q| reaches {np.max(np.abs(fs['q'])):.3g}; about 50 at t = 1 for DDIM with the "
              "cosine schedule at T = 50), and the steps with large q hold much of the drift's variance, so drift R^2 "
              "mostly reflects those steps; the rollouts at the top say what the errors do to the samples.", ""]
        wins = fs["eps"]["windows"]
        head = " | ".join(f"t {w['t_from']:.2g}-{w['t_to']:.2g}" for w in wins)
        L += [f"| space | R^2 pooled (median over dims) | range over dims | {head} |",
              "|---|---|---|" + "---|" * len(wins)]
        for space in ("eps", "drift"):
            r = fs[space]
            L.append(f"| {space} | {_median(r['pooled'])} | {_range(r['pooled'])} | "
                     + " | ".join(_median(w["r2"]) for w in r["windows"]) + " |")
        L += ["", "| dim | R^2 eps | R^2 drift |", "|---|---|---|"]
        for j, (a, b) in enumerate(zip(fs["eps"]["pooled"], fs["drift"]["pooled"])):
            L.append(f"| z{j} | {a:.4f} | {b:.4f} |")
        L.append("")
    mx = views.get("mixture")
    if mx and "skipped" in mx:
        L += ["## Gaussian-mixture view of the denoiser", "", f"Not run: {mx['skipped']}.", ""]
    elif mx:
        L += ["## Gaussian-mixture view of the denoiser", "",
              f"A K-component Gaussian mixture fitted by EM (scikit-learn, full covariances) to {mx['n_train']} "
              f"normalised training latents, K chosen by the mean log-likelihood of {mx['heldout']}. Its exact "
              "eps*(z, t) = s sum_k r_k(z, t) (a^2 S_k + s^2 I)^-1 (z - a mu_k) and drift p z + q eps* are scored "
              "against the DiT's eps and drift on the held-out trajectories **with no fitting to the DiT**.", "",
              "| K | log-lik train | log-lik held-out | EM seconds | R^2 eps (median over dims) | R^2 drift (median) | chosen |",
              "|---|---|---|---|---|---|---|"]
        for r in mx["grid"]:
            L.append(f"| {r['k']} | {r['loglik_train']:.3f} | {r['loglik_heldout']:.3f} | {r['seconds']:.1f} | "
                     f"{_median(r['eps']['pooled'])} | {_median(r['drift']['pooled'])} | {'**yes**' if r['chosen'] else ''} |")
        wins = mx["eps"]["windows"]
        L += ["", f"K = {mx['k']} per window of t (median over dims):", "",
              "| | " + " | ".join(f"t {w['t_from']:.2g}-{w['t_to']:.2g}" for w in wins) + " |",
              "|---|" + "---|" * len(wins)]
        for space in ("eps", "drift"):
            L.append(f"| R^2 {space} | " + " | ".join(_median(w["r2"]) for w in mx[space]["windows"]) + " |")
        L += ["", f"| dim | R^2 eps (K = {mx['k']}) | R^2 drift (K = {mx['k']}) |", "|---|---|---|"]
        for j, (a, b) in enumerate(zip(mx["eps"]["pooled"], mx["drift"]["pooled"])):
            L.append(f"| z{j} | {a:.4f} | {b:.4f} |")
        L.append("")
        if "_mean_images" in mx:
            L += ["The component means decoded (weight above each):", "", "![mixture means](mixture_means.png)", ""]
    return L


def theory_plots(out: Path, views: dict | None) -> list[str]:
    """validation_rmse.png (per-step latent error of the rollouts) and mixture_means.png; returns the names."""
    if not views:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    val = views.get("validation", {})
    if "equations" in val:
        fig, ax = plt.subplots(figsize=(5, 3))
        T = len(val["equations"]["latent_rmse_per_step"]) - 1
        t = 1 - np.arange(T + 1) / T
        for name, label in (("equations", "equations"), ("mixture", "mixture ODE")):
            if name in val:
                ax.semilogy(t, val[name]["latent_rmse_per_step"], "-", label=label)
        ax.invert_xaxis()
        ax.set_xlabel("t (1 = noise -> 0 = sample)")
        ax.set_ylabel("latent RMSE vs DiT")
        ax.set_title(f"{val['equations']['n_noises']} held-out noises", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "validation_rmse.png", dpi=90)
        plt.close(fig)
        made.append("validation_rmse.png")
    mx = views.get("mixture", {})
    if "_mean_images" in mx:
        imgs, w = mx["_mean_images"], np.asarray(mx["weights"])
        order = np.argsort(-w)
        cols = min(10, len(order))
        rows = math.ceil(len(order) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols, 1.05 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, i in zip(axes.flat, order):
            ax.imshow(imgs[i], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{w[i]:.2f}", fontsize=6)
        fig.suptitle(f"mixture component means (K = {len(w)}), decoded", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "mixture_means.png", dpi=90)
        plt.close(fig)
        made.append("mixture_means.png")
    return made
