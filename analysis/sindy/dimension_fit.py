"""One target dimension's fit, the body of the SINDy job's fit tasks: threshold sweep (with the family gate), the
chosen model, bagging over trajectory groups and the metrics, written as one JSON file per dimension."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import numpy as np

from analysis.sindy.optimizers import SR3, STLSQ, ForwardStepwise
from analysis.sindy.selection import bagging_gram, sweep_with_gate

__all__ = ["FitSettings", "fit_dimension"]


@dataclasses.dataclass(frozen=True)
class FitSettings:
    """What every dimension's fit task needs besides the statistics (a plain picklable record: Ray ships it).

    Attributes:
        optimizer: "stlsq" or "sr3"; sr3_nu: SR3's relaxation.
        alpha, normalize: STLSQ's ridge weight and column normalisation.
        n_thresholds, tol: the sweep's grid size and the rule's tolerance on unexplained variance.
        n_bootstrap, seed: bagging resamples and seed (+ dim per dimension).
        d: the state dimension; compare: also fit the other target (columns d..2d-1).
        targets: the targets' names, main first.
        names: the library's term names (text).
        term_budget: the chosen model's most terms (None: no budget).
        window_edges: W + 1 times, the windows of t of the held-out R^2.
        gated_columns: columns of the families that must earn their place; gate: their factor.
    """

    optimizer: str
    sr3_nu: float
    alpha: float
    normalize: bool
    n_thresholds: int
    tol: float
    n_bootstrap: int
    seed: int
    d: int
    compare: bool
    targets: list
    names: list
    term_budget: int | None
    window_edges: list
    gated_columns: list
    gate: float


def fit_dimension(dim: int, train, heldout, groups: list, settings: FitSettings, windows: list | None = None) -> dict:
    """Threshold sweep, chosen model, bagging and metrics for one target dimension (writes nothing).

    Args:
        dim: target dimension j (0..d-1); with ``settings.compare`` column d + j is the other target.
        train, heldout: GramStats (p terms, m targets) of training and held-out trajectories.
        groups: per-group training GramStats for bagging (may be empty).
        settings: the fit's settings.
        windows: W held-out GramStats, one per window of t (None entries for empty windows), for R^2 per window.

    Returns:
        The JSON-able result.
    """
    t0 = time.time()
    if settings.optimizer == "sr3":
        opt = SR3(relax_coeff_nu=settings.sr3_nu, normalize_columns=settings.normalize)
    else:
        opt = STLSQ(alpha=settings.alpha, normalize_columns=settings.normalize)

    budget = settings.term_budget
    names = settings.names

    def per_window(coef: np.ndarray, col: int) -> list:
        edges = settings.window_edges or []
        return [
            {
                "t_from": edges[w],
                "t_to": edges[w + 1],
                "r2_heldout": None if s is None else float(s.r2(coef[None], [col])[0]),
            }
            for w, s in enumerate(windows or [])
        ]

    def one(col: int) -> tuple[dict, Any]:
        sw, gate = sweep_with_gate(
            train,
            heldout,
            col,
            opt,
            settings.gated_columns or [],
            settings.gate,
            n_thresholds=settings.n_thresholds,
            tol=settings.tol,
            max_terms=budget,
        )
        coef = sw.chosen_coef
        rss_tr = float(train.rss(coef[None], [col])[0])
        rss_ho = float(heldout.rss(coef[None], [col])[0])
        un = sw.coefs[sw.unrestricted]
        res = {
            "threshold": sw.chosen_threshold,
            "method": "forward stepwise" if np.isnan(sw.chosen_threshold) else "STLSQ",
            "n_terms": int(np.count_nonzero(coef)),
            "r2_train": float(sw.r2_train[sw.chosen]),
            "r2_heldout": float(sw.r2_heldout[sw.chosen]),
            "rmse_train": (rss_tr / train.n_samples) ** 0.5,
            "rmse_heldout": (rss_ho / heldout.n_samples) ** 0.5,
            "rss_heldout": rss_ho,
            "tss_heldout": float(heldout.tss([col])[0]),
            "r2_heldout_windows": per_window(coef, col),
            "unrestricted": {
                "n_terms": int(np.count_nonzero(un)),
                "threshold": float(sw.thresholds[sw.unrestricted]),
                "r2_train": float(sw.r2_train[sw.unrestricted]),
                "r2_heldout": float(sw.r2_heldout[sw.unrestricted]),
                "r2_heldout_windows": per_window(un, col),
                "terms": [{"index": int(k), "name": names[k], "coef": float(un[k])} for k in np.flatnonzero(un)],
            },
            "sweep": sw.table(),
            "rule": sw.rule,
            "gated_families": None if gate is None else {k: v for k, v in gate.items() if k != "keep"},
        }
        res["_keep"] = None if gate is None else gate["keep"]
        return res, sw

    main, sw = one(dim)
    keep = main.pop("_keep")
    coef = sw.chosen_coef
    support = np.flatnonzero(coef)
    incl = std = mean = None
    if settings.n_bootstrap > 0 and len(groups) >= 2 and support.size:
        cols = np.arange(train.n_terms) if keep is None else np.asarray(keep)  # a dropped family stays dropped
        chosen_opt = (
            ForwardStepwise(int(np.count_nonzero(coef)), settings.normalize)
            if np.isnan(sw.chosen_threshold)
            else opt.with_threshold(sw.chosen_threshold)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bag = bagging_gram(
                [g.subset(cols) for g in groups] if keep is not None else groups,
                chosen_opt,
                settings.n_bootstrap,
                settings.seed + dim,
                dims=[dim],
            )
        incl, std, mean = (np.zeros(train.n_terms) for _ in range(3))
        incl[cols], std[cols], mean[cols] = bag.inclusion_probability[0], bag.coef_std[0], bag.coef_mean[0]
    main["terms"] = [
        {
            "index": int(k),
            "name": names[k],
            "coef": float(coef[k]),
            "inclusion_probability": None if incl is None else float(incl[k]),
            "coef_std": None if std is None else float(std[k]),
            "coef_mean_bagged": None if mean is None else float(mean[k]),
        }
        for k in support
    ]
    if incl is not None:  # terms the bootstrap picks often although the chosen model dropped them
        others = [k for k in np.argsort(-incl) if coef[k] == 0 and incl[k] >= 0.5][:10]
        main["frequent_excluded_terms"] = [{"name": names[k], "inclusion_probability": float(incl[k])} for k in others]
    result = {"dim": dim, "target": settings.targets[0], **main}
    if settings.compare:
        alt, _ = one(settings.d + dim)
        alt.pop("sweep")
        alt.pop("_keep")
        alt["unrestricted"].pop("terms")
        result["other_target"] = {"target": settings.targets[1], **alt}
    result["seconds"] = round(time.time() - t0, 2)
    return result
