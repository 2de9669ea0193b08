"""The GPU-only calibration bench's code (bench/test_calibration_scale.py) run on a small shape on the CPU: the
timed rows come out with the settings and the projection they claim."""
import importlib.util
from pathlib import Path

import torch


def _bench(name):
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_calibration_scale_bench_runs_on_a_tiny_shape(monkeypatch):
    mod = _bench("test_calibration_scale")
    tiny = {**mod.LLAMA2_7B, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 512, "num_hidden_layers": 4}
    monkeypatch.setenv("QB_SCALE_NSAMPLES", "2")
    lm = mod.shaped_model(tiny, 2, "cpu")
    down_in = lm.adapter.linears(lm.adapter.blocks[0])["up"].weight.float().abs().amax(1)
    assert (down_in > 100 * down_in.median()).sum() == 3  # the planted massive channels
    rows = [mod.run_one(m, s, o, tiny, 2, torch.device("cpu"), seqlen=64)
            for m, s, o in (("duquant", "w4a4", {"steps": 2}), ("gptq", "w4a16", {}))]
    assert [r["method"] for r in rows] == ["duquant", "gptq"] and rows[0]["paper (A100) s"] == 50.0
    for r in rows:
        assert r["blocks timed"] == "2 of 4" and r["settings"].startswith("2 x 64")
        # both rounded to 0.1 s from the same wall time: 2 x measured is within 0.1, the projection within 0.05
        assert abs(r["projected whole model s"] - 2 * r["measured_s"]) <= 0.15 + 1e-9
