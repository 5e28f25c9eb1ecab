"""Choose the SINDy defaults (library, ridge alpha, threshold grid, selection tolerance, term budget)
by measurement on systems whose equations are known (benchmarks/known_systems.py):

    python -m benchmarks.bench_sindy_rule [--quick]

For each setting and system it splits trajectories 80/20 (held out by trajectory, as the job), streams
the library into Gram statistics, sweeps STLSQ thresholds per dimension and applies the rule
(analysis.sindy.selection.choose_model). Printed per row: terms per dimension (median, max), held-out R^2 (min,
median), and the system's own check: Lorenz exact support (7 terms) and worst relative coefficient
error; Gaussian DDIM whether every chosen term is z-linear (times a time function); mixture the
fraction of dimensions with R^2 >= 0.99 within the budget. The last rows compare the coordinates the job
chooses between (sindy.coordinates): the systems' own and the dynamics' linear modes (analysis/sindy/coordinates.py),
with the pooled held-out unexplained variance (sum RSS / sum TSS, unchanged by a rotation) the job compares.
The library is the job's default less the mixture family, which needs a trained run's latents.
Writes results/sindy_rule.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from analysis.sindy.build import build_library, principal_directions
from analysis.sindy.coordinates import linear_modes
from analysis.sindy.gram import GramStats
from analysis.sindy.optimizers import STLSQ
from analysis.sindy.selection import sweep_with_gate
from benchmarks import known_systems as ks
from benchmarks.common import RESULTS
from configs.sindy import SindyLibraryConfig

# A term linear in z times a function of t only (the exact form of DDIM on Gaussian data).
Z_LINEAR = re.compile(r"^(1|z\d+|t(\^\d+)?|z\d+ t(\^\d+)?)$")
# The job's default library (configs/sindy.py) less the mixture family, which needs a trained run's latents.
DEFAULT_LIB = {
    **dataclasses.asdict(SindyLibraryConfig()),
    "families": [f for f in SindyLibraryConfig().families if f != "mixture"],
}


def split_stats(data: dict, lib_cfg: dict, seed: int = 0, coords: str = "latent"):
    z = np.asarray(data["trajectories"], dtype=np.float64)  # (n, T+1, d)
    v = np.asarray(data["velocities"], dtype=np.float64)
    n, T1, d = z.shape
    t = np.asarray(data["t"]) if "t" in data else 1.0 - np.arange(T1) / (T1 - 1)
    perm = np.random.default_rng(seed).permutation(n)
    ho, tr = perm[: max(1, n // 5)], perm[max(1, n // 5) :]
    if coords == "modes":  # as the job: from the training trajectories' states 0..T-1 and their velocities
        m = linear_modes(z[tr, :-1].transpose(1, 0, 2), v[tr, :-1].transpose(1, 0, 2))
        z, v = z @ m.T, v @ m.T
    proj = principal_directions(z[tr, -1], lib_cfg["tanh_projections"])
    lib = build_library(SimpleNamespace(**lib_cfg), d, (float(t.min()), float(t.max())), proj)

    def stats(idx):
        zs = z[idx, :-1].reshape(-1, d)
        ts = np.tile(t[:-1], len(idx))
        return GramStats.from_library(lib, [(zs, ts, v[idx, :-1].reshape(-1, d))], device="cpu")

    return lib, stats(tr), stats(ho)


_CACHE: dict = {}


def old_rule(sw, tol: float) -> int:
    """The rule before issue 10: the sparsest model with held-out R^2 >= best - tol * |best| (no budget)."""
    score = np.where(np.isfinite(sw.r2_heldout), sw.r2_heldout, -np.inf)
    ok = np.flatnonzero(score >= score.max() - tol * abs(score.max()))
    return int(min(ok, key=lambda i: (sw.n_terms[i], -score[i], -sw.thresholds[i])))


def run(
    system: str,
    data: dict,
    lib_cfg: dict,
    alpha: float,
    tol: float,
    n_thr: int,
    budget: int | None,
    rule: str = "uv",
    gate: float | None = 0.5,
    coords: str = "latent",
) -> dict:
    t0 = time.time()
    key = (system, json.dumps(lib_cfg, sort_keys=True), coords)
    if key not in _CACHE:  # statistics depend on the data, the library and the coordinates only
        _CACHE[key] = split_stats(data, lib_cfg, coords=coords)
    lib, tr, ho = _CACHE[key]
    names = lib.get_feature_names()
    opt = STLSQ(alpha=alpha, normalize_columns=True)
    gated = [i for f, sl in lib.family_slices() if f.kind == "Tanh" for i in range(sl.start, sl.stop)] if gate else []
    rows = [
        sweep_with_gate(tr, ho, j, opt, gated, gate or 1.0, n_thresholds=n_thr, tol=tol, max_terms=budget)[0]
        for j in range(tr.n_targets)
    ]
    if rule == "r2":
        for sw in rows:
            sw.chosen = sw.unrestricted = old_rule(sw, tol)
    coefs = [sw.chosen_coef for sw in rows]
    r2 = np.array([sw.r2_heldout[sw.chosen] for sw in rows])
    best = np.array([sw.r2_heldout[sw.unrestricted] for sw in rows])
    terms = np.array([np.count_nonzero(c) for c in coefs])
    tss = ho.tss()
    uv = float(sum(ho.rss(c[None], [j])[0] for j, c in enumerate(coefs)) / tss.sum())
    out = {
        "system": system,
        "coords": coords,
        "library": lib_cfg["preset"],
        "rule": rule,
        "gate": gate,
        "alpha": alpha,
        "tol": tol,
        "n_thresholds": n_thr,
        "budget": budget,
        "terms_total": int(terms.sum()),
        "uv_pooled": uv,
        "library_terms": lib.n_terms,
        "terms_median": float(np.median(terms)),
        "terms_max": int(terms.max()),
        "r2_min": float(r2.min()),
        "r2_median": float(np.median(r2)),
        "r2_unrestricted_min": float(best.min()),
        "seconds": round(time.time() - t0, 2),
    }
    if system == "lorenz":
        err, exact = 0.0, True
        for j, truth in enumerate(ks.LORENZ_TERMS):
            got = {names[k]: coefs[j][k] for k in np.flatnonzero(coefs[j])}
            exact &= set(got) == set(truth)
            err = max([err] + [abs(got[k] / truth[k] - 1) for k in truth if k in got])
        out["check"] = f"exact support {exact}, max rel coef err {err:.1e}"
        out["ok"] = bool(exact and err < 1e-3)
    elif system == "gaussian":
        linear = all(Z_LINEAR.match(names[k]) for c in coefs for k in np.flatnonzero(c))
        linear_un = all(Z_LINEAR.match(names[k]) for sw in rows for k in np.flatnonzero(sw.coefs[sw.unrestricted]))
        out["check"] = f"z-linear only: chosen {linear}, unrestricted {linear_un}"
        out["ok"] = bool(linear and r2.min() >= 0.999)  # the chosen (budgeted) model: what the job reports
    else:
        frac = float(np.mean(r2 >= 0.99))
        out["check"] = f"{100 * frac:.0f}% dims R^2 >= 0.99"
        out["ok"] = bool(frac == 1.0 and terms.max() <= 30)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer settings")
    ap.add_argument("--full", action="store_true", help="also the reference library on the 16-D systems (slow)")
    ap.add_argument("--coords", action="store_true", help="only the chosen settings in both coordinate systems")
    ap.add_argument("--out", default=str(RESULTS / "sindy_rule.json"))
    args = ap.parse_args(argv)
    n = 60 if args.quick else 200
    systems = {"lorenz": ks.lorenz(), "gaussian": ks.gaussian_ddim(n=n), "mixture": ks.mixture_ddim(n=n)}
    ref_lib = {**DEFAULT_LIB, "preset": "reference"}
    # (library, rule, alpha, tol, thresholds, budget): the settings before issue 10, then the candidates.
    grid = [(ref_lib, "r2", 0.05, 0.01, 20, None, None), (DEFAULT_LIB, "r2", 0.0, 0.01, 20, None, None)]
    grid += [(DEFAULT_LIB, "uv", a, 0.05, 30, 30, g) for a in (0.0, 0.05) for g in (None, 0.5)]
    grid += [(DEFAULT_LIB, "uv", 0.0, 0.2, 30, 30, 0.5), (DEFAULT_LIB, "uv", 0.0, 0.05, 30, 50, 0.5)]
    grid = [(*g, "latent") for g in grid] + [(DEFAULT_LIB, "uv", 0.0, 0.05, 30, 30, 0.5, "modes")]
    if args.quick:
        grid = grid[:1] + grid[3:4] + grid[-1:]
    if args.coords:
        grid = [g for g in grid if g[2:] == (0.0, 0.05, 30, 30, 0.5, "latent")] + grid[-1:]
    rows = []
    print(
        f"{'system':9} {'coords':6} {'library':9} {'rule':4} {'gate':>4} {'alpha':>6} {'tol':>5} {'thr':>4} {'budget':>6} "
        f"{'terms med/max/all':>17} {'R2 min':>8} {'R2 med':>8} {'R2 unres':>8} {'1-R2 pooled':>11}  check"
    )
    for lib_cfg, rule, alpha, tol, n_thr, budget, gate, coords in grid:
        for name, data in systems.items():
            if lib_cfg["preset"] == "reference" and name != "lorenz" and not args.full:
                continue  # 1035 terms x 16 dimensions: > 10 min on 2 shared cores (issue 10 has those figures)
            r = run(name, data, lib_cfg, alpha, tol, n_thr, budget, rule, gate, coords)
            rows.append(r)
            print(
                f"{name:9} {coords:6} {lib_cfg['preset']:9} {rule:4} {str(gate):>4} {alpha:6g} {tol:5g} {n_thr:4d} "
                f"{str(budget):>6} {r['terms_median']:>7g}/{r['terms_max']:<3d}/{r['terms_total']:<5d} "
                f"{r['r2_min']:8.5f} {r['r2_median']:8.5f} {r['r2_unrestricted_min']:8.5f} {r['uv_pooled']:11.3g}  {r['check']}"
                f"{'' if r['ok'] else '  FAIL'}",
                flush=True,
            )
            res = {"library": DEFAULT_LIB, "rows": rows}  # written after every row: a long run keeps its part
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
