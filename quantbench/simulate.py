"""Quantization simulated in floating point: the primitives both calibration and the fake-quant backend run on.

* :func:`swap_modules` — the one module-swap primitive (every place that replaces a linear by a view, a wrapper
  or a kernel module uses it);
* :class:`FakeQuantLinear` — ``y = fake_quant(pre(x)) · dequant(W)ᵀ + b`` for one :class:`~quantbench.plan.LinearPlan`;
* :func:`attention_plans` — Q/K/V quantized after RoPE through a registered transformers attention function, so no
  decoder layer is copied;
* :func:`quantized_block` — one decoder block run exactly as the fake-quant backend runs it (methods that train
  through the quantized block: norm-tweaking).

transformers coupling lives here and only here: attention is routed with the public
``PreTrainedModel.set_attn_implementation`` to :data:`ATTN_NAME`, registered in ``AttentionInterface`` (with
``sdpa_mask`` as its mask function, so masks are built as for ``sdpa``); the plan of each attention module is kept
in a weak map, never as an attribute on the module. ``tests/test_simulate.py`` checks this against the pinned
transformers (routing on and off, a plan that changes the output, and no plan = plain SDPA bit for bit).
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from quantbench.plan import AttentionPlan, LinearPlan, QuantizedModel
from quantbench.quant import fake_quant

ATTN_NAME = "quantbench_sdpa"
_PLANS: weakref.WeakKeyDictionary[nn.Module, AttentionPlan] = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------------- module swap

def swap_modules(root: nn.Module, new: dict[str, nn.Module]) -> Callable[[], None]:
    """Put ``new[path]`` at each dotted ``path`` under ``root``; return a function that puts the originals back.

    Every path is resolved before anything changes, so a bad path leaves ``root`` untouched."""
    slots = []
    for path, module in new.items():
        parent, _, attr = path.rpartition(".")
        owner = root.get_submodule(parent)
        slots.append((owner, attr, getattr(owner, attr), module))
    for owner, attr, _, module in slots:
        setattr(owner, attr, module)

    def restore() -> None:
        for owner, attr, old, _ in reversed(slots):
            setattr(owner, attr, old)

    return restore


@contextlib.contextmanager
def swapped(root: nn.Module, new: dict[str, nn.Module]) -> Iterator[nn.Module]:
    """:func:`swap_modules` for the duration of a ``with`` block."""
    restore = swap_modules(root, new)
    try:
        yield root
    finally:
        restore()


# ---------------------------------------------------------------------------------------------------- linears

class FakeQuantLinear(nn.Module):
    """``y = fake_quant(pre(x)) @ dequant(W)ᵀ + b`` for one :class:`LinearPlan` (the FP weight where it has none)."""

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
        return f"{self.in_features}, {self.out_features}, {act}, pre={[type(t).__name__ for t in self.pre]}"


def fake_quant_linears(qm: QuantizedModel, names: list[str] | None = None, root: nn.Module | None = None,
                       prefix: str = "") -> dict[str, nn.Module]:
    """``{path under root: FakeQuantLinear}`` for the planned linears ``names`` (default: all), ready for
    :func:`swap_modules`; ``prefix`` is ``root``'s qualified name in the model."""
    root = qm.model if root is None else root
    out = {}
    for name in qm.linears if names is None else names:
        path = name[len(prefix):] if prefix else name
        out[path] = FakeQuantLinear(unwrap(root.get_submodule(path)), qm.linears[name])
    return out


# ---------------------------------------------------------------------------------------------------- attention

def _attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with the module's :class:`AttentionPlan` (if it has one) applied to post-RoPE Q, K and V."""
    plan = _PLANS.get(module)
    if plan is not None:
        query, key, value = plan.apply(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_NAME, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def route_attention(model: nn.Module) -> str:
    """Route ``model``'s attention through :func:`_attention`; returns the implementation it had."""
    before = model.config._attn_implementation  # read only: the public setter below does the writing
    if before != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    return before


def attach(plans: dict[nn.Module, AttentionPlan]) -> None:
    """Give each attention module its plan, for good (see :func:`apply_attention_plans`)."""
    _PLANS.update({m: p for m, p in plans.items() if p is not None and p.active})


def plan_of(module: nn.Module) -> AttentionPlan | None:
    return _PLANS.get(module)


@contextlib.contextmanager
def attention_plans(model: nn.Module, plans: dict[nn.Module, AttentionPlan]) -> Iterator[None]:
    """For the duration: route ``model``'s attention through this module and apply ``plans[attention module]``
    to its Q/K/V; afterwards the plans are detached and the model's attention implementation is what it was."""
    active = {m: p for m, p in plans.items() if p is not None and p.active}
    if not active:
        yield
        return
    before = route_attention(model)
    previous = {m: _PLANS.get(m) for m in active}
    _PLANS.update(active)
    try:
        yield
    finally:
        for m, p in previous.items():
            if p is None:
                _PLANS.pop(m, None)
            else:
                _PLANS[m] = p
        if before != ATTN_NAME:
            model.set_attn_implementation(before)


def model_attention_plans(qm: QuantizedModel) -> dict[nn.Module, AttentionPlan]:
    """``{attention module: plan}`` of every decoder block of ``qm``."""
    ad = qm.adapter
    return {ad.attention(ad.blocks[i]): p for i, p in qm.attention.items()}


@contextlib.contextmanager
def quantized_block(qm: QuantizedModel, i: int, block: nn.Module) -> Iterator[nn.Module]:
    """Run decoder block ``i`` as the fake-quant backend would (its planned linears as :class:`FakeQuantLinear`,
    its attention plan applied) for the duration, then restore it."""
    ad = qm.adapter
    names = [n for n in (ad.linear_name(i, r) for r in ad.linears(block)) if n in qm.linears]
    views = fake_quant_linears(qm, names, block, prefix=ad.block_prefix(i))
    with swapped(block, views), attention_plans(qm.model, {ad.attention(block): qm.attention.get(i)}):
        yield block


# ---------------------------------------------------------------------------------------------------- online view

class PreLinear(nn.Module):
    """``inner(pre(x))``: a linear with its plan's online transforms and no quantization (calibration view)."""

    def __init__(self, pre: list, inner: nn.Linear):
        super().__init__()
        self.pre, self.inner = nn.Sequential(*pre), inner

    def forward(self, x):
        return self.inner(self.pre(x))


def unwrap(module: nn.Module) -> nn.Module:
    """The ``nn.Linear`` behind a :class:`PreLinear` (or the module itself)."""
    return module.inner if isinstance(module, PreLinear) else module


@contextlib.contextmanager
def online_view(qm: QuantizedModel) -> Iterator[nn.Module]:
    """Run ``qm.model`` with every planned online transform active and nothing quantized, for the duration.

    This is the model GPTQ calibrates on after a rotation (QuaRot ``main.py``: the online Hadamards are installed
    before GPTQ, the activation quantizers only after it), and it equals the original model in exact arithmetic.
    """
    views = {n: PreLinear(p.pre, qm.model.get_submodule(n)) for n, p in qm.linears.items() if p.pre}
    with swapped(qm.model, views):
        yield qm.model


def apply_attention_plans(qm: QuantizedModel) -> None:
    """Apply every active attention plan of ``qm`` for good (a backend's realize): Q/K/V quantized after RoPE."""
    plans = {m: p for m, p in model_attention_plans(qm).items() if p.active}
    if plans:
        attach(plans)
        route_attention(qm.model)
