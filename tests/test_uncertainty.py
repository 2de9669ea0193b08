"""Uncertainty: seeded bootstrap intervals, paired differences, ties in the leaderboard, the regression check's use
of intervals, calibration-seed spread."""
import math
from argparse import Namespace

import numpy as np
import pytest
import torch

from quantbench import models, options, uncertainty
from quantbench.cases import build_cases
from quantbench.errors import ConfigError
from quantbench.reports import leaderboard, regress
from quantbench.tasks import make_task
from quantbench.tasks.lmeval import stderr_intervals


def nll_items(n, seed=0, shift=0.0, spread=0.4, ids="w"):
    rng = np.random.default_rng(seed)
    return {"kind": "exp_mean", "values": list(3.0 + shift + spread * rng.standard_normal(n)), "weights": [1.0] * n,
            "unit": "windows", "ids": ids}


def test_the_bootstrap_is_seeded_and_deterministic():
    items = nll_items(32)
    a, b = uncertainty.interval(items), uncertainty.interval(items)
    assert a == b and a["n"] == 32 and "2000 resamples, seed 0" in a["method"]
    other = uncertainty.interval(items, seed=1)
    assert other["ci95"] != a["ci95"]
    lo, hi = a["ci95"]
    assert lo < uncertainty._stat(items) < hi


def test_the_interval_shrinks_as_windows_grow():
    widths = []
    for n in (8, 32, 128, 512):
        ci = uncertainty.interval(nll_items(n, seed=n))["ci95"]
        widths.append(ci[1] - ci[0])
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4  # about 1/sqrt(n): 8 -> 512 is 8x narrower


def test_a_configuration_against_itself_differs_by_exactly_zero():
    items = nll_items(16)
    d = uncertainty.paired(items, dict(items))
    assert d["delta"] == 0.0 and d["ci95"] == [0.0, 0.0] and d["tie"]


def test_a_known_paired_difference_is_detected_where_unpaired_errors_hide_it():
    """Per-window NLLs that vary a lot between windows (0.4) and a small shift (0.02) of every window: the paired
    interval excludes 0 and holds the true difference; the unpaired one from the two standard errors does not."""
    a = nll_items(64, seed=3)
    b = {**a, "values": [v + 0.02 + 0.002 * math.sin(i) for i, v in enumerate(a["values"])]}
    d = uncertainty.paired(b, a)
    true = uncertainty._stat(b) - uncertainty._stat(a)
    assert not d["tie"] and d["ci95"][0] <= true <= d["ci95"][1] and d["ci95"][0] > 0
    ra = {"value": uncertainty._stat(a), "interval": uncertainty.interval(a)}
    rb = {"value": uncertainty._stat(b), "interval": uncertainty.interval(b)}
    unpaired = leaderboard.delta(rb, ra)
    assert unpaired["how"] == "unpaired" and unpaired["tie"]


def test_items_of_other_windows_are_not_paired():
    assert uncertainty.paired(nll_items(8, ids="a"), nll_items(8, ids="b")) is None


def test_perplexity_items_use_windows_or_segments_and_give_the_value():
    sums, counts = [[10.0, 12.0]] * 3, [[256, 255]] * 3
    few = uncertainty.ppl_items(sums, counts, "x")
    assert len(few["values"]) == 6 and few["unit"].startswith("256-token segments of 3 windows")
    many = uncertainty.ppl_items([[10.0, 12.0]] * 8, [[256, 255]] * 8, "x")
    assert len(many["values"]) == 8 and many["unit"] == "windows"
    assert uncertainty._stat(few) == pytest.approx(math.exp(22 / 511))
    assert uncertainty.interval({**few, "values": [1.0], "weights": [1]})["ci95"] is None  # one unit: no interval


def test_a_perplexity_task_records_its_items_and_interval():
    lm = models.load("tiny-llama")
    task = make_task("ppl-austen", seqlen=128, max_windows=3)
    task.prepare(lm.tokenizer)
    value = task.evaluate(lm.model, lm.tokenizer)["ppl"]
    items, iv = task.items["ppl"], task.intervals["ppl"]
    assert len(items["values"]) == 3 and items["unit"].startswith("256-token segments")  # 127 targets: one each
    assert uncertainty._stat(items) == pytest.approx(value, rel=1e-6)
    assert iv["ci95"][0] < value < iv["ci95"][1] and iv["stderr"] > 0


def _rec(method, value, items=None, interval=None, seed=None):
    return {"method": method, "scheme": "w4a4", "value": value, "metric": "ppl", "backend": "fake_quant",
            "config_hash": f"{method}{seed}", "scheme_spec": {}, "items": items, "interval": interval,
            "calibration": {"corpus": "austen", "nsamples": 4, "seqlen": 512, "seed": seed} if seed is not None else None}


