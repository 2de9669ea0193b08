"""Fake-quant reference backend: the plan's integer math simulated exactly in floating point.

Weights are dequantized once from their integer codes; activations are quantized dynamically per token at run
time after the plan's online transforms; Q/K/V are quantized inside the attention call (after RoPE). The modules
and the attention routing are the core's (:mod:`quantbench.simulate`); this backend applies them to a whole plan.
"""
from __future__ import annotations

from torch import nn

from quantbench.plan import QuantizedModel
from quantbench.registry import BACKENDS
from quantbench.simulate import apply_attention_plans, fake_quant_linears, swap_modules


@BACKENDS.register("fake_quant")
def realize(qm: QuantizedModel) -> nn.Module:
    """Swap every planned linear for a :class:`~quantbench.simulate.FakeQuantLinear` (in place) and apply the
    attention plans."""
    swap_modules(qm.model, fake_quant_linears(qm))
    apply_attention_plans(qm)
    return qm.model
