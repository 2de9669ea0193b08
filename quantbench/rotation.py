"""QuaRot's computational-invariance rewrite (Ashkboos et al., 2024, §3-4; ``spcl/QuaRot:fake_quant/rotation_utils.py``).

1. :func:`fuse_norms` — every RMSNorm's weight is multiplied into the linears that read it (input_layernorm → q/k/v,
   post_attention_layernorm → gate/up, final norm → lm_head), in float64; the norms become weightless.
   LayerNorm models (OPT; ``rotation_utils.py::fuse_layer_norms`` with ``model_type == OPT_MODEL``, as in SliceGPT):
   the norm's bias goes into the reading linears' biases (``b += W β``, lm_head gets a bias), the residual stream is
   made zero-mean — each row of the token and position embeddings has its mean subtracted and the outputs of
   out_proj and fc2 are centred (``bake_mean_into_linear``: ``W -= mean over rows``, ``b -= mean(b)``) — and every
   LayerNorm becomes an RMSNorm (:func:`layernorms_to_rms`), which equals it on zero-mean inputs.
2. :func:`rotate` — an orthogonal ``Q`` (randomized Hadamard, or Haar-random with ``mode="random"``) is fused into
   the residual stream: ``E ← E Q`` (token and learned position embeddings); q/k/v/gate/up/lm_head ``W ← W Q``; o/down ``W ← Qᵀ W`` (and bias ``b Q``).
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
from quantbench.adapters import Adapter
from quantbench.errors import ConfigError
from quantbench.simulate import swap_modules
from quantbench.transforms import Hadamard, HeadHadamard, OnlineTransform

log = logging.getLogger(__name__)

ROTATE_MODES = ("hadamard", "random")


def _set(p: nn.Parameter | torch.Tensor, value: torch.Tensor) -> None:
    p.data = value.to(p.dtype)


def untie(adapter: Adapter) -> bool:
    """Give lm_head its own weight when it shares the embedding's (fusions differ for the two). True if it did."""
    if not adapter.tied_embeddings:
        return False
    adapter.lm_head.weight = nn.Parameter(adapter.embed.weight.detach().clone(), requires_grad=False)
    adapter.config.tie_word_embeddings = False
    return True


@torch.no_grad()
def fuse_norms(adapter: Adapter, embed_mean: bool = False) -> dict:
    """QuaRot ``fuse_layer_norms``: fold each norm's weight (and a LayerNorm's bias) into the following linears'
    input columns (float64); on LayerNorm models also centre the residual stream and turn the norms into RMSNorms.

    ``embed_mean`` reproduces QuaRot's unconditional subtraction of each embedding row's mean (``rotation_utils.py``
    L51-54). On RMSNorm models (Llama, Mistral, Qwen2, SmolLM2) it is off by default: it changes the function there
    (QuaRot issue #7, "a minor error"). On LayerNorm models it is always done, and exact (the norm subtracts the
    mean anyway).
    """
    layer = adapter.NORM == "layer"
    info = {"untied_lm_head": untie(adapter), "embed_mean_subtracted": embed_mean or layer}
    if embed_mean or layer:
        for e in adapter.embeddings:
            w = e.weight.double()
            _set(e.weight, w - w.mean(-1, keepdim=True))
    pairs = [p for block in adapter.blocks for p in adapter.norm_inputs(block)]
    pairs.append((adapter.final_norm, [adapter.lm_head]))
    if layer:
        for block in adapter.blocks:
            lin = adapter.linears(block)
            for role in (adapter.ATTN_OUT, adapter.MLP_OUT):
                _bake_mean(lin[role])
    for norm, linears in pairs:
        g = norm.weight.double()
        beta = norm.bias.double() if getattr(norm, "bias", None) is not None else None
        for linear in linears:
            if beta is not None:
                if linear.bias is None:  # lm_head (QuaRot fuse_ln_linear gives it a bias)
                    _zero_bias(linear)
                _set(linear.bias, linear.bias.double() + linear.weight.double() @ beta)
            _set(linear.weight, linear.weight.double() * g)
        norm.weight.data.fill_(1.0)
        if beta is not None:
            norm.bias.data.zero_()
    if layer:
        info["norms"] = "LayerNorm -> RMSNorm (residual stream centred: embedding rows, out_proj and fc2 outputs)"
    return info


