"""``omniquant``: OmniQuant (Shao et al., ICLR 2024; ``OpenGVLab/OmniQuant:quantize/omniquant.py``).

Block by block (layer-wise runner, FP and quantized streams): the block's linears get learnable weight clipping
(LWC, per output channel or group, sigmoid bounds initialised at 4.0) and, when activations are quantized,
learnable equivalent transformation (LET) scales — ``qkv`` (input_layernorm ↔ q/k/v), ``fc1``
(post_attention_layernorm ↔ gate/up), ``out`` (v_proj rows ↔ o_proj columns) and ``qkt`` (q_proj rows ↔ k_proj
rows, initialised to 1) — initialised with SmoothQuant's formula and OmniQuant's signed weight max. down_proj gets
LWC only. On LayerNorm models (OPT; the reference's ``use_shift``) each LET pair also learns a shift ``δ`` initialised
at the channel's ``(max + min) / 2``: ``(X - δ)/s``, folded into the norm's (or v_proj's) bias with ``b += W δ`` on
the reading linears; shifts are off for Llama-family models (as in the reference). AdamW on
``MSE(FP block(FP input), quantized block(quantized input))`` for ``epochs`` x ``nsamples`` steps of batch 1 in
fp32; then LET is fused into the norms and weights and the weights are rounded with the learned clipping.

Deviations, each logged and recorded: under GQA the v→o LET is skipped (the reference's ``smooth_fc_fc`` needs
v_proj rows == o_proj columns and crashes; DuQuant lists OmniQuant's LLaMA-2-70B W4A4 as NaN), and the ``qkt``
scale has one entry per k_proj row, shared by the query heads of that KV head. A NaN loss restores the epoch's
start and stops that block's training (the reference enters ``pdb``). Finished blocks are checkpointed so a killed
run resumes at the block it stopped in; the checkpoint is removed once the run completes.

Quantizers: weights per-channel asymmetric raw min/max (``minmax``), activations per-token asymmetric, Q/K/V per
token and head (``head``), softmax FP. Defaults are the code's: lwc_lr 1e-2 (the paper says 5e-3), let_lr 5e-3,
alpha 0.5, 20 epochs (the W4A4/W6A6 scripts; the code default is 10), 128 x 2048 windows, seed 2.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from quantbench.blocktrain import QLinearView, train, truncate
from quantbench.errors import ConfigError
from quantbench.layerwise import BlockContext, run_blocks
from quantbench.method import Method
from quantbench.plan import plain_plan
from quantbench.quant import LearnableClip, QuantSpec, compute_dtype, quantize, widen
from quantbench.registry import METHODS
from quantbench.simulate import swapped
from quantbench.smoothing import expand_kv, fuse_into_linear, fuse_into_norm, fuse_qk, omniquant_scales
from quantbench.stats import activation_stats

log = logging.getLogger(__name__)


def _clip_for(lin: nn.Linear, spec: QuantSpec | None) -> LearnableClip | None:
    if spec is None:
        return None
    groups = lin.in_features // spec.group_size if spec.granularity == "group" else 1
    return LearnableClip(lin.out_features, groups).to(lin.weight.device, compute_dtype(lin.weight.dtype))


@METHODS.register("omniquant")
class OmniQuant(Method):
    needs_calibration = True
    modifies = ("norms", "linears")  # LET fused into norms and weights
    calib_defaults = {"nsamples": 128, "seqlen": 2048, "seed": 2}
    options = {"epochs": 20, "lwc_lr": 1e-2, "let_lr": 5e-3, "alpha": 0.5, "let": "auto", "lwc": True,
               "aug_loss": False}
    choices = {"let": ("auto", "on", "off")}
    ranges = {"epochs": (0, None), "lwc_lr": (0, None), "let_lr": (0, None), "alpha": (0, 1)}
    defaults = {"w": QuantSpec(4, "minmax", "channel"), "a": QuantSpec(4, "minmax", "token"),
                **{t: QuantSpec(4, "minmax", "head") for t in "qkv"}}

    def quantize(self, lm, scheme, calib, key=None):
        ad, o = lm.adapter, self.opts
        use_let = o["let"] == "on" or (o["let"] == "auto" and scheme.a is not None)
        lets, skipped = self.lets(ad)
        if use_let and skipped:
            log.info("omniquant: LET pairs skipped on this model: %s", ", ".join(skipped))
        stats = activation_stats(lm, calib.windows) if use_let else None
        shift = ad.NORM == "layer"  # the reference's use_shift: on for OPT/Falcon (LayerNorm), off for Llama
        qm = plain_plan(lm, scheme, weights="omniquant (LWC)" if o["lwc"] else "round-to-nearest",
                        let=sorted(lets) if use_let else [], let_skipped=skipped if use_let else [],
                        no_let=[ad.LINEARS[ad.MLP_OUT].rsplit(".", 1)[-1]],
                        **({"let_shift": True} if shift and use_let else {}),
                        **({"reference_scope": REFERENCE_SCOPE[ad.FAMILY]} if ad.FAMILY in REFERENCE_SCOPE else {}))
        losses = {}

        def step(ctx: BlockContext) -> dict:
            losses[ctx.index], state = self._block(ctx, qm, stats, lets if use_let else (), shift, None)
            return state

        def restore(ctx: BlockContext, state: dict) -> None:
            losses[ctx.index], _ = self._block(ctx, qm, stats, lets if use_let else (), shift, state)

        done = run_blocks(qm, calib.windows, step, restore, key=key, tag="omniquant", device=self.device,
                          fp_stream=True)
        qm.info.update(train_per_block_s=round(done.per_block_s, 2),
                       final_loss={i: (v["loss"][-1] if v["loss"] else None) for i, v in losses.items()},
                       nan_restored=[i for i, v in losses.items() if v.get("nan_restored")],
                       resumed_blocks=done.resumed)
        return qm

    @staticmethod
    def lets(ad) -> tuple[list[str], list[str]]:
        """The LET pairs this model admits (``qkv``, ``fc1``, ``out``, ``qkt``) and why any is skipped: ``out`` needs
        a v_proj with as many rows as o_proj has columns (not under GQA, not in a fused query_key_value), ``qkt``
        separate q_proj and k_proj."""
        lets, skipped = ["qkv", "fc1"], []
        gqa = ad.num_kv_heads != ad.num_heads
        if "v" not in ad.LINEARS or gqa:  # GQA: the reference cannot fold it and fails
            skipped.append("out (GQA)" if gqa else "out (v fused in qkv)")
        else:
            lets.append("out")
        if "q" in ad.LINEARS:
            lets.append("qkt")
        else:
            skipped.append("qkt (q, k fused in qkv)")
        return lets, skipped

    def _block(self, ctx: BlockContext, qm, stats, lets, use_shift, saved: dict | None) -> tuple[dict, dict | None]:
        """Train block ``ctx.index``'s LET/LWC parameters (or load them from ``saved``, its checkpoint), fold and
        quantize; returns (training info, checkpoint state or None when restored)."""
        ad, o, scheme, i, block = qm.adapter, self.opts, qm.scheme, ctx.index, ctx.block
        lin = ad.linears(block)
        attn_in, mlp_in = ad.ATTN_IN, ad.MLP_IN
        dtype = lin[attn_in[0]].weight.dtype
        block.to(compute_dtype(dtype))  # the reference trains in fp32 (a float64 model stays float64)
        p = nn.ParameterDict()
        leads = {"qkv": attn_in[0], "fc1": "up", "out": ad.ATTN_OUT}  # the reference's pairs: q_proj, up_proj, o_proj
        for k in ("qkv", "fc1", "out"):
            if k in lets:
                r = leads[k]
                st = stats[ad.linear_name(i, r)]
                dev = lin[r].weight.device
                p[k] = nn.Parameter(omniquant_scales(st["absmax"].to(dev), lin[r].weight, o["alpha"]))
                if use_shift:  # act_shifts: the channel's (max + min) / 2
                    p[k + "_shift"] = nn.Parameter(((st["max"] + st["min"]) / 2).to(dev, p[k].dtype))
        if "qkt" in lets:
            p["qkt"] = nn.Parameter(torch.ones(lin["k"].out_features, device=lin["k"].weight.device))
        clips = nn.ModuleDict({r: c for r, m in lin.items() if o["lwc"] and (c := _clip_for(m, scheme.w))})
        get = lambda k: (lambda: p[k]) if k in p else None  # noqa: E731
        inv = lambda k: (lambda: 1 / p[k]) if k in p else None  # noqa: E731
        qkt_q = (lambda: 1 / expand_kv(p["qkt"], ad.gqa_groups, ad.head_dim)) if "qkt" in p else None
        spec = {r: dict(in_div=get("qkv"), col=get("qkv"), in_shift=get("qkv_shift"), shift=get("qkv_shift"))
                for r in attn_in}
        spec.update({r: dict(in_div=get("fc1"), col=get("fc1"), in_shift=get("fc1_shift"), shift=get("fc1_shift"))
                     for r in mlp_in})
        if "qkt" in p:
            spec["q"]["row"], spec["k"]["row"] = qkt_q, get("qkt")
        if "out" in p:
            spec["v"].update(row=inv("out"), row_shift=get("out_shift"))
            spec[ad.ATTN_OUT] = dict(col=get("out"), shift=get("out_shift"))
        views = {r: QLinearView(lin[r], scheme.w, scheme.a, clips[r] if r in clips else None, **spec.get(r, {}))
                 for r in lin}
        for v in views.values():  # only LET/LWC parameters train
            v.inner.requires_grad_(False)
        aug = ctx.forward() if o["aug_loss"] else None  # --aug_loss: FP block on the quantized stream

        def clamp_scales():
            with torch.no_grad():
                for k in ("qkv", "fc1", "out"):
                    if k in p:
                        p[k].copy_(truncate(p[k]))

        targets, state = ctx.fp_targets, None
        with swapped(block, {ad.LINEARS[r]: v for r, v in views.items()}), ctx.quantized_attention():
            if saved is not None:
                p.load_state_dict({k[4:]: v for k, v in saved.items() if k.startswith("let.")})
                clips.load_state_dict({k[4:]: v for k, v in saved.items() if k.startswith("lwc.")})
                info = {"resumed": True, "loss": []}
            else:
                def loss_at(j):
                    out = ctx.apply(widen(ctx.inputs[j]))
                    loss = nn.functional.mse_loss(out, widen(targets[j]))
                    if aug is not None:
                        loss = loss + nn.functional.mse_loss(out, widen(aug[j]))
                    return loss

                groups = [{"params": list(p.values()), "lr": o["let_lr"]},
                          {"params": list(clips.parameters()), "lr": o["lwc_lr"]}]
                with torch.enable_grad():
                    info = train([g for g in groups if g["params"]], loss_at, len(ctx.inputs), o["epochs"],
                                 f"omniquant block {i}", before_step=clamp_scales)
                state = {**{f"let.{k}": v.detach().clone() for k, v in p.items()},  # before the final clamp
                         **{f"lwc.{k}": v.clone() for k, v in clips.state_dict().items()}}
            clamp_scales()
            with torch.no_grad():
                ctx.outputs = [y.to(dtype) for y in ctx.forward([widen(x) for x in ctx.inputs])]
                final_clips = {r: tuple(t.detach() for t in c()) for r, c in clips.items()}
        self._fuse(ad, block, p)
        block.to(dtype)
        for r, m in lin.items():
            if scheme.w is not None:
                name = ad.linear_name(i, r)
                try:  # quantize() refuses NaN/inf; the error names the layer
                    qm.linears[name].weight = quantize(m.weight.detach(), scheme.w, *final_clips.get(r, (None, None)))
                except ConfigError as e:
                    raise ConfigError(f"{name}: {e}") from None
        return info, state

    @staticmethod
    @torch.no_grad()
    def _fuse(ad, block, p):
        """Fold the learned LET scales (and shifts) into norms and weights (``smooth_and_quant_inplace``), in
        float64, in the reference's order: qkv, fc1, out, qkt."""
        if not p:
            return
        lin = ad.linears(block)
        shift = lambda k: p[k + "_shift"].detach() if k + "_shift" in p else None  # noqa: E731
        for (norm, fcs), k in zip(ad.norm_inputs(block), ("qkv", "fc1")):
            if k in p:
                fuse_into_norm(norm, fcs, p[k].detach(), shift(k))
        if "out" in p:
            fuse_into_linear(lin["v"], lin[ad.ATTN_OUT], p["out"].detach(), shift("out"))
        if "qkt" in p:
            fuse_qk(lin["q"], lin["k"], p["qkt"].detach(), ad.gqa_groups, ad.head_dim)


REFERENCE_SCOPE = {  # families the reference (OpenGVLab/OmniQuant: int_llama_layer, int_opt_layer, int_falcon_layer)
    "bloom": "OmniQuant's reference has no BLOOM path; run with its OPT settings (LayerNorm shifts), qkv/fc1 LET only",
}
