"""PPL protocol and batch independence; result records complete, atomic, reproducible; leaderboard."""
import json
import math

import pytest
import torch

from quantbench import data, models
from quantbench.errors import ConfigError
from quantbench.reports.leaderboard import latest, render
from quantbench.results import REQUIRED, ResultStore
from quantbench.runner import RunConfig, run
from quantbench.tasks import make_task
from quantbench.tasks.ppl import window_losses

TASK = dict(seqlen=128, max_windows=6)


def test_window_loss_matches_hf_loss_and_is_batch_independent(tokenizer):
    lm = models.load("tiny-llama")
    w = data.ppl_windows(tokenizer, "austen", "test", seqlen=128)[:6]
    one = window_losses(lm.model, w, batch_size=1)
    three = window_losses(lm.model, w, batch_size=4)
    torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        hf = lm.model(input_ids=w[:1], labels=w[:1]).loss
    assert one[0].item() == pytest.approx(hf.item(), rel=1e-5)


def test_task_protocol_labels_and_errors():
    assert make_task("ppl-austen", seqlen=2048).protocol == "ppl/gptq/austen-test/seqlen2048"
    assert make_task("ppl-wikitext2", seqlen=2048, max_windows=8).protocol == \
        "ppl/gptq/wikitext2-test/seqlen2048/first8windows"
    assert make_task("ppl-c4").protocol == "ppl/gptq/c4-validation/duquant-seed20/seqlen2048"
    assert make_task("ppl-c4", variant="quarot-first1100").config["variant"] == "quarot-first1100"
    with pytest.raises(ConfigError, match="unknown task 'squad'"):
        make_task("squad")
    with pytest.raises(ConfigError, match="'mmlu' is a group of tasks"):
        make_task("mmlu")
    with pytest.raises(ConfigError, match="seqlen"):
        make_task("ppl-austen", seqlen=1)


def _run(tmp_path, method="rtn", scheme="w4a4", seed=0, resume=False):
    return run(RunConfig(method, "tiny-llama", scheme, seed=seed), [make_task("ppl-austen", **TASK)],
               ResultStore(tmp_path), resume=resume)


def test_records_complete_and_reproducible(tmp_path):
    a = _run(tmp_path / "a").records[0]
    b = _run(tmp_path / "b").records[0]
    assert all(k in a for k in REQUIRED)
    assert a["config_hash"] == b["config_hash"] and a["value"] == b["value"]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("created", "wall_s", "quant_wall_s", "peak_mem_mb")}  # noqa: E731
    assert strip(a) == strip(b)
    assert a["protocol"] == "ppl/gptq/austen-test/seqlen128/first6windows" and a["seed"] == 0
    assert a["scheme_spec"]["w"]["grid"] == "sym" and a["calibration"] is None  # RTN reads no calibration
    assert a["versions"]["torch"] and a["device"]["kind"] == "cpu" and a["model_revision"] == "random-init-seed0"
    assert math.isfinite(a["value"]) and a["value"] > 1
    c = _run(tmp_path / "a", scheme="w4a8").records[0]
    d = _run(tmp_path / "a", seed=1).records[0]
    assert len({a["config_hash"], c["config_hash"], d["config_hash"]}) == 3
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(f"{r['config_hash']}-ppl.json" for r in (a, c, d))  # no temp files left behind


def test_resume_skips_done_work_and_store_skips_corrupt_files(tmp_path):
    first = _run(tmp_path)
    again = _run(tmp_path, resume=True)
    assert first.records and not again.records and again.already_done == ["ppl-austen"]
    (tmp_path / "garbage.json").write_text('{"truncated": ')
    (tmp_path / "partial.json").write_text(json.dumps({"method": "rtn"}))
    assert len(ResultStore(tmp_path).records()) == 1


def test_leaderboard(tmp_path):
    fp = _run(tmp_path, method="fp16", scheme="w16a16").records[0]
    q = _run(tmp_path, scheme="w4a4").records[0]
    text = render(ResultStore(tmp_path).records())
    assert "## tiny-llama" in text and "`ppl/gptq/austen-test/seqlen128/first6windows` — ppl" in text
    rows = [line for line in text.splitlines() if line.startswith("| fp16") or line.startswith("| rtn")]
    assert rows[0].startswith("| fp16") and f"{q['value'] - fp['value']:+.2f}" in rows[1]
    assert "W4 sym/channel · A4 sym/token" in rows[1]
    older = {**q, "created": "2000-01-01T00:00:00", "value": -1.0}
    assert latest([older, q]) == [q]
