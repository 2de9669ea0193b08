"""Fake-quant reference backend: the plan's integer math simulated exactly in floating point.

Weights are dequantized once from their integer codes; activations are quantized dynamically per token at run
time after the plan's online transforms; Q/K/V are quantized inside the attention call (after RoPE) through a
registered transformers attention function, so no decoder layer is copied.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from quantbench.adapters import LINEARS
from quantbench.plan import LinearPlan, QuantizedModel, unwrap
from quantbench.quant import fake_quant
from quantbench.registry import BACKENDS

ATTN_NAME = "quantbench_sdpa"


class FakeQuantLinear(nn.Module):
    """``y = fake_quant(pre(x)) @ dequant(W)ᵀ + b`` for one :class:`LinearPlan`."""

    def __init__(self, linear: nn.Linear, plan: LinearPlan):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = plan.weight.dequantize(linear.weight.dtype) if plan.weight is not None else linear.weight.detach()
        self.weight = nn.Parameter(w.to(linear.weight.device), requires_grad=False)
        self.bias = linear.bias
        self.pre = nn.Sequential(*plan.pre)
        self.act = plan.act

    def forward(self, x):
        return F.linear(fake_quant(self.pre(x), self.act), self.weight, self.bias)

    def extra_repr(self):
        act = f"a{self.act.bits}-{self.act.grid}-{self.act.granularity}" if self.act else "a16"
        return f"{self.in_features}, {self.out_features}, {act}, pre={len(self.pre)}"


def _attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with the layer's :class:`AttentionPlan` applied to post-RoPE Q, K and V."""
    plan = getattr(module, "qb_attention_plan", None)
    if plan is not None:
        query, key, value = plan.apply(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_NAME, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


@BACKENDS.register("fake_quant")
def realize(qm: QuantizedModel) -> nn.Module:
    """Swap every planned linear for a :class:`FakeQuantLinear` (in place) and hook attention plans."""
    model = qm.model
    for name, plan in qm.linears.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, attr, FakeQuantLinear(getattr(owner, attr), plan))
    hook_attention(qm)
    return model


def hook_attention(qm: QuantizedModel) -> None:
    """Give each attention layer with an active plan to :func:`_attention` (Q/K/V quantized after RoPE)."""
    active = {i: p for i, p in qm.attention.items() if p.active}
    for i, plan in active.items():
        qm.adapter.attention(qm.adapter.blocks[i]).qb_attention_plan = plan
    if active:
        qm.model.config._attn_implementation = ATTN_NAME


@contextmanager
def quantized_block(qm: QuantizedModel, i: int, block: nn.Module):
    """Run decoder block ``i`` as :func:`realize` would (its planned linears as :class:`FakeQuantLinear`, its
    attention plan active) for the duration, then restore it: for methods that train through the quantized block."""
    ad = qm.adapter
    swapped = []
    for role, lin in ad.linears(block).items():
        name = ad.linear_name(i, role)
        if name in qm.linears:
            parent, _, attr = LINEARS[role].rpartition(".")
            owner = block.get_submodule(parent)
            swapped.append((owner, attr, lin))
            setattr(owner, attr, FakeQuantLinear(unwrap(lin), qm.linears[name]))
    attn, plan = ad.attention(block), qm.attention.get(i)
    cfg, impl = qm.model.config, qm.model.config._attn_implementation
    if plan is not None and plan.active:
        attn.qb_attention_plan = plan
        cfg._attn_implementation = ATTN_NAME
    try:
        yield block
    finally:
        for owner, attr, lin in swapped:
            setattr(owner, attr, lin)
        if plan is not None and plan.active:
            del attn.qb_attention_plan
            cfg._attn_implementation = impl
