"""Each lever of the equations on and off, on one trained run, measured by the yardstick table (issue 22):

    python -m benchmarks.bench_levers --run runs/local [--quick] [--classifier PATH] [--shards PATH]

The run folder (a finished `make run`: AE, DiT, latents) is copied once, with its trajectories, into a scratch
root; the SINDy job then runs there once per setting (analysis/sindy_job.py, the same code as `make run`), and
the equations' row of its yardstick table is read back from equations.json: eps R^2 (median over dimensions,
held out), same digit with its 95% interval, same digit on confident samples, final error, terms, and the job's
stage times. The first rows are the yardsticks of the same run (ceiling, sensitivity curve, floors, dense
reference), measured in the baseline job; every row uses the same 400 held-out noises.

Settings (each one lever against the baseline, which is the default with sindy.compare_targets=false):
    fit space eps, x0 and auto, forward-noised DiT queries, sensitivity weighting, the mixture's
    responsibilities, regimes and Gaussian as features, polishing, DAgger, more trajectories, the mixture distilled
    to the DiT (with and without queries), all levers together; and the term budget swept for the Pareto plot of terms
    per dimension against agreement and final error (the job's default budget marked).
Writes results/levers.json and results/levers_pareto.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS

REPO = Path(__file__).resolve().parents[1]
BASE = ["sindy.compare_targets=false"]
LEVERS = [
    ("baseline (drift space, trajectories only)", []),
    ("fit space eps", ["sindy.fit_space=eps"]),
    ("fit space x0", ["sindy.fit_space=x0"]),
    ("fit space auto (drift, eps, x0 by training rollouts)", ["sindy.fit_space=auto"]),
    ("+ forward-noised DiT queries (8,000 per step)", ["sindy.queries=8000"]),
    ("+ sensitivity weighting", ["sindy.weighting=sensitivity"]),
    ("+ mixture responsibilities r_k as features", ["sindy.library.mixture_features=[eps,posterior]"]),
    ("+ mixture regime terms r_k z_j", ["sindy.library.mixture_features=[eps,regimes]"]),
    ("+ closed-form Gaussian eps (exact time factors)", ["sindy.library.mixture_features=[eps,gaussian]"]),
    (
        "+ polishing through the integrator (2 steps, 100 noises)",
        ["sindy.polish_iterations=2", "sindy.polish_noises=100"],
    ),
    ("+ DAgger, 2 rounds of 1,000 rollouts", ["sindy.dagger_rounds=2", "sindy.dagger_noises=1000"]),
    ("+ 4x trajectories (8,000)", ["sindy.n_trajectories=8000"]),
    ("+ 10x trajectories (20,000)", ["sindy.n_trajectories=20000"]),
    (
        "+ 10x trajectories (20,000), mixture distilled to the DiT, with queries (8,000 per step)",
        ["sindy.n_trajectories=20000", "sindy.mixture_fit=dit", "sindy.queries=8000"],
    ),
    ("+ mixture distilled to the DiT", ["sindy.mixture_fit=dit"]),
    ("+ mixture distilled to the DiT, with queries (2,000 per step)", ["sindy.mixture_fit=dit", "sindy.queries=2000"]),
    ("+ mixture distilled to the DiT, with queries (8,000 per step)", ["sindy.mixture_fit=dit", "sindy.queries=8000"]),
    (
        "+ mixture distilled to the DiT, eps space, with queries",
        ["sindy.mixture_fit=dit", "sindy.queries=8000", "sindy.fit_space=eps"],
    ),
    (
        "all levers",
        [
            "sindy.fit_space=eps",
            "sindy.queries=8000",
            "sindy.weighting=sensitivity",
            "sindy.library.mixture_features=[eps,posterior,regimes,gaussian]",
            "sindy.dagger_rounds=2",
        ],
    ),
]
BUDGETS = [3, 6, 12, 30, 60]  # terms per dimension at most (sindy.term_budget); 30 is the default
DEFAULT_BUDGET = 30  # configs/sindy.py term_budget
QUICK_LEVERS = LEVERS[:2]
QUICK_BUDGETS = [6, 30]


def run_job(root: Path, run_name: str, extra: list[str], common: list[str]) -> tuple[dict, float]:
    """One job on the scratch run; returns (equations.json, wall seconds)."""
    cmd = [sys.executable, str(REPO / "analysis" / "sindy_job.py"), "--config", "configs/local.yaml"]
    cmd += [f"run.root={root}", f"run.name={run_name}", *common, *BASE, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_levers: the job failed ({' '.join(extra)}):\n{proc.stderr[-3000:]}")
    return json.loads((root / run_name / "report" / "equations.json").read_text()), time.time() - t0


def equations_row(eq: dict) -> dict:
    """The equations' row of the yardstick table, with terms per dimension and the stage times."""
    y = eq["yardsticks"]
    row = next(r for r in y["rows"] if r["kind"] == "equations")
    d = len(eq["dims"])
    return {
        "eps_r2": row.get("eps_r2_median"),
        "same_digit": row.get("same_digit"),
        "ci95": row.get("ci95"),
        "confident": (row.get("confident") or {}).get("same_digit"),
        "final_error": row["final_error"],
        "terms": row["terms"],
        "terms_per_dim": row["terms"] / d if d else None,
        "gap_share": y["headline"].get("same_digit_gap_share"),
        "stage_times": {k: round(v, 1) for k, v in eq.get("stage_times", {}).items()},
    }


