"""report.md's yardstick section: the equations beside the DiT's ceiling, any peer DiTs, the closed-form floors, a
dense reference and the sensitivity curve, all from the same held-out noise (analysis/job/yardsticks.py measures them)."""

from __future__ import annotations

__all__ = ["yardstick_section"]


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _peer_sentence(h: dict, n_peer: int, eq_same_digit: float) -> str:
    """The equations against the peer DiTs: above or below them, with the paired interval when it was measured,
    and the share of the floor-to-peer gap only while the equations are below the peers (above, it is closed)."""
    diff, them = h["same_digit_minus_peer"], "it" if n_peer == 1 else "them"
    points = round(100 * diff, 1)  # as printed: a difference that prints as 0.0 is a tie
    who = (
        "a DiT of the same recipe with another seed gives"
        if n_peer == 1
        else f"{n_peer} DiTs of the same recipe with other seeds give"
    )
    s = (
        f"**Against an equally good DiT:** {who} the DiT's digit in {_pct(h['peer_same_digit'])} of the noises"
        f"{'' if n_peer == 1 else ' on average'}, the "
        f"equations in {_pct(eq_same_digit)}: "
        + (
            f"level with {them}"
            if points == 0
            else f"{abs(points):.1f} points {'above' if points > 0 else 'below'} {them}"
        )
    )
    ci = h.get("same_digit_minus_peer_ci95")
    if ci:
        s += f" (paired 95% interval of the difference [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
        if h.get("noises_only_equations") is not None:
            s += (
                f"; only the equations get the DiT's digit from {h['noises_only_equations']} of these noises, only "
                f"the peer from {h['noises_only_peer']}"
            )
        s += ")"
    share = h.get("same_digit_floor_to_peer_share")
    if points < 0 and share is not None:
        s += f", closing {100 * share:.0f}% of the floor-to-peer gap"
    s += "."
    if ci:
        s += (
            " An interval that holds 0 means these noises do not tell the two apart."
            if ci[0] <= 0 <= ci[1]
            else f" The interval excludes 0: the equations are {'closer to' if diff > 0 else 'farther from'} this "
            f"DiT than {'the peer is' if n_peer == 1 else 'the peers are'}."
        )
    return (
        s + " The raw-weights ceiling shares this DiT's training; the peer is what another model of the same data "
        "reaches."
    )


def yardstick_section(y: dict | None) -> list[str]:
    """The headline, the table and the eps R^2 per window of t; one line when the yardsticks were skipped."""
    if not y:
        return []
    L = ["## The equations beside their yardsticks", ""]
    if "skipped" in y and "rows" not in y:
        return L + [f"Not measured: {y['skipped']}.", ""]
    rows, h = y["rows"], y.get("headline", {})
    eq = next((r for r in rows if r["kind"] == "equations"), None)
    if h.get("same_digit_gap_share") is not None:
        floor = next(r for r in rows if r["name"] == h["floor"])
        ceil = next(r for r in rows if r["name"] == h["ceiling"])
        L += [
            f"**The equations close {100 * h['same_digit_gap_share']:.0f}% of the gap** between the floor "
            f"({h['floor']}: {_pct(floor['same_digit'])} same digit) and the ceiling ({h['ceiling']}: "
            f"{_pct(ceil['same_digit'])}): {_pct(eq['same_digit'])} same digit, "
            f"{100 * h['same_digit_above_floor']:+.1f} points above the floor"
            + (
                f"; in final error they close {100 * h['final_error_gap_share']:.0f}% of it."
                if h.get("final_error_gap_share") is not None
                else "."
            ),
            "",
        ]
    if h.get("peer_same_digit") is not None:
        L += [_peer_sentence(h, sum(r["kind"] == "peer" for r in rows), eq["same_digit"]), ""]
    elif eq is not None and any(r["kind"] == "ceiling" for r in rows):
        L += [
            "No peer row: `make peer` trains this DiT's recipe with another seed and adds it (sindy.peer_runs). The "
            "raw-weights ceiling shares this DiT's training; a peer shows what another equally good model of the "
            "data reaches from the same noise.",
            "",
        ]
    dit = y.get("skipped", {}).get("dit_images") if isinstance(y.get("skipped"), dict) else None
    if y.get("levers"):
        lv = y["levers"]
        L += [
            f"How these equations were fitted: {lv['fit_space']} space, {lv['queries']} forward-noised DiT queries per "
            f"step, {lv['dagger_rounds']} DAgger rounds, weighting {lv['weighting']}, mixture features "
            f"{', '.join(lv['mixture_features'])}, {lv['polish_iterations']} polishing steps, at most "
            f"{lv['term_budget']} terms per dimension (benchmarks/bench_levers.py measures each lever on and off).",
            "",
        ]
    L += [
        f"Every generator starts from the initial noise of the same {y['n_noises']} held-out trajectories and runs "
        f"the {y['sampler']} grid to t = 0. *Same digit*: the MNIST classifier gives its decoded sample the DiT's "
        "class (95% Wilson interval); *confident*: only the DiT samples the classifier gives at least 0.9"
        + (f" ({100 * dit['confident_share']:.0f}% of them)" if dit else "")
        + "; *final error*: mean ||z0 - z0_DiT|| / ||z0_DiT||; *per-sample R^2*: median over samples of "
        "1 - ||z0 - z0_DiT||^2 / ||z0_DiT - mean||^2; *eps R^2*: median over dimensions on the DiT's held-out "
        "states. The sensitivity rows translate an eps R^2 into agreement for iid errors; a fitted model's errors "
        "point the same way at neighbouring steps and add up, so at the same eps R^2 they cost more (2-8 times per "
        "window of t on the make-run DiT: docs/SINDY.md, benchmarks/bench_window_costs.py): read the curve as "
        "what an eps R^2 buys at best."
        + (
            f" The DiT's own samples: FD-MNIST {dit['fd_mnist']:.2f}, confidence {dit['mean_confidence']:.3f}."
            if dit
            else ""
        ),
        "",
        "| generator | role | terms | eps R^2 | same digit [95% CI] | same digit, confident | final error "
        "| per-sample R^2 | FD-MNIST | confidence |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        conf = r.get("confident") or {}
        L.append(
            f"| {r['name']} | {r['kind']} | {r['terms'] if r['terms'] is not None else ''} "
            f"| {_num(r.get('eps_r2_median'), '.4f')} | {_pct(r.get('same_digit'))}{_ci(r.get('ci95'))} "
            f"| {_pct(conf.get('same_digit'))}{_ci(conf.get('ci95'))} | {_num(r['final_error'])}"
            + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
            + f" | {_num(r['per_sample_r2'])} | {_num(r.get('fd_mnist'), '.2f')} "
            f"| {_num(r.get('mean_confidence'))} |"
        )
    L.append("")
    with_w = [r for r in rows if r.get("eps_r2_windows")]
    if with_w:
        wins = with_w[0]["eps_r2_windows"]
        L += [
            "eps R^2 (median over dimensions) per window of t:",
            "",
            "| generator | " + " | ".join(f"t in ({w['t_from']:.2f}, {w['t_to']:.2f}]" for w in wins) + " |",
            "|---|" + "---|" * len(wins),
        ]
        L += [
            f"| {r['name']} | " + " | ".join(f"{w['median']:.4f}" for w in r["eps_r2_windows"]) + " |" for r in with_w
        ]
        L.append("")
    for what, why in (y.get("skipped") or {}).items():
        if what != "dit_images":
            L.append(f"- not measured ({what}): {why}")
    return L + [""]
