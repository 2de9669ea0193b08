"""Accuracy regression check: re-run a small configured subset and compare it with the committed baselines.

    python -m quantbench.reports.regress              # run, print the diff table; exit 1 when a metric moved
    python -m quantbench.reports.regress --update     # re-record reports/baselines/regression.json (intended change)
    python -m quantbench.reports.regress -k duquant   # only the checks whose id contains "duquant"

The subset (:data:`CHECKS`) covers every registered method on the offline default model, SmolLM2-135M (real
weights, real massive activations), with short calibrations and short GPTQ-protocol perplexity runs (2 x 256
tokens of the shipped test split). A check fails when its value moves (either way) by more than its relative
tolerance, when it has no baseline, or when its run fails, unless the recorded uncertainty is wider than the tolerance
and the change lies within it: the paired 95 % interval of now minus the baseline contains 0 (both kept 8 or more
evaluation items), or, without items, the change is inside the baseline's 95 % interval; the status says so. A changed config hash (the configuration's content
changed) is flagged beside the numbers. CI runs it through ``tests/test_reports.py``.

The checks run the model in float64. In float32 a quantized model's perplexity depends on the CPU: AVX-512, AVX2
and SSE kernels (and MKL's code paths) sum in different orders, the 1e-7 differences flip rounding decisions, and
GPTQ's error feedback and the block-wise methods carry each flip on (measured on one machine under four ISA
settings: GPTQ W4A16 23.07-26.22, DuQuant W4A4 25.75-28.75, norm-tweaking 33.52-37.37). In float64, on
:data:`THREADS` threads, six of the nine agree to 1e-8 across those settings and machines (the algorithms compute in float64
too, :func:`quantbench.quant.compute_dtype`), so their baselines hold from machine to machine at tight tolerances;
QuaRot W4A4, norm-tweaking and DuQuant W4A4 do not yet (see their checks).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate

from quantbench import uncertainty
from quantbench.results import ResultStore
from quantbench.runner import RunConfig, run
from quantbench.tasks import make_task

BASELINE = Path(__file__).resolve().parent / "baselines" / "regression.json"
THREADS = 2  # CI's cores; a reduction split over another thread count sums in another order


@dataclass(frozen=True)
class Check:
    id: str
    run: dict  # RunConfig fields
    task: dict = field(default_factory=lambda: {"name": "ppl-austen", "seqlen": 256, "max_windows": 2})
    tol: float = 1e-3  # relative; W4A4 runs get more: one flipped 4-bit rounding moves them (tests/test_triton_kernels)


_SMOL = {"model": "smollm2-135m", "dtype": "float64"}
_CAL = {"corpus": "austen", "nsamples": 2, "seqlen": 256}
CHECKS = [
    Check("smollm2/fp16", {**_SMOL, "method": "fp16"}),
    Check("smollm2/rtn-w4a16g64", {**_SMOL, "method": "rtn", "scheme": "w4a16g64"}),
    Check("smollm2/rtn-w4a8", {**_SMOL, "method": "rtn", "scheme": "w4a8"}, tol=5e-3),
    Check("smollm2/gptq-w4a16g64", {**_SMOL, "method": "gptq", "scheme": "w4a16g64", "calibration": _CAL}),
    # QuaRot W4A4 and norm-tweaking still move in float64: 172.5-177.9 over fresh processes (QuaRot), 33.54 vs
    # 33.95 across ISA settings (norm-tweaking); their tolerances cover that until the source is found.
    Check("smollm2/quarot-w4a4", {**_SMOL, "method": "quarot", "scheme": "w4a4"}, tol=5e-2),
    Check("smollm2/smoothquant-w8a8", {**_SMOL, "method": "smoothquant", "scheme": "w8a8", "calibration": _CAL},
          tol=5e-3),
    # DuQuant W4A4 moves between machines too: 28.0346 (where the baselines were first recorded) and 27.6144 on an
    # AMD EPYC with AVX-512 (same code, d54ee0b, float64): 1.5 %, one flipped 4-bit rounding carried on.
    Check("smollm2/duquant-w4a4", {**_SMOL, "method": "duquant", "scheme": "w4a4",
                                   "calibration": {**_CAL, "nsamples": 1}, "options": {"steps": 16}}, tol=2e-2),
    Check("smollm2/omniquant-w4a16", {**_SMOL, "method": "omniquant", "scheme": "w4a16",
                                      "calibration": {**_CAL, "nsamples": 1, "seqlen": 128}, "options": {"epochs": 1}},
          tol=5e-3),
    Check("smollm2/gptq+normtweak-w4a16", {**_SMOL, "method": "gptq+normtweak", "scheme": "w4a16",
                                           "calibration": {**_CAL, "nsamples": 1, "seqlen": 128}}, tol=2e-2),
]


def run_check(check: Check, results_dir: Path) -> dict:
    """Run one check; its record (value, config hash, protocol)."""
    task = dict(check.task)
    out = run(RunConfig(**check.run), [make_task(task.pop("name"), **task)], ResultStore(results_dir))
    if not out.records:
        raise RuntimeError(f"{check.id}: the run wrote no record ({out})")
    r = out.records[0]
    return {"value": r["value"], "metric": r["metric"], "config_hash": r["config_hash"], "protocol": r["protocol"],
            "torch": r["versions"].get("torch"), "created": r["created"],
            **({"interval": r["interval"]} if r.get("interval") else {}),
            **({"items": r["items"]} if r.get("items") else {})}


def within_noise(got: dict, base: dict, tol: float) -> str | None:
    """Why a change beyond ``tol`` is still within the recorded uncertainty, or None: the paired 95 % interval of
    now minus the baseline contains 0 (both kept at least ``MIN_UNITS`` evaluation items, the same ones), or, without
    items, the
    change is inside the half-width of the baseline's (else the run's) 95 % interval and that is wider than ``tol``."""
    if got.get("items") and base.get("items"):
        d = uncertainty.paired(got["items"], base["items"])
        if d and d["n"] < uncertainty.MIN_UNITS:  # a bootstrap over so few units decides nothing
            return None
        if d and d["tie"]:
            return f"within the paired 95 % interval {_f(d['ci95'][0])}..{_f(d['ci95'][1])} (wider than tol)"
        if d:
            return None
    for r in (base, got):
        ci = (r.get("interval") or {}).get("ci95")
        if ci:
            half = max(ci[1] - r["value"], r["value"] - ci[0]) / abs(r["value"])
            rel = abs(got["value"] - base["value"]) / abs(base["value"])
            return f"within the 95 % interval ±{half:.2g} (wider than tol)" if tol < rel <= half else None
    return None


def compare(checks: list[Check], now: dict[str, dict | str], baseline: dict[str, dict]) -> tuple[list[list], bool]:
    """(diff table rows, ok). ``now[id]`` is a record dict or an error string."""
    rows, ok = [], True
    for c in checks:
        got, base = now.get(c.id), baseline.get(c.id)
        if isinstance(got, str) or got is None:
            rows.append([c.id, "", _f(base and base["value"]), "", "", "", f"{c.tol:g}", f"RUN FAILED: {got}"])
            ok = False
            continue
        if base is None:
            rows.append([c.id, got["protocol"], "", _f(got["value"]), "", "", f"{c.tol:g}", "NO BASELINE"])
            ok = False
            continue
        rel = abs(got["value"] - base["value"]) / abs(base["value"])
        noise = within_noise(got, base, c.tol) if rel > c.tol else None
        passed = rel <= c.tol or noise is not None
        status = "ok" if rel <= c.tol else f"ok: {noise}" if noise else (
            ("WORSE" if got["value"] > base["value"] else "BETTER") + " beyond tol")
        if got["config_hash"] != base["config_hash"]:
            status += "; config changed"
        ok &= passed
        rows.append([c.id, got["protocol"], _f(base["value"]), _f(got["value"]), f"{got['value'] - base['value']:+.4g}",
                     f"{rel:.2e}", f"{c.tol:g}", status])
    return rows, ok


HEADERS = ["check", "protocol", "baseline", "now", "Δ", "rel", "tol", "status"]


def _f(x) -> str:
    return "" if x is None else f"{x:.6g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, default=BASELINE)
    ap.add_argument("--update", action="store_true", help="write the values of this run as the new baselines")
    ap.add_argument("-k", default="", help="only checks whose id contains this")
    ap.add_argument("--results-dir", type=Path, default=None, help="keep the run's records here (default: a temp dir)")
    args = ap.parse_args(argv)
    checks = [c for c in CHECKS if args.k in c.id]
    if not checks:
        print(f"no check matches {args.k!r}; checks: {', '.join(c.id for c in CHECKS)}", file=sys.stderr)
        return 2
    baseline = json.loads(args.baseline.read_text()) if args.baseline.exists() else {}
    now: dict[str, dict | str] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = args.results_dir or Path(tmp)
            for c in checks:
                print(f"regress: {c.id} ...", file=sys.stderr, flush=True)
                try:
                    now[c.id] = run_check(c, results)
                except Exception as e:  # noqa: BLE001  (reported in the table; the other checks still run)
                    now[c.id] = f"{type(e).__name__}: {e}"
    finally:
        torch.set_num_threads(threads)
    if args.update:
        failed = [k for k, v in now.items() if isinstance(v, str)]
        if failed:
            print(f"not updating: {', '.join(failed)} failed", file=sys.stderr)
            return 1
        baseline.update(now)
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.baseline.with_suffix(".tmp")
        tmp.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
        tmp.replace(args.baseline)
        print(f"baselines written to {args.baseline} ({len(now)} checks)")
        return 0
    rows, ok = compare(checks, now, baseline)
    print(tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True))
    print("regress: OK" if ok else "regress: FAILED (a metric moved beyond its tolerance, or a check did not run)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
