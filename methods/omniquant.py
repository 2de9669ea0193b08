"""``omniquant``: OmniQuant (Shao et al., ICLR 2024; ``OpenGVLab/OmniQuant:quantize/omniquant.py``).

Block by block (layer-wise runner, FP and quantized streams): the block's linears get learnable weight clipping
(LWC, per output channel or group, sigmoid bounds initialised at 4.0) and, when activations are quantized,
learnable equivalent transformation (LET) scales — ``qkv`` (input_layernorm ↔ q/k/v), ``fc1``
(post_attention_layernorm ↔ gate/up), ``out`` (v_proj rows ↔ o_proj columns) and ``qkt`` (q_proj rows ↔ k_proj
rows, initialised to 1) — initialised with SmoothQuant's formula and OmniQuant's signed weight max. down_proj gets
LWC only; shifts are off for Llama-family models (as in the reference). AdamW on
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

from quantbench.adapters import LINEARS
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
        gqa = ad.num_kv_heads != ad.num_heads
        if use_let and gqa:
            log.info("omniquant: GQA (%d KV heads for %d heads): the v_proj -> o_proj LET is skipped (the reference "
                     "cannot fold it and fails)", ad.num_kv_heads, ad.num_heads)
        stats = activation_stats(lm, calib.windows) if use_let else None
        qm = plain_plan(lm, scheme, weights="omniquant (LWC)" if o["lwc"] else "round-to-nearest",
                        let=sorted(["qkv", "fc1", "qkt"] + ([] if gqa else ["out"])) if use_let else [],
                        let_skipped=["out (GQA)"] if use_let and gqa else [], no_let=["down_proj"])
        losses = {}

        def step(ctx: BlockContext) -> dict:
            losses[ctx.index], state = self._block(ctx, qm, stats, use_let, gqa, None)
            return state

        def restore(ctx: BlockContext, state: dict) -> None:
            losses[ctx.index], _ = self._block(ctx, qm, stats, use_let, gqa, state)

        done = run_blocks(qm, calib.windows, step, restore, key=key, tag="omniquant", device=self.device,
                          fp_stream=True)
        qm.info.update(train_per_block_s=round(done.per_block_s, 2),
                       final_loss={i: (v["loss"][-1] if v["loss"] else None) for i, v in losses.items()},
                       nan_restored=[i for i, v in losses.items() if v.get("nan_restored")],
                       resumed_blocks=done.resumed)
        return qm

    def _block(self, ctx: BlockContext, qm, stats, use_let, gqa, saved: dict | None) -> tuple[dict, dict | None]:
        """Train block ``ctx.index``'s LET/LWC parameters (or load them from ``saved``, its checkpoint), fold and
        quantize; returns (training info, checkpoint state or None when restored)."""
        ad, o, scheme, i, block = qm.adapter, self.opts, qm.scheme, ctx.index, ctx.block
        lin = ad.linears(block)
        dtype = lin["q"].weight.dtype
        block.to(compute_dtype(dtype))  # the reference trains in fp32 (a float64 model stays float64)
        p = nn.ParameterDict()
        if use_let:
            st = lambda role: stats[ad.linear_name(i, role)]["absmax"].to(lin[role].weight.device)  # noqa: E731
            p["qkv"] = nn.Parameter(omniquant_scales(st("q"), lin["q"].weight, o["alpha"]))
            p["fc1"] = nn.Parameter(omniquant_scales(st("up"), lin["up"].weight, o["alpha"]))
            if not gqa:
                p["out"] = nn.Parameter(omniquant_scales(st("o"), lin["o"].weight, o["alpha"]))
            p["qkt"] = nn.Parameter(torch.ones(lin["k"].out_features, device=lin["k"].weight.device))
        clips = nn.ModuleDict({r: c for r, m in lin.items() if o["lwc"] and (c := _clip_for(m, scheme.w))})
        get = lambda k: (lambda: p[k]) if k in p else None  # noqa: E731
        inv = lambda k: (lambda: 1 / p[k]) if k in p else None  # noqa: E731
        qkt_q = (lambda: 1 / expand_kv(p["qkt"], ad.gqa_groups, ad.head_dim)) if "qkt" in p else None
        spec = dict(q=(get("qkv"), get("qkv"), qkt_q), k=(get("qkv"), get("qkv"), get("qkt")),
                    v=(get("qkv"), get("qkv"), inv("out")), o=(None, get("out"), None),
                    gate=(get("fc1"), get("fc1"), None), up=(get("fc1"), get("fc1"), None), down=(None, None, None))
        views = {r: QLinearView(lin[r], scheme.w, scheme.a, clips[r] if r in clips else None, *spec[r]) for r in lin}
        for v in views.values():  # only LET/LWC parameters train
            v.inner.requires_grad_(False)
        aug = ctx.forward() if o["aug_loss"] else None  # --aug_loss: FP block on the quantized stream

        def clamp_scales():
            with torch.no_grad():
                for k in ("qkv", "fc1", "out"):
                    if k in p:
                        p[k].copy_(truncate(p[k]))

        kw, targets, state = ctx.kwargs, ctx.fp_targets, None
        with swapped(block, {LINEARS[r]: v for r, v in views.items()}), ctx.quantized_attention():
            if saved is not None:
                p.load_state_dict({k[4:]: v for k, v in saved.items() if k.startswith("let.")})
                clips.load_state_dict({k[4:]: v for k, v in saved.items() if k.startswith("lwc.")})
                info = {"resumed": True, "loss": []}
            else:
                def loss_at(j):
                    out = block(widen(ctx.inputs[j]), **kw)
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
        """Fold the learned LET scales into norms and weights (``smooth_and_quant_inplace``), in float64."""
        if not p:
            return
        lin = ad.linears(block)
        ln1, ln2 = ad.norms(block)
        fuse_into_norm(ln1, [lin["q"], lin["k"], lin["v"]], p["qkv"].detach())
        fuse_into_norm(ln2, [lin["gate"], lin["up"]], p["fc1"].detach())
        if "out" in p:
            fuse_into_linear(lin["v"], lin["o"], p["out"].detach())
        fuse_qk(lin["q"], lin["k"], p["qkt"].detach(), ad.gqa_groups, ad.head_dim)
