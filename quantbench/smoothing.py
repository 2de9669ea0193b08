"""Channel-wise smoothing (SmoothQuant Eq. 4; OmniQuant's LET; DuQuant's smoothing step) and its exact fusions.

``X W^T = (X / s)(W diag(s))^T``: dividing an activation channel by ``s_j`` and multiplying the matching weight
column by it changes nothing in exact arithmetic, but moves quantization difficulty from activations to weights.
The division is folded into whatever produces the activation: a norm's weight (and a LayerNorm's bias) before the
linears that read it, or the rows of a preceding linear (v_proj rows for o_proj; up_proj rows for down_proj in
DuQuant). For Q·Kᵀ, OmniQuant's ``qkt`` scale divides q_proj rows and multiplies k_proj rows. OmniQuant's shift on
LayerNorm models (OPT): ``X W^T + b = ((X - δ) / s)(W diag(s))^T + (b + W δ)``, ``δ`` folded into the norm's (or the
preceding linear's) bias.
"""
from __future__ import annotations

import torch
from torch import nn

from quantbench.errors import ConfigError
from quantbench.quant import compute_dtype

SCALE_MIN = 1e-5


def smoothquant_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant ``smooth.py::smooth_ln_fcs_llama_like``: ``s = max|X|^α / max_{fc} max_i |W_ij|^(1-α)``,
    weight max over *all* linears sharing the input, both clamped at 1e-5."""
    dt = compute_dtype(weights[0].dtype)
    w = torch.stack([wt.detach().abs().amax(0) for wt in weights]).amax(0).to(dt).clamp(min=SCALE_MIN)
    return (act_absmax.to(dt).pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_MIN)


def omniquant_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """OmniQuant's LET initialisation (``quantize/omniquant.py``): the same formula, but the weight term is the
    *signed* column max of the first linear only (q_proj, up_proj or o_proj), ``weight.max(dim=0)``."""
    dt = compute_dtype(weight.dtype)
    w = weight.detach().to(dt).amax(0).clamp(min=SCALE_MIN)
    return (act_absmax.to(dt).clamp(min=SCALE_MIN).pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_MIN)


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype)


def _shift_bias(lin: nn.Linear, shift: torch.Tensor) -> None:
    """``b += W δ`` (OmniQuant ``smooth_ln_fcs_inplace``/``smooth_fc_fc_inplace``: what subtracting ``δ`` from the
    input takes away), before the weight is scaled."""
    if lin.bias is None:
        raise ConfigError(f"a smoothing shift needs a bias on the {lin.in_features}-column linear that absorbs it")
    _set(lin.bias, lin.bias.double() + lin.weight.double() @ shift)


@torch.no_grad()
def fuse_into_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor,
                   shift: torch.Tensor | None = None) -> None:
    """``norm.weight /= s``, ``norm.bias = (norm.bias - δ) / s``; every following linear ``b += W δ``,
    ``W[:, j] *= s_j`` (float64). ``shift`` ``δ`` (OmniQuant's LET shift on LayerNorm models) needs a norm bias."""
    s = s.double().to(norm.weight.device)
    if shift is not None:
        shift = shift.double().to(norm.weight.device)
        if getattr(norm, "bias", None) is None:
            raise ConfigError("a smoothing shift needs a norm with a bias (LayerNorm)")
        _set(norm.bias, norm.bias.double() - shift)
        for lin in linears:
            _shift_bias(lin, shift)
    _set(norm.weight, norm.weight.double() / s)
    if getattr(norm, "bias", None) is not None:
        _set(norm.bias, norm.bias.double() / s)
    for lin in linears:
        _set(lin.weight, lin.weight.double() * s)


@torch.no_grad()
def fuse_into_linear(prev: nn.Linear, nxt: nn.Linear, s: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    """``prev`` rows ``/= s`` and bias ``(b - δ) / s``; ``nxt`` bias ``+= W δ``, columns ``*= s``. Needs
    ``prev.out_features == nxt.in_features`` (v_proj → o_proj fails under GQA: there v_proj has fewer rows than
    o_proj has columns). A shift passes through attention unchanged (softmax rows sum to 1)."""
    if prev.out_features != nxt.in_features:
        raise ConfigError(f"cannot fold a smoothing scale from a {prev.out_features}-row linear into a "
                          f"{nxt.in_features}-column one")
    s = s.double().to(prev.weight.device)
    if shift is not None:
        shift = shift.double().to(prev.weight.device)
        if prev.bias is None:
            raise ConfigError(f"a smoothing shift needs a bias on the {prev.out_features}-row linear before it")
        _set(prev.bias, prev.bias.double() - shift)
        _shift_bias(nxt, shift)
    _set(prev.weight, prev.weight.double() / s.unsqueeze(1))
    if prev.bias is not None:
        _set(prev.bias, prev.bias.double() / s)
    _set(nxt.weight, nxt.weight.double() * s)


@torch.no_grad()
def fuse_qk(q: nn.Linear, k: nn.Linear, s: torch.Tensor, gqa_groups: int, head_dim: int) -> None:
    """OmniQuant ``smooth_q_k_inplace``: q_proj rows ``/= s``, k_proj rows ``*= s``. ``s`` has one entry per k_proj
    row; under GQA each KV head's scales serve its ``gqa_groups`` query heads."""
    s = s.double().to(q.weight.device)
    sq = expand_kv(s, gqa_groups, head_dim)
    _set(q.weight, q.weight.double() / sq.unsqueeze(1))
    _set(k.weight, k.weight.double() * s.unsqueeze(1))
    if q.bias is not None:
        _set(q.bias, q.bias.double() / sq)
    if k.bias is not None:
        _set(k.bias, k.bias.double() * s)


def expand_kv(s: torch.Tensor, gqa_groups: int, head_dim: int) -> torch.Tensor:
    """Per-KV-channel values ``[kv_heads * head_dim]`` repeated for each KV head's query heads."""
    return s.reshape(-1, 1, head_dim).expand(-1, gqa_groups, head_dim).reshape(-1)


def duquant_scales(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """DuQuant's smoothing (``quantize/duquant.py`` L211-213): SmoothQuant's formula with the ``|W|`` column max of
    the one linear named in its pairs (q_proj, up_proj, down_proj, o_proj), activations clamped at 1e-5."""
    dt = compute_dtype(weight.dtype)
    w = weight.detach().to(dt).abs().amax(0).clamp(min=SCALE_MIN)
    return (act_absmax.to(dt).clamp(min=SCALE_MIN).pow(alpha) / w.pow(1 - alpha)).clamp(min=SCALE_MIN)
