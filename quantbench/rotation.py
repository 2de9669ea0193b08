"""QuaRot's computational-invariance rewrite (Ashkboos et al., 2024, §3-4; ``spcl/QuaRot:fake_quant/rotation_utils.py``).

1. :func:`fuse_norms` — every RMSNorm's weight is multiplied into the linears that read it (input_layernorm → q/k/v,
   post_attention_layernorm → gate/up, final norm → lm_head), in float64; the norms become weightless.
2. :func:`rotate` — an orthogonal ``Q`` (randomized Hadamard, or Haar-random with ``mode="random"``) is fused into
   the residual stream: ``E ← E Q``; q/k/v/gate/up/lm_head ``W ← W Q``; o/down ``W ← Qᵀ W`` (and bias ``b Q``).
   Inside each block: a per-head Hadamard on the v_proj output (fused), a Hadamard across heads on the o_proj
   input (online; together they make ``H_hidden``), and a Hadamard of the intermediate size on the down_proj
   input (online, fused into the weight). RMSNorm commutes with ``Q`` (``‖xQ‖ = ‖x‖``), so in exact arithmetic
   the FP model with the online transforms equals the original.

Returned: the online transforms per linear name (they go into the plan, where a kernel may fuse them with the
activation quantizer) and what was done, for provenance.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from quantbench import hadamard
from quantbench.adapters import LlamaAdapter
from quantbench.errors import ConfigError
from quantbench.transforms import Hadamard, HeadHadamard, OnlineTransform

log = logging.getLogger(__name__)

ROTATE_MODES = ("hadamard", "random")


def _set(p: nn.Parameter | torch.Tensor, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype)


def untie(adapter: LlamaAdapter) -> bool:
    """Give lm_head its own weight when it shares the embedding's (fusions differ for the two). True if it did."""
    if not adapter.tied_embeddings:
        return False
    adapter.lm_head.weight = nn.Parameter(adapter.embed.weight.detach().clone(), requires_grad=False)
    adapter.config.tie_word_embeddings = False
    return True


@torch.no_grad()
def fuse_norms(adapter: LlamaAdapter, embed_mean: bool = False) -> dict:
    """QuaRot ``fuse_layer_norms``: fold each RMSNorm weight into the following linears' input columns (float64).

    ``embed_mean`` reproduces QuaRot's unconditional subtraction of each embedding row's mean (``rotation_utils.py``
    L51-54). It is off by default: it is exact only for LayerNorm models (which subtract the mean anyway); for
    RMSNorm models (Llama, Mistral, Qwen2, SmolLM2) it changes the function (QuaRot issue #7, "a minor error").
    """
    info = {"untied_lm_head": untie(adapter), "embed_mean_subtracted": embed_mean}
    if embed_mean:
        e = adapter.embed.weight.double()
        _set(adapter.embed.weight, e - e.mean(-1, keepdim=True))
    pairs = []
    for block in adapter.blocks:
        ln1, ln2 = adapter.norms(block)
        lin = adapter.linears(block)
        pairs += [(ln1, [lin["q"], lin["k"], lin["v"]]), (ln2, [lin["gate"], lin["up"]])]
    pairs.append((adapter.final_norm, [adapter.lm_head]))
    for norm, linears in pairs:
        g = norm.weight.double()
        for linear in linears:
            _set(linear.weight, linear.weight.double() * g)
        norm.weight.data.fill_(1.0)
    return info


def residual_rotation(n: int, mode: str, seed: int) -> torch.Tensor:
    """QuaRot's ``Q`` of size ``n`` (float64): ``diag(±1) H / sqrt(n)`` or a Haar-random orthogonal matrix."""
    gen = torch.Generator().manual_seed(seed)
    if mode == "hadamard":
        return hadamard.random_hadamard(n, gen)
    if mode == "random":
        return hadamard.random_orthogonal(n, gen)
    raise ValueError(f"unknown rotate mode {mode!r}")


def _per_head(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``x (I ⊗ H_head_dim)`` over the last dim."""
    return hadamard.hadamard_transform(x.reshape(*x.shape[:-1], -1, head_dim)).reshape(x.shape)


@torch.no_grad()
def rotate(adapter: LlamaAdapter, mode: str = "hadamard", seed: int = 0) -> tuple[dict[str, list], dict]:
    """Fuse ``Q`` and the in-block Hadamards into the weights; return ``({linear name: online transforms}, info)``.

    Call after :func:`fuse_norms`. The o_proj online transform is the across-heads Hadamard ``H_heads ⊗ I`` when
    the head count has one (QuaRot ``online_partial_had``); otherwise (e.g. SmolLM2's 9 heads) a full Hadamard of
    the o_proj input size, which is exact but costs a full transform instead of a ``heads``-point one.
    """
    q = residual_rotation(adapter.hidden_size, mode, seed)
    hd, nh, ff = adapter.head_dim, adapter.num_heads, adapter.intermediate_size
    _set(adapter.embed.weight, adapter.embed.weight.double() @ q)
    _set(adapter.lm_head.weight, adapter.lm_head.weight.double() @ q)
    try:
        hadamard.factor(nh)
        o_pre: OnlineTransform = HeadHadamard(nh, hd)
        o_kind = f"across-heads Hadamard {nh} (x) I_{hd}"
    except ConfigError:  # no Hadamard of this head count: full online Hadamard instead (recorded)
        o_pre = Hadamard(nh * hd)
        o_kind = f"full Hadamard {nh * hd} ({nh} heads admit no Hadamard)"
        log.info("quarot: %s on every o_proj input", o_kind)
    down_pre = Hadamard(ff)
    online: dict[str, list] = {}
    for i, block in enumerate(adapter.blocks):
        lin = adapter.linears(block)
        for role in ("q", "k", "v", "gate", "up"):
            _set(lin[role].weight, lin[role].weight.double() @ q)
        for role in ("o", "down"):
            _set(lin[role].weight, q.T @ lin[role].weight.double())
            if lin[role].bias is not None:
                _set(lin[role].bias, lin[role].bias.double() @ q)
        # v_proj output: per-head Hadamard (rotate_ov_proj); W_v <- (I ⊗ H)ᵀ W_v, i.e. transform its output rows
        v = lin["v"]
        _set(v.weight, _per_head(v.weight.double().T, hd).T)
        if v.bias is not None:
            _set(v.bias, _per_head(v.bias.double(), hd))
        # o_proj input: undo the v-side per-head Hadamard, then fold the online transform
        o = lin["o"]
        _set(o.weight, o_pre.fold(_per_head(o.weight.double(), hd)))
        _set(lin["down"].weight, down_pre.fold(lin["down"].weight.double()))
        online[adapter.linear_name(i, "o")] = [o_pre]
        online[adapter.linear_name(i, "down")] = [down_pre]
    info = {"rotate_mode": mode, "rotation_seed": seed, "residual_rotation": f"{mode} {adapter.hidden_size}",
            "down_proj_online": f"Hadamard {ff} = {'x'.join(map(str, hadamard.factor(ff)))}",
            "o_proj_online": o_kind, "v_proj_fused": f"per-head Hadamard {hd}"}
    return online, info
