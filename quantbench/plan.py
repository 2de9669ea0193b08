"""What a method hands a backend (docs/architecture.md, "The plan"): per linear, integer weights + online
transforms + activation spec; per attention layer, the Q/K/V specs.

A plan says *what* to compute, not how; the fake-quant backend simulates it exactly in floating point, kernel
backends run it with integer math, and both are tested against each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantbench.adapters import Adapter
from quantbench.quant import QTensor, QuantScheme, QuantSpec, fake_quant
from quantbench.transforms import OnlineTransform


@dataclass
class LinearPlan:
    """One linear: ``y = Q_w(W) · Q_act(pre(x)) + b``. ``weight`` None keeps the module's FP weight."""

    weight: QTensor | None
    pre: list[OnlineTransform] = field(default_factory=list)
    act: QuantSpec | None = None


@dataclass
class AttentionPlan:
    """One attention layer: specs for Q, K, V as the attention kernel sees them (Q/K after RoPE), and an optional
    online transform of Q and K per head (e.g. a Hadamard of size head_dim, QuaRot ``QKRotationWrapper``) applied
    before quantizing. Granularity: ``token`` = one scale per token across all heads (QuaRot ``k_groupsize=-1``),
    ``head`` = one scale per token and head (OmniQuant, DuQuant), ``group`` = contiguous groups of the
    ``[heads * head_dim]`` row."""

    q: QuantSpec | None = None
    k: QuantSpec | None = None
    v: QuantSpec | None = None
    qk_pre: OnlineTransform | None = None

    @property
    def active(self) -> bool:
        return any(s is not None for s in (self.q, self.k, self.v)) or self.qk_pre is not None

    def apply(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Fake-quantize ``[B, heads, T, head_dim]`` tensors (idempotent, so a growing KV cache is safe)."""
        if self.qk_pre is not None:
            q, k = self.qk_pre(q), self.qk_pre(k)
        return _per_token(q, self.q), _per_token(k, self.k), _per_token(v, self.v)


def _per_token(x: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """Quantize ``[B, H, T, D]`` per head, or as ``[B, T, H*D]`` rows (the layout of the k/v projection output)."""
    if spec is None:
        return x
    if spec.granularity == "head":
        return fake_quant(x, spec)
    b, h, t, d = x.shape
    rows = x.transpose(1, 2).reshape(b, t, h * d)
    return fake_quant(rows, spec).reshape(b, t, h, d).transpose(1, 2)


@dataclass
class QuantizedModel:
    """The FP model (with any offline fusions applied) + the plan for every quantized linear and attention."""

    model: nn.Module
    adapter: Adapter
    scheme: QuantScheme
    linears: dict[str, LinearPlan] = field(default_factory=dict)
    attention: dict[int, AttentionPlan] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # method settings, what was kept FP, calibration id


def plain_plan(lm, scheme, **info) -> QuantizedModel:
    """Every decoder linear with the scheme's activation spec and no transform; attention as the scheme says."""
    qm = QuantizedModel(lm.model, lm.adapter, scheme, info={"kept_fp": ["embed_tokens", "norms", "lm_head"], **info})
    for name, _, _, _ in lm.adapter.named_linears():
        qm.linears[name] = LinearPlan(weight=None, act=scheme.a)
    for i in range(len(lm.adapter.blocks)):
        qm.attention[i] = AttentionPlan(q=scheme.q, k=scheme.k, v=scheme.v)
    return qm
