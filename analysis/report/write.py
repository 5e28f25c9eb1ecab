"""The consolidated equation report: report.md, equations.json/.tex, rollouts.npz, plots and TensorBoard.

References:
    S. L. Brunton, J. L. Proctor, J. N. Kutz, PNAS 113(15):3932, 2016 (a SINDy model is judged by
    simulating it, not only by its regression fit; the rollouts: analysis/sindy/integration.py); U. Fasel et al.,
    Proc. R. Soc. A 478:20210904, 2022 (inclusion probabilities from bagging). The study whose honesty we
    check: the SINDy study in docs/REFERENCES.md.

The outputs, one module each: report.md (analysis/report/markdown.py), equations.json, equations.tex and
rollouts.npz (analysis/report/equations.py), the plots and TensorBoard (analysis/report/plots.py). The SINDy
images come from the *rollout's* end state, never from the DiT's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from analysis.report.context import ReportContext
from analysis.report.equations import write_equations_json, write_equations_tex, write_rollouts
from analysis.report.markdown import report_markdown
from analysis.report.plots import fit_plots, theory_plots, write_tensorboard
from configs.io import atomic_write_text

__all__ = ["ReportContext", "flag_of", "write_report"]


def flag_of(r: dict, poor: float) -> str:
    """Why a dimension's equation does not generalise, or ''."""
    if not math.isfinite(r["r2_heldout"]) or r["r2_heldout"] < poor:
        return f"held-out R^2 {r['r2_heldout']:.3f} < {poor}"
    if r["r2_train"] - r["r2_heldout"] > 0.2:
        return f"held-out R^2 {r['r2_heldout']:.3f} far below training {r['r2_train']:.3f}"
    return ""


def write_report(
    out: Path,
    tb_dir: Path,
    fits: list[dict],
    library,
    ctx: ReportContext,
    roll: dict,
    images: dict | None,
    views: dict | None = None,
) -> Path:
    """Write report.md, equations.json, equations.tex, rollouts.npz, plots and TensorBoard; returns report.md.

    Args:
        out: report folder (created).
        tb_dir: TensorBoard folder (``runs/<name>/tb/sindy``).
        fits: per-dimension results of analysis.sindy.dimension_fit.fit_dimension, in dimension order; each gets its "flag".
        library: the analysis.sindy.library.Library (bound to d).
        ctx: the run's data, settings and provenance.
        roll: rollouts: t (T+1,), index (r,), reference/sindy (T+1, r, d), rmse_per_step (T+1,),
            diverged (r,).
        images: {"dit", "sindy"} (r, 28, 28) in [0, 1], or None when there is no decoder.
        views: analysis.job.views.theory_views + "validation" (what the equations generate, the fit space,
            the mixture view), or None: written at the top of report.md and in equations.json.
    """
    out.mkdir(parents=True, exist_ok=True)
    names = library.get_feature_names("text")
    xi = np.zeros((len(fits), len(names)))
    for r in fits:
        for term in r["terms"]:
            xi[r["dim"], term["index"]] = term["coef"]
        r["flag"] = flag_of(r, ctx.settings.poor_r2)
    pngs = fit_plots(out, fits, xi, names, roll, images) + theory_plots(out, views)
    end_err = (
        float(np.nanmean(np.abs(roll["sindy"][-1] - roll["reference"][-1]))) if roll["sindy"].size else float("nan")
    )
    if ctx.report_t0 is not None:
        ctx.stage_times["report"] = (time.time() - ctx.report_t0, "integration, decoding, plots (until report.md)")
    md = report_markdown(fits, library, xi, ctx, roll, images, views, pngs, end_err)
    atomic_write_text(out / "report.md", md)
    write_equations_json(out / "equations.json", fits, library, ctx, roll, end_err, views)
    write_equations_tex(out / "equations.tex", fits, library)
    write_rollouts(out / "rollouts.npz", roll, images)
    write_tensorboard(tb_dir, md, out, pngs, fits)
    return out / "report.md"
