"""Uncertainty of every number: seeded bootstrap intervals over evaluation items and paired differences.

An evaluation's *items* are what its value averages: for GPTQ-protocol perplexity the per-unit sums of token NLLs
and their token counts (``PPL = exp(Σ nll / Σ tokens)``). lm-eval tasks keep no items; their intervals come from
lm-eval's standard errors (:func:`normal_interval`).
:func:`interval` resamples the items with replacement (percentile bootstrap, ``ITERS`` resamples from a fixed seed,
so the same items always give the same interval); :func:`paired` resamples two evaluations of the *same* items
with the same indices and gives the interval of their difference, which is what decides whether a gap is real:
most of the item-to-item variance is shared by both configurations and cancels.

Perplexity's unit is the evaluation window when there are at least :data:`MIN_UNITS` of them; with fewer (the main
job scores four 2048-token windows) each window is cut into :data:`SEGMENT`-token segments and the segments are
resampled (a block bootstrap: tokens stay with their neighbours). The record names the unit.
"""
from __future__ import annotations

import math

import numpy as np

ITERS = 2000
SEED = 0
MIN_UNITS = 8
SEGMENT = 256
Z95 = 1.959963984540054


def _indices(n: int, iters: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(iters, n))


def _stat(items: dict, idx: np.ndarray | None = None) -> np.ndarray | float:
    """The value the items give (on resamples ``idx`` [iters, n], one value per resample)."""
    v = np.asarray(items["values"], dtype=np.float64)
    if items["kind"] == "exp_mean":  # perplexity: exp(Σ nll / Σ tokens)
        w = np.asarray(items["weights"], dtype=np.float64)
        if idx is None:
            return math.exp(v.sum() / w.sum())
        return np.exp(v[idx].sum(1) / w[idx].sum(1))
    raise ValueError(f"unknown item kind {items['kind']!r}")


def interval(items: dict, iters: int = ITERS, seed: int = SEED) -> dict:
    """``{"stderr", "ci95": [lo, hi], "method", "n"}`` of the value of ``items`` (percentile bootstrap)."""
    n = len(items["values"])
    if n < 2:
        return {"stderr": None, "ci95": None, "n": n, "method": f"none: {n} {items['unit']}"}
    boot = _stat(items, _indices(n, iters, seed))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    few = f"; fewer than {MIN_UNITS} units: a rough interval" if n < MIN_UNITS else ""
    return {"stderr": float(boot.std(ddof=1)), "ci95": [float(lo), float(hi)], "n": n,
            "method": f"bootstrap over {n} {items['unit']} ({iters} resamples, seed {seed}, percentile 95 %{few})"}


def paired(a: dict, b: dict, iters: int = ITERS, seed: int = SEED) -> dict | None:
    """``value(a) - value(b)`` with the percentile interval of the paired bootstrap (the same resampled items for
    both), or None when the two were not evaluated on the same items. ``tie``: the interval contains 0."""
    if a.get("ids") != b.get("ids") or a["kind"] != b["kind"] or len(a["values"]) != len(b["values"]):
        return None
    n = len(a["values"])
    delta = float(_stat(a) - _stat(b))
    if n < 2:
        return {"delta": delta, "ci95": None, "tie": None, "n": n}
    idx = _indices(n, iters, seed)
    boot = _stat(a, idx) - _stat(b, idx)
    lo, hi = (float(x) for x in np.percentile(boot, [2.5, 97.5]))
    return {"delta": delta, "ci95": [lo, hi], "tie": lo <= 0.0 <= hi, "n": n}


def ppl_items(nll_sums: list[list[float]], counts: list[list[int]], ids: str) -> dict:
    """Perplexity items from per-window, per-segment NLL sums and token counts: windows as the unit when there are
    at least :data:`MIN_UNITS`, else segments. ``ids`` names what was scored (the windows' digest): only items of
    the same ``ids`` are paired."""
    if len(nll_sums) >= MIN_UNITS:
        values, weights, unit = [sum(s) for s in nll_sums], [sum(c) for c in counts], "windows"
    else:
        values = [x for s in nll_sums for x in s]
        weights = [c for cs in counts for c in cs]
        unit = f"{SEGMENT}-token segments of {len(nll_sums)} window{'s' if len(nll_sums) > 1 else ''}"
    return {"kind": "exp_mean", "values": values, "weights": weights, "unit": unit, "ids": ids}


def normal_interval(value: float, stderr: float | None, what: str, lo: float | None = None,
                    hi: float | None = None) -> dict:
    """An interval from a reported standard error (lm-eval's), ``value ± 1.96 stderr`` cut to the metric's range
    ``[lo, hi]`` (an accuracy stays in [0, 1], a perplexity above 0)."""
    if stderr is None or not math.isfinite(stderr):
        return {"stderr": None, "ci95": None, "n": None, "method": f"none: {what} reports no standard error"}
    a, b = value - Z95 * stderr, value + Z95 * stderr
    a, b = a if lo is None else max(lo, a), b if hi is None else min(hi, b)
    return {"stderr": float(stderr), "ci95": [a, b], "n": None, "method": f"{what}, normal 95 %"
            + (" (cut to the metric's range)" if lo is not None or hi is not None else "")}


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation over calibration seeds (``--calib-seeds``)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
            "min": float(v.min()), "max": float(v.max())}