def _bake_mean(linear: nn.Linear) -> None:
    """QuaRot/SliceGPT ``bake_mean_into_linear``: the linear's output has zero mean over its features."""
    w = linear.weight.double()
    _set(linear.weight, w - w.mean(0, keepdim=True))
    if linear.bias is not None:
        b = linear.bias.double()
        _set(linear.bias, b - b.mean())


def _zero_bias(linear: nn.Linear) -> None:
    linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                           device=linear.weight.device), requires_grad=False)


def layernorms_to_rms(adapter: Adapter):
    """Every LayerNorm of the decoder (each block's two, the final one) replaced by an :class:`torch.nn.RMSNorm`
    of unit weight and the same eps (QuaRot's weightless ``RMSN``), and lm_head given a zero bias to receive the
    final norm's; returns the function that undoes it. A no-op (and a no-op undo) on RMSNorm models or when done.
    Run after :func:`fuse_norms` has read the norms; a cached plan's tensors load into the result
    (``Method.restructure``)."""
    if adapter.NORM != "layer" or isinstance(adapter.final_norm, nn.RMSNorm):
        return lambda: None
    names = {id(m): n for n, m in adapter.model.named_modules()}
    norms = [n for b in adapter.blocks for n in adapter.norms(b)] + [adapter.final_norm]
    new = {names[id(n)]: nn.RMSNorm(n.normalized_shape, eps=n.eps, elementwise_affine=True,
                                    device=n.weight.device, dtype=n.weight.dtype) for n in norms}
    undo_swap = swap_modules(adapter.model, new)
    head = adapter.lm_head
    had_bias = head.bias is not None
    if not had_bias:
        _zero_bias(head)

    def undo() -> None:
        undo_swap()
        if not had_bias:
            head.bias = None
    return undo


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
def rotate(adapter: Adapter, mode: str = "hadamard", seed: int = 0) -> tuple[dict[str, list], dict]:
    """Fuse ``Q`` and the in-block Hadamards into the weights; return ``({linear name: online transforms}, info)``.

    Call after :func:`fuse_norms`. The o_proj online transform is the across-heads Hadamard ``H_heads ⊗ I`` when
    the head count has one (QuaRot ``online_partial_had``); otherwise (e.g. SmolLM2's 9 heads) a full Hadamard of
    the o_proj input size, which is exact but costs a full transform instead of a ``heads``-point one.
    """
    q = residual_rotation(adapter.hidden_size, mode, seed)
    hd, nh, ff = adapter.head_dim, adapter.num_heads, adapter.intermediate_size
    for e in adapter.embeddings:
        _set(e.weight, e.weight.double() @ q)
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
        for role in (*adapter.ATTN_IN, *adapter.MLP_IN):
            _set(lin[role].weight, lin[role].weight.double() @ q)
        for role in (adapter.ATTN_OUT, adapter.MLP_OUT):
            _set(lin[role].weight, q.T @ lin[role].weight.double())
            if lin[role].bias is not None:
                _set(lin[role].bias, lin[role].bias.double() @ q)
        # v_proj output: per-head Hadamard (rotate_ov_proj); W_v <- (I ⊗ H)ᵀ W_v, i.e. transform its output rows
        v = lin["v"]
        _set(v.weight, _per_head(v.weight.double().T, hd).T)
        if v.bias is not None:
            _set(v.bias, _per_head(v.bias.double(), hd))
        # o_proj input: undo the v-side per-head Hadamard, then fold the online transform
        o, down = lin[adapter.ATTN_OUT], lin[adapter.MLP_OUT]
        _set(o.weight, o_pre.fold(_per_head(o.weight.double(), hd)))
        _set(down.weight, down_pre.fold(down.weight.double()))
        online[adapter.linear_name(i, adapter.ATTN_OUT)] = [o_pre]
        online[adapter.linear_name(i, adapter.MLP_OUT)] = [down_pre]
    info = {"rotate_mode": mode, "rotation_seed": seed, "residual_rotation": f"{mode} {adapter.hidden_size}",
            "down_proj_online": f"Hadamard {ff} = {'x'.join(map(str, hadamard.factor(ff)))}",
            "o_proj_online": o_kind, "v_proj_fused": f"per-head Hadamard {hd}"}
    return online, info
