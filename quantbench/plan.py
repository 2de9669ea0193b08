"""What a method hands a backend (design §3): per linear, integer weights + online transforms + activation spec.

A plan says *what* to compute, not how; the fake-quant backend simulates it exactly in floating point, kernel
backends run it with integer math, and both are tested against each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantbench.adapters import LlamaAdapter
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
    """One attention layer: specs for Q, K, V as the attention kernel sees them (after RoPE, per head, per token),
    and an optional online transform of Q and K (e.g. a Hadamard of size head_dim) applied before quantizing."""

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
        return fake_quant(q, self.q), fake_quant(k, self.k), fake_quant(v, self.v)


@dataclass
class QuantizedModel:
    """The FP model (with any offline fusions applied) + the plan for every quantized linear and attention."""

    model: nn.Module
    adapter: LlamaAdapter
    scheme: QuantScheme
    linears: dict[str, LinearPlan] = field(default_factory=dict)
    attention: dict[int, AttentionPlan] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # method settings, what was kept FP, calibration id
