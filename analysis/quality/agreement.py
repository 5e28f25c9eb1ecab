"""The arithmetic of the yardstick table: agreement with a 95% interval, end-state errors, the gap share.

References:
    E. B. Wilson, "Probable inference, the law of succession, and statistical inference", JASA 22:209, 1927
    (the score interval: it stays inside [0, 1] and keeps its coverage near 0% and 100%, where the normal
    interval does not); L. D. Brown, T. T. Cai, A. DasGupta, Statistical Science 16(2):101, 2001 (why the
    Wilson interval rather than the Wald one); A. Agresti, "Categorical Data Analysis", 3rd ed., Wiley 2013,
    section 11.1 (the difference of two proportions measured on the same subjects: its variance counts only the
    discordant pairs).

Plain numpy in, plain numbers out: the job (analysis/job/yardsticks.py) runs the generators, this module scores
what they produced against the DiT's own samples from the same noise.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "CONFIDENT",
    "NOISE_R2",
    "wilson_interval",
    "same_digit",
    "end_state_errors",
    "gap_share",
    "noise_sigma",
    "paired_difference",
]

CONFIDENT = 0.9  # the DiT's samples the classifier gives at least this probability: "confident"
NOISE_R2 = (0.999, 0.99, 0.97, 0.95)  # the sensitivity curve: the DiT's eps with iid noise of this R^2
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k / n (95% by default); (nan, nan) for n = 0."""
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def same_digit(gen_labels: np.ndarray, ref_labels: np.ndarray, ref_confidence: np.ndarray) -> dict:
    """How often a generator's sample gets the DiT's class from the same noise, overall and on confident samples.

    Args:
        gen_labels, ref_labels: (n,) classifier labels of the generator's and of the DiT's samples.
        ref_confidence: (n,) the classifier's top probability for the DiT's samples.

    Returns:
        {"n", "same_digit", "ci95": [lo, hi], "confident": {"n", "same_digit", "ci95"}} (confident: the DiT's
        samples with confidence >= CONFIDENT; same_digit None where there are none).
    """
    gen, ref = np.asarray(gen_labels), np.asarray(ref_labels)
    if gen.shape != ref.shape or gen.ndim != 1:
        raise ValueError(f"same_digit: labels of equal length expected, got {gen.shape} and {ref.shape}")
    hit = gen == ref
    conf = np.asarray(ref_confidence) >= CONFIDENT

    def share(mask: np.ndarray) -> dict:
        n, k = int(mask.sum()), int(hit[mask].sum())
        return {"n": n, "same_digit": k / n if n else None, "ci95": list(wilson_interval(k, n)) if n else None}

    out = share(np.ones_like(hit))
    out["confident"] = share(conf)
    return out


def end_state_errors(gen_end: np.ndarray, ref_end: np.ndarray) -> dict:
    """Final error and per-sample R^2 of a generator's end states against the DiT's, (n, d) each.

    final_error: mean over samples of ||z0 - z0_DiT|| / ||z0_DiT||; per_sample_r2: median over samples of
    1 - ||z0 - z0_DiT||^2 / ||z0_DiT - mean(z0_DiT)||^2 (how much of a sample's own deviation from the
    average sample is reproduced). A diverged rollout (non-finite row) is counted in ``diverged`` and scored
    as the worst case: relative error 1 and R^2 0 would flatter it, so it gets error inf / R^2 -inf and the
    means and medians say so.
    """
    g, r = np.asarray(gen_end, np.float64), np.asarray(ref_end, np.float64)
    ok = np.all(np.isfinite(g), axis=1)
    err = np.full(len(r), np.inf)
    err[ok] = np.linalg.norm(g[ok] - r[ok], axis=1) / np.maximum(np.linalg.norm(r[ok], axis=1), 1e-12)
    dev = np.sum((r - r.mean(axis=0)) ** 2, axis=1)
    r2 = np.full(len(r), -np.inf)
    r2[ok] = 1.0 - np.sum((g[ok] - r[ok]) ** 2, axis=1) / np.maximum(dev[ok], 1e-12)
    return {
        "final_error": float(np.mean(err)),
        "per_sample_r2": float(np.median(r2)),
        "diverged": int((~ok).sum()),
    }


def gap_share(value: float | None, floor: float | None, ceiling: float | None) -> float | None:
    """(value - floor) / (ceiling - floor): the share of the floor-to-ceiling gap a generator closes; None when
    a figure is missing or the ceiling is not above the floor (no gap to close)."""
    if value is None or floor is None or ceiling is None or not ceiling > floor:
        return None
    return (value - floor) / (ceiling - floor)


def paired_difference(hit: np.ndarray, other_hits: np.ndarray) -> dict:
    """How much more often one generator gets the DiT's digit than others do, on the same noises.

    Two generators scored on the same noises are paired: a noise where both agree with the DiT, or both do not,
    says nothing about which is better, so the interval of the difference is far narrower than two separate
    Wilson intervals suggest. Per noise, d_i = hit_i - mean over the others of their hit_i; the difference is
    mean(d) with the normal interval mean(d) +- z sd(d) / sqrt(n) (sd with divisor n). For one other generator
    that is the textbook interval of two paired proportions, (b - c) / n +- z sqrt(b + c - (b - c)^2 / n) / n
    with b, c the discordant counts (Agresti 2013, 11.1); it is adequate here because the job scores hundreds
    of noises, and it is [0, 0] when the two never disagree.

    Args:
        hit: (n,) bool, the generator's sample has the DiT's class.
        other_hits: (n,) or (m, n) bool, the same for one or m other generators (compared with their mean).

    Returns:
        {"difference", "ci95": [lo, hi]}, plus "only_this" and "only_other" (the discordant counts) when there
        is one other generator.
    """
    a = np.asarray(hit, dtype=bool)
    b = np.atleast_2d(np.asarray(other_hits, dtype=bool))
    if a.ndim != 1 or b.shape[1:] != a.shape or len(a) == 0:
        raise ValueError(f"paired_difference: (n,) and (m, n) hits with n > 0 expected, got {a.shape} and {b.shape}")
    d = a.astype(np.float64) - b.mean(axis=0)
    diff, half = float(d.mean()), Z95 * float(d.std()) / math.sqrt(len(d))
    out = {"difference": diff, "ci95": [diff - half, diff + half]}
    if len(b) == 1:
        out["only_this"], out["only_other"] = int(np.sum(a & ~b[0])), int(np.sum(~a & b[0]))
    return out


def noise_sigma(eps: np.ndarray, r2: float) -> np.ndarray:
    """Per-dimension std of iid noise that brings eps to R^2 ``r2`` in expectation: sqrt((1 - r2) Var_j).

    Args:
        eps: (..., d) the reference eps over the states the R^2 is measured on (pooled over t).
        r2: target R^2 in (0, 1].
    """
    if not 0.0 < r2 <= 1.0:
        raise ValueError(f"noise_sigma: r2 must be in (0, 1], got {r2}")
    e = np.asarray(eps, np.float64).reshape(-1, np.shape(eps)[-1])
    return np.sqrt((1.0 - r2) * e.var(axis=0))
