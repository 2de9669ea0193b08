"""One test per (method, scheme): quantize once, evaluate every requested task, write result records."""
import math
import warnings

import pytest

from quantbench.errors import QuantbenchError, UnavailableError
from quantbench.results import ResultStore
from quantbench.runner import run


def test_accuracy(case, request, capsys):
    opt = request.config.option
    store = ResultStore(opt.results_dir)
    try:
        with capsys.disabled():  # progress bars and logs go to the terminal as the run goes
            out = run(case.cfg, case.tasks, store, resume=opt.resume, resolved=case.resolved)
    except UnavailableError as e:  # e.g. a hub calibration corpus offline: nothing was measured, say what is needed
        pytest.skip(f"{case.cfg.method} {case.cfg.scheme} not run: {e}")
    except QuantbenchError as e:  # NaN/inf named where it appeared, a full disk, an impossible shape: one line
        pytest.fail(f"{case.cfg.method} {case.cfg.scheme}: {e}", pytrace=False)
    for task, why in out.unavailable.items():  # e.g. a hub dataset offline: say what is needed, keep the rest
        warnings.warn(f"{task} not run: {why}", stacklevel=1)
    if not out.records:
        reasons = [f"{t}: {w}" for t, w in out.unavailable.items()] or ["results already present (--resume)"]
        pytest.skip("; ".join(reasons))
    ran = {t.name for t in case.tasks} - set(out.unavailable) - set(out.already_done)
    assert {r["task"] for r in out.records} == ran
    for r in out.records:
        assert math.isfinite(r["value"]) and (r["metric"] != "ppl" or r["value"] >= 1.0), r
        assert store.has(r["config_hash"], r["metric"])
