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
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from analysis.report.context import ReportContext
from analysis.report.equations import write_equations_json, write_equations_tex, write_rollouts
from analysis.report.markdown import report_markdown
from analysis.report.plots import fit_plots, theory_plots, write_tensorboard
from configs.errors import UserError
from configs.io import TMP_PREFIX, atomic_write_text, replace_folder

__all__ = ["REPORT_FAULT_ENV", "ReportContext", "flag_of", "write_report"]

REPORT_FAULT_ENV = "LATENT_SINDY_FAULT_REPORT_BYTES"


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
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write report.md, equations.json, equations.tex, rollouts.npz, plots and TensorBoard; returns report.md.

    All or nothing: the files are written into a temporary folder beside ``out`` and swapped in whole; so are the
    TensorBoard events (a rerun replaces them instead of adding a second set).

    Args:
        out: report folder (created; the job's is ``runs/<name>/reports/<fingerprint>``).
        tb_dir: TensorBoard folder of this report alone (``runs/<name>/tb/sindy/<fingerprint>``; replaced whole).
        fits: per-dimension results of analysis.sindy.dimension_fit.fit_dimension, in dimension order; each gets its "flag".
        library: the analysis.sindy.library.Library (bound to d).
        ctx: the run's data, settings and provenance.
        roll: rollouts: t (T+1,), index (r,), reference/sindy (T+1, r, d), rmse_per_step (T+1,),
            diverged (r,).
        images: {"dit", "sindy"} (r, 28, 28) in [0, 1], or None when there is no decoder.
        views: analysis.job.views.theory_views + "validation" (what the equations generate, the fit space,
            the mixture view), or None: written at the top of report.md and in equations.json.
        extra: writes more files into the report folder before it is swapped in (the coordinates).

    Raises:
        UserError: a write failed (disk full, ...): one line; the previous report is left as it was.
    """
    # Written into a temporary folder beside ``out`` and swapped in whole (configs.io.replace_folder): a failure
    # part way (a full disk) leaves the previous complete report, or none, never new plots beside old equations.
    # The events go to a temporary folder too, swapped in just before the report (its events are there when it is).
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}.{os.getpid()}")
    tb_tmp = tb_dir.with_name(f"{TMP_PREFIX}{tb_dir.name}.{os.getpid()}")

    def discard_temporaries() -> None:
        for t in (tmp, tb_tmp):
            shutil.rmtree(t, ignore_errors=True)

    discard_temporaries()
    try:
        with _fault_file_size_limit():
            tmp.mkdir(parents=True)
            md, pngs = _write_files(tmp, fits, library, ctx, roll, images, views)
            if extra is not None:
                extra(tmp)
            tb_tmp.mkdir(parents=True)
            write_tensorboard(tb_tmp, md, tmp, pngs, fits)
            replace_folder(tb_tmp, tb_dir)
            replace_folder(tmp, out)
    except OSError as e:
        discard_temporaries()
        raise UserError(
            f"could not write the report into {out}: {e.strerror or e} ({e.filename}); the previous report is "
            "unchanged (or there is none); free some disk space and rerun the job (its fits are kept)"
        ) from None
    except BaseException:
        discard_temporaries()
        raise
    return out / "report.md"


def _write_files(out: Path, fits, library, ctx: ReportContext, roll: dict, images, views) -> tuple[str, list]:
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
    return md, pngs


@contextmanager
def _fault_file_size_limit() -> Iterator[None]:
    """Test hook (like analysis.job.ray_utils.FAULT_ENV): with $LATENT_SINDY_FAULT_REPORT_BYTES set, the kernel
    refuses this process's writes past that many bytes per file while the report is written (EFBIG, what a full
    disk does with ENOSPC), so the tests meet a real write failure part way through the report."""
    limit = os.environ.get(REPORT_FAULT_ENV)
    if not limit:
        yield
        return
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)