def test_the_leaderboard_marks_differences_within_noise():
    base = nll_items(64, seed=5)
    near = {**base, "values": [v + (0.01 if i % 2 else -0.01) for i, v in enumerate(base["values"])]}
    far = {**base, "values": [v + 0.3 for v in base["values"]]}
    recs = [_rec(m, uncertainty._stat(it), it, uncertainty.interval(it)) for m, it in
            (("fp16", base), ("near", near), ("far", far))]
    text = leaderboard.table(recs)
    row = {line.split("|")[1].strip(): line for line in text.splitlines()[2:]}
    assert leaderboard.TIE in row["near"] and leaderboard.TIE not in row["far"]
    assert "[" in row["far"] and "unpaired" not in row["far"]


def test_calibration_seed_spread_is_a_row_of_its_own():
    recs = [_rec("gptq", v, seed=s) for s, v in ((0, 30.0), (1, 32.0), (2, 34.0))]
    rows = leaderboard.seed_spread_rows(recs)
    assert len(rows) == 1 and rows[0][3] == "32.00 ± 2.00 (sd)" and "seeds 0,1,2" in rows[0][6]


def _opt(**over):
    return Namespace(**{**options.defaults(), "model": "tiny-llama", "seqlen": 64, "calib_seqlen": 64, **over})


def test_calib_seeds_expand_calibrating_methods_only():
    cases = build_cases(_opt(method="rtn,gptq", scheme="w4a16", tasks="ppl-austen", calib_seeds="0,1,2"))
    ids = [c.id for c in cases]
    assert ids == ["rtn-w4a16", "gptq-w4a16-calibseed0", "gptq-w4a16-calibseed1", "gptq-w4a16-calibseed2"]
    assert [c.cfg.calibration["seed"] for c in cases[1:]] == [0, 1, 2]
    with pytest.raises(ConfigError, match="replaces --calib-seed"):
        build_cases(_opt(method="gptq", calib_seeds="0,1", calib_seed=3))
    with pytest.raises(ConfigError, match="integers"):
        build_cases(_opt(method="gptq", calib_seeds="0,x"))


def test_the_regression_check_lets_noise_pass_only_where_intervals_are_wider():
    base_items = nll_items(64, seed=7)
    base = {"value": uncertainty._stat(base_items), "items": base_items, "config_hash": "h", "protocol": "p"}
    signs = np.random.default_rng(8).choice([-1.0, 1.0], 64)  # a change of random sign per window: noise
    wiggle = {**base_items, "values": [v + 0.05 * g for v, g in zip(base_items["values"], signs)]}
    shift = {**base_items, "values": [v + 0.01 for v in base_items["values"]]}
    check = regress.Check("x", {}, tol=1e-3)
    for items, ok in ((wiggle, True), (shift, False)):
        got = {**base, "value": uncertainty._stat(items), "items": items}
        assert abs(got["value"] / base["value"] - 1) > check.tol  # both beyond the fixed tolerance
        rows, passed = regress.compare([check], {"x": got}, {"x": base})
        assert passed is ok, rows
        assert ("within the paired 95 % interval" in rows[0][-1]) is ok
    rows, passed = regress.compare([check], {"x": dict(base)}, {"x": base})
    assert passed and rows[0][-1] == "ok"


def test_lmeval_standard_errors_follow_the_pick():
    res = {"results": {"t": {"acc,none": 0.6, "acc_stderr,none": 0.05, "acc_norm,none": 0.7,
                             "acc_norm_stderr,none": "N/A"}}}
    pick = lambda r: {"acc": r["results"]["t"]["acc,none"], "acc_norm": r["results"]["t"]["acc_norm,none"]}  # noqa: E731
    iv = stderr_intervals(pick, res, pick(res))
    assert iv["acc"]["stderr"] == 0.05 and iv["acc"]["ci95"] == pytest.approx([0.6 - 1.96 * 0.05, 0.6 + 1.96 * 0.05],
                                                                              abs=1e-3)
    assert iv["acc_norm"]["ci95"] is None and "no standard error" in iv["acc_norm"]["method"]


def test_the_site_lists_the_pairs_within_noise():
    from quantbench.reports import site
    base = nll_items(64, seed=9)
    near = {**base, "values": [v + (0.01 if i % 2 else -0.01) for i, v in enumerate(base["values"])]}
    far = {**base, "values": [v + 0.3 for v in base["values"]]}
    recs = [{**_rec(m, uncertainty._stat(it), it, uncertainty.interval(it)), "model": "m", "protocol": "p",
             "created": "0"} for m, it in (("a", base), ("b", near), ("c", far))]
    tied = site.ties(recs, "m", "p")
    assert len(tied) == 1 and tied[0].startswith(("b w4a4 − a w4a4", "a w4a4 − b w4a4"))


def test_the_api_returns_intervals_on_request():
    import quantbench
    lm = models.load("tiny-llama")
    plain = quantbench.evaluate(lm.model, "ppl-austen", tokenizer=lm.tokenizer, seqlen=128, ppl_windows=2)
    full = quantbench.evaluate(lm.model, "ppl-austen", tokenizer=lm.tokenizer, seqlen=128, ppl_windows=2,
                               intervals=True)
    got = full["ppl-austen"]["ppl"]
    assert got["value"] == plain["ppl-austen"]["ppl"] and got["ci95"][0] < got["value"] < got["ci95"][1]
    assert "bootstrap over 2" in got["method"]
