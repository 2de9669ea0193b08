"""``--dtype float64``: the regression check's dtype (reports/regress.py). Every algorithm must compute in float64
there: one step that drops to float32 brings back the CPU-dependent 1e-7 noise that flips roundings and moves the
check's baselines from machine to machine."""
import tempfile

import pytest
import torch

import quantbench.methods.duquant
import quantbench.methods.normtweak
import quantbench.methods.omniquant
import quantbench.methods.smoothquant
import quantbench.weights
from quantbench.quant import QuantSpec, compute_dtype, fake_quant, mse_clip, widen
from quantbench.results import ResultStore
from quantbench.runner import RunConfig, run
from quantbench.tasks import make_task


def test_compute_dtype_keeps_float64_and_widens_the_rest_to_float32():
    assert [compute_dtype(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == [
        torch.float32, torch.float32, torch.float32, torch.float64]
    x = torch.randn(4, 8, dtype=torch.float64)
    assert widen(x) is x and widen(x.half()).dtype == torch.float32
    assert mse_clip(x, QuantSpec(4, "sym")).dtype == torch.float64
    assert fake_quant(x, QuantSpec(4, "sym")).dtype == torch.float64


CAL = {"corpus": "austen", "nsamples": 2, "seqlen": 64}


@pytest.mark.parametrize("method,scheme,options", [
    ("gptq", "w4a16", {}), ("smoothquant", "w8a8", {}), ("omniquant", "w4a4", {"epochs": 1}),
    ("gptq+normtweak", "w4a16", {}), ("duquant-lwc", "w4a4", {"steps": 4, "epochs": 1}),
    ("quarot-gptq", "w4a4", {"w_clip": True}),
])
def test_float64_runs_calibrate_in_float64(monkeypatch, method, scheme, options):
    """The Hessian GPTQ solves with, the smoothing scales, the trained parameters and their losses are float64."""
    seen = []

    def spy(module, name, *picks):
        real = getattr(module, name)

        def wrapped(*a, **kw):
            seen.extend((name, pick(a).dtype) for pick in picks)
            out = real(*a, **kw)
            if name.endswith("_scales"):
                seen.append((name, out.dtype))
            return out

        monkeypatch.setattr(module, name, wrapped)

    spy(quantbench.weights, "gptq_quantize", lambda a: a[1])
    spy(quantbench.methods.smoothquant, "smoothquant_scales")
    spy(quantbench.methods.omniquant, "omniquant_scales")
    for m in (quantbench.methods.omniquant, quantbench.methods.normtweak, quantbench.methods.duquant):
        spy(m, "train", lambda a: a[0][0]["params"][0], lambda a: a[1](0))  # a trained parameter; the loss
    with tempfile.TemporaryDirectory() as d:
        rec = run(RunConfig(method, "tiny-llama", scheme, dtype="float64", calibration=CAL, options=options),
                  [make_task("ppl-austen", seqlen=64, max_windows=1)], ResultStore(d)).records[0]
    assert rec["dtype"] == "float64"
    assert seen, "no calibration step was observed"
    assert {dt for _, dt in seen} == {torch.float64}, set(seen)
