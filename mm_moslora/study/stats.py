"""Statistics of a seeded comparison: mean, sample standard deviation and a t-based 95 % interval per variant,
and a paired t-test of per-seed differences against a reference variant.

Seeds are few (5 or so), so intervals use Student's t with n - 1 degrees of freedom, not the normal
approximation. Undefined values (one seed; zero spread of the differences) are None (null in JSON).
"""
from __future__ import annotations

import math

from scipy import stats as _scipy_stats


def summary(values: list[float]) -> dict:
    """{"n", "mean", "std" (sample, n - 1), "ci95": [lo, hi] (t-based)} of `values` (NaNs are not allowed)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(_scipy_stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def paired_test(reference: list[float], other: list[float]) -> dict:
    """Paired t-test of other - reference over matched seeds: {"n", "mean_diff", "ci95", "t", "p_value"}
    (two-sided). With zero spread the test is undefined: p is 1 when every difference is 0, else None (a constant
    difference over a few seeds, common with exact-match counts, is not evidence of p = 0)."""
    if len(reference) != len(other):
        raise ValueError(f"paired samples differ in length: {len(reference)} vs {len(other)}")
    diffs = [b - a for a, b in zip(reference, other)]
    n = len(diffs)
    result = summary(diffs)
    out = {"n": n, "mean_diff": result["mean"], "ci95": result["ci95"], "t": None, "p_value": None}
    if n < 2:
        return out
    std = result["std"]
    if std == 0:
        out["p_value"] = 1.0 if result["mean"] == 0 else None
        if result["mean"] != 0:
            out["ci95"] = None  # [d, d] would claim a certainty that a handful of seeds cannot give
        return out
    t = result["mean"] / (std / math.sqrt(n))
    out["t"] = t
    out["p_value"] = float(2 * _scipy_stats.t.sf(abs(t), n - 1))
    return out
