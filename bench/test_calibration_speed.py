"""Calibration speed on the CPU (``--speed``): DuQuant's rotation search, and whole-model calibrations on SmolLM2.

    pytest bench/test_calibration_speed.py --speed

1. The greedy search (:func:`quantbench.duquant.greedy_rotation`) on a LLaMA-7B-shaped down_proj input, 2048
   tokens x 11008 channels with massive activations (100-1500) at a few tokens, block 128, 256 steps: the exact
   float64 search, the float32 search and the reference loop as written (the official code's full product per
   step, :func:`~quantbench.duquant.greedy_rotation_reference`). The float64 search must return the reference's
   steps and rotation bit for bit.
2. Whole-model calibrations of SmolLM2-135M from a plan-cache miss with every cache cold but the converted model
   (``QUANTBENCH_NO_CACHE=1``): DuQuant W4A4 on 8 x 512 calibration tokens (float64 and float32 search), GPTQ
   W4A16 on 8 x 2048, RTN W4A16; wall seconds of ``quantbench.quantize`` (model load included) and the method's
   own timings.

One round each (they take seconds to minutes; the table is the record, not a statistic). The rows go to
``reports/calibration-<cpu>.md`` with the machine, thread count, versions and date: the committed table.
"""
from __future__ import annotations

import time

import pytest
import torch

from quantbench import duquant as dq

STEPS, BLOCK = 256, 128
ROWS: list[dict] = []
pytestmark = pytest.mark.speed


@pytest.fixture(scope="module")
def down_proj_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 11008, generator=g) * 0.15
    for t, c, v in ((0, 7, 1500.0), (0, 2533, -1100.0), (1, 7, 420.0), (17, 8101, 100.0), (250, 2533, -640.0)):
        x[t, c] = v
    return x


@pytest.fixture(scope="module")
def searches():
    return {}


SEARCHES = {"float64 (exact)": lambda x, g: dq.greedy_rotation(x, BLOCK, STEPS, "repo", g),
            "float32": lambda x, g: dq.greedy_rotation(x, BLOCK, STEPS, "repo", g, dtype="float32"),
            "reference loop": lambda x, g: dq.greedy_rotation_reference(x, BLOCK, STEPS, "repo", g)}


@pytest.mark.parametrize("impl", list(SEARCHES))
def test_rotation_search_speed(down_proj_input, searches, impl):
    t = time.perf_counter()
    out = SEARCHES[impl](down_proj_input, torch.Generator().manual_seed(0))
    wall = time.perf_counter() - t
    searches[impl] = (out, wall)
    row = {"what": "DuQuant search, LLaMA-7B down_proj input 2048 x 11008, 256 steps", "variant": impl,
           "wall_s": round(wall, 2), "kept_steps": out.kept}
    if impl == "reference loop":
        exact, t64 = searches["float64 (exact)"]
        assert exact.steps == out.steps and torch.equal(exact.rotation, out.rotation)
        row["notes"] = f"float64 search {wall / t64:.1f}x faster, same steps and rotation bit for bit"
    if impl == "float32":
        exact = searches["float64 (exact)"][0]
        row["notes"] = (f"steps {'equal' if out.steps == exact.steps else 'differ'}; max |R32 - R64| "
                        f"{(out.rotation - exact.rotation).abs().max().item():.1e}")
    ROWS.append(row)


WHOLE = [("duquant", "w4a4", {"nsamples": 8, "seqlen": 512}, {}),
         ("duquant", "w4a4", {"nsamples": 8, "seqlen": 512}, {"search_dtype": "float32"}),
         ("gptq", "w4a16", {"nsamples": 8, "seqlen": 2048}, {}),
         ("rtn", "w4a16", None, {})]


@pytest.mark.parametrize("method,scheme,calib,opts", WHOLE,
                         ids=["duquant-w4a4", "duquant-w4a4-float32", "gptq-w4a16", "rtn-w4a16"])
def test_whole_model_calibration_speed(monkeypatch, method, scheme, calib, opts):
    import quantbench

    monkeypatch.setenv("QUANTBENCH_NO_CACHE", "1")  # plan, statistics, windows: all rebuilt, nothing stored
    calibration = {"corpus": "austen", "seed": 0, **calib} if calib else None
    t = time.perf_counter()
    qm = quantbench.quantize("smollm2-135m", method, scheme, calibration=calibration, **opts)
    wall = time.perf_counter() - t
    info = qm.plan.info
    assert qm.info["plan_source"] == ("calibrated" if calib else "built")
    own = {"duquant": lambda: f"smoothing (statistics) {info['smooth_s']} s, {info['calib_per_block_s']} s per block",
           "gptq": lambda: f"GPTQ {info['gptq_wall_s']} s, {info['gptq_per_block_s']} s per block",
           "rtn": lambda: "no calibration"}[method]()
    ROWS.append({"what": "SmolLM2-135M, plan-cache miss to plan (model load included)",
                 "variant": f"{method} {scheme}" + (f" {calib['nsamples']}x{calib['seqlen']}" if calib else "")
                 + "".join(f" {k}={v}" for k, v in opts.items()), "wall_s": round(wall, 1), "notes": own})


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    if ROWS:
        from quantbench.reports.speed import write_table

        write_table("calibration", "Calibration speed", "`pytest bench/test_calibration_speed.py --speed`; one "
                    "round each; wall seconds.", ROWS, device="cpu")