def fmt(x, spec=".3f") -> str:
    return "" if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "local", help="a finished make-run folder")
    ap.add_argument("--classifier", type=Path, default=REPO / "data" / "classifier" / "mnist_cnn.safetensors")
    ap.add_argument("--shards", type=Path, default=REPO / "data" / "mnist")
    ap.add_argument("--quick", action="store_true", help="two levers and two budgets (a check, not the figures)")
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated texts: run the baseline and the levers whose label contains one (no Pareto sweep)",
    )
    ap.add_argument("--budgets", help="comma-separated term budgets of the Pareto sweep (default 3,6,12,30,60)")
    ap.add_argument("--out", type=Path, default=RESULTS / "levers.json")
    args = ap.parse_args(argv)
    for p, what in ((args.run / "dit_ema.safetensors", "a trained DiT"), (args.classifier, "the MNIST classifier")):
        if not p.is_file():
            raise SystemExit(f"bench_levers: {p} not found ({what}; run `make run` first)")
    common = [f"data.shards={args.shards.resolve()}", f"dit.classifier={args.classifier.resolve()}"]
    levers, budgets = (QUICK_LEVERS, QUICK_BUDGETS) if args.quick else (LEVERS, BUDGETS)
    if args.only:
        keys = [k for k in args.only.split(",") if k]
        levers = [LEVERS[0]] + [lv for lv in LEVERS[1:] if any(k in lv[0] for k in keys)]
    if args.budgets is not None:
        budgets = [int(b) for b in args.budgets.split(",") if b]
        if budgets and DEFAULT_BUDGET not in budgets:
            budgets.append(DEFAULT_BUDGET)  # the chosen point is always on the plot (it is the baseline's job)
    elif args.only:
        budgets = []
    with tempfile.TemporaryDirectory(prefix="bench-levers-") as tmp:
        root = Path(tmp)
        name = args.run.name
        # Weights, latents and the trajectories; not the fits or the report (every setting fits anew).
        shutil.copytree(
            args.run, root / name, ignore=shutil.ignore_patterns("fits", "report", "reports", "tb", "samples")
        )
        rows, yard = [], None
        for label, extra in levers:
            eq, sec = run_job(root, name, extra, common)
            if yard is None:
                yard = [r for r in eq["yardsticks"]["rows"] if r["kind"] != "equations"]
                print(f"yardsticks: {json.dumps(yard)}", flush=True)
            rows.append({"lever": label, "overrides": extra, **equations_row(eq), "job_seconds": round(sec, 1)})
            print(f"{label}: {json.dumps(rows[-1])}", flush=True)  # each row as it comes: a long sweep loses nothing
        pareto = []
        for b in budgets:
            if b == DEFAULT_BUDGET and levers[0] is LEVERS[0]:  # the baseline is this point: not run twice
                pareto.append(
                    {"term_budget": b, **{k: v for k, v in rows[0].items() if k not in ("lever", "overrides")}}
                )
                continue
            eq, sec = run_job(root, name, [f"sindy.term_budget={b}"], common)
            pareto.append({"term_budget": b, **equations_row(eq), "job_seconds": round(sec, 1)})
            print(f"term budget {b}: {json.dumps(pareto[-1])}", flush=True)
        pareto.sort(key=lambda p: p["term_budget"])
    print()
    print("| setting | eps R^2 | same digit [95% CI] | confident | final error | terms (per dim) | job s |")
    print("|---|---|---|---|---|---|---|")
    for r in yard:
        conf = (r.get("confident") or {}).get("same_digit")
        print(
            f"| {r['name']} ({r['kind']}) | {fmt(r.get('eps_r2_median'), '.4f')} | {fmt(r.get('same_digit'))} "
            f"| {fmt(conf)} | {fmt(r['final_error'])} | {r['terms'] or ''} | |"
        )
    for r in rows + [{**p, "lever": f"term budget {p['term_budget']}"} for p in pareto]:
        ci = r["ci95"]
        print(
            f"| {r['lever']} | {fmt(r['eps_r2'], '.4f')} | {fmt(r['same_digit'])} [{fmt(ci[0])}, {fmt(ci[1])}] "
            f"| {fmt(r['confident'])} | {fmt(r['final_error'])} | {r['terms']} ({fmt(r['terms_per_dim'], '.1f')}) "
            f"| {r['job_seconds']} |"
        )
    out = {"run": str(args.run), "yardsticks": yard, "levers": rows, "pareto": pareto, "default_budget": DEFAULT_BUDGET}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    if pareto:
        pareto_plot(pareto, yard, args.out.with_name("levers_pareto.png"))
    print(f"\nwrote {args.out} and {args.out.with_name('levers_pareto.png')}")
    return 0


def pareto_plot(pareto: list[dict], yard: list[dict], path: Path) -> None:
    """Terms per dimension against same digit and against final error; the default budget marked; the floors and
    the ceiling as horizontal lines."""
    # optional heavy dependency: matplotlib, only when there is a Pareto front to plot
    import matplotlib

    matplotlib.use("Agg")
    # optional heavy dependency: pyplot after the Agg backend is chosen
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [p["terms_per_dim"] for p in pareto]
    for ax, key, label in ((axes[0], "same_digit", "same digit as the DiT"), (axes[1], "final_error", "final error")):
        ax.plot(x, [p[key] for p in pareto], "o-", label="the equations")
        chosen = [p for p in pareto if p["term_budget"] == DEFAULT_BUDGET]
        if chosen:
            ax.plot([chosen[0]["terms_per_dim"]], [chosen[0][key]], "r*", ms=14, label="default budget (30)")
        for r in yard:
            if r["kind"] in ("ceiling", "floor", "reference") and r.get(key) is not None:
                ax.axhline(r[key], ls="--", lw=0.8, color={"ceiling": "g", "floor": "k", "reference": "b"}[r["kind"]])
                ax.text(max(x), r[key], r["name"][:34], fontsize=6, ha="right", va="bottom")
        ax.set_xlabel("terms per dimension (mean)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
