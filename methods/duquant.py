"""``duquant`` and ``duquant-lwc``: DuQuant (Lin et al., NeurIPS 2024; ``Hsu1023/DuQuant:quantize/duquant.py``).

1. Smoothing (α 0.6; 0.5 with LWC) from per-channel ``max|X|`` statistics, fused: input_layernorm → q/k/v,
   post_attention_layernorm → gate/up, up_proj rows → down_proj, v_proj rows → o_proj; under GQA the o_proj input
   is divided online instead (the reference's fallback).
2. Per block, one forward of the *averaged* calibration sequence (the mean of the block-0 inputs over the
   calibration windows, pushed through the already-quantized blocks) with quantization on: the first linear of
   each input group (q for q/k/v, o, gate for gate/up, down) builds its ``G = R1 · P · R2`` from its input
   (:mod:`quantbench.duquant`), its siblings reuse it, and weights ``W Λ G`` are quantized as the pass goes.
3. ``duquant-lwc``: learnable weight clipping trained on the rotated weights (20 epochs, AdamW lr 1e-2, MSE against
   the FP block), as the reference's ``run_lwc.sh``; plain ``duquant`` uses the fixed weight clip 0.8 (``--swc``).

Clipping precedence as the reference: fixed weight clip > LWC; activations (all linear inputs, Q and K) clipped
at 0.9 (``--lac``); V not clipped. Q and K get a Hadamard of size head_dim after RoPE — the reference ties it to
the block size (it must equal head_dim there); here it is head_dim whatever the block size. V is quantized without
rotation, softmax is not quantized; embeddings, final norm and lm_head stay FP. Weights per-channel asymmetric,
activations per-token asymmetric, Q/K/V per token and head (``w4a4q4kv4`` is the papers' "W4A4").

The greedy search runs in float64 (exact: a float32 screen with a rigorous error bound, float64 where the bound
cannot decide, :func:`quantbench.duquant.greedy_rotation`); ``search_dtype=float32`` searches in float32 throughout
(faster, not bit-exact; its agreement with float64 is measured in ``docs/performance.md``).

The block size is the largest power of two ≤ ``block_size`` (128) that divides every linear input (SmolLM2's 576
gives 64) and is recorded. The online transform (an optional division, then ``G`` as one
:class:`~quantbench.transforms.DuQuantRotation`) is part of the plan and acts on channels only, so any batch size
and length works (the reference assumes batch 1).
"""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from quantbench import duquant as dq
from quantbench.blocktrain import train
from quantbench.errors import ConfigError
from quantbench.layerwise import BlockContext, run_blocks
from quantbench.method import Method
from quantbench.plan import plain_plan
from quantbench.quant import LearnableClip, QuantSpec, compute_dtype, fake_quant, quantize
from quantbench.registry import METHODS
from quantbench.simulate import swapped
from quantbench.smoothing import duquant_scales, fuse_into_linear, fuse_into_norm
from quantbench.stats import activation_stats
from quantbench.transforms import DuQuantRotation, Hadamard, OnlineTransform, Scale

log = logging.getLogger(__name__)


class DuQuantLinear(nn.Module):
    """A linear whose input transform is calibrated on its first call (``online_duquant_cali``), then frozen.

    ``y = Q_a(G(x)) · Q_w(fold_G(W))ᵀ + b``; ``pre`` holds an optional online smoothing division. Siblings point
    at their group leader and copy its transform (``copy_quantizers_duquant_params``).
    """

    def __init__(self, inner: nn.Linear, method: DuQuant, w_spec, a_spec, pre: list, leader: DuQuantLinear | None,
                 fixed: list | None = None):
        super().__init__()
        self.inner, self.method, self.w_spec, self.a_spec = inner, method, w_spec, a_spec
        self.pre = list(pre)
        self.leader = leader
        self.fixed = fixed  # a transform found before (a resumed block): used instead of searching
        self.transform: list | None = None
        self.search: dq.Transform | None = None
        self.weight_t: torch.Tensor | None = None
        self.clip: LearnableClip | None = None

    def _calibrate(self, x: torch.Tensor) -> None:
        if self.leader is not None:
            if self.leader.transform is None:
                raise RuntimeError("DuQuant group leader was not called before its sibling")
            self.transform, self.search = self.leader.transform, self.leader.search
        elif self.fixed is not None:
            self.transform = self.fixed
        else:
            m = self.method
            for t in self.pre:
                x = t(x)
            self.search = dq.calibrate(x.detach(), m.block, m.opts["steps"], m.opts["permutation_times"],
                                       m.opts["mode"], m.gen, dtype=m.opts["search_dtype"])
            g = DuQuantRotation(torch.stack([r.float() for r in self.search.rotations]),
                                torch.stack(self.search.perms) if self.search.perms else
                                torch.empty(0, x.shape[-1], dtype=torch.long))
            self.transform = list(self.pre) + [g]
        w = self.inner.weight.detach().double()
        for t in self.transform:
            w = t.fold(w)
        self.weight_t = w.to(self.inner.weight.dtype)
        if self.method.use_lwc and self.w_spec is not None:  # the bounds exist (at init) during this pass too
            spec = self.w_spec
            groups = w.shape[1] // spec.group_size if spec.granularity == "group" else 1
            self.clip = LearnableClip(w.shape[0], groups).to(w.device, compute_dtype(self.inner.weight.dtype))

    def forward(self, x):
        if self.transform is None:
            self._calibrate(x)
        for t in self.transform:
            x = t(x)
        w = self.weight_t
        if self.w_spec is not None:
            w = fake_quant(w, self.w_spec, *(self.clip() if self.clip is not None else (None, None)))
        return F.linear(fake_quant(x, self.a_spec), w, self.inner.bias)


def folds(ad, prev: str) -> bool:
    """Whether a smoothing scale of the linear after ``prev`` (v -> o, up -> down) folds into ``prev``'s rows: v must
    be its own linear with one row per o_proj column (not under GQA, not fused in qkv); up's output must reach down
    through a map that commutes with a positive scale (SwiGLU's product with up, ReLU; not GELU)."""
    if prev == "v":
        return "v" in ad.LINEARS and ad.num_kv_heads == ad.num_heads
    return ad.MLP_ACT in ("swiglu", "relu")


def smoothing_pairs(ad) -> list[str]:
    """What the smoothing does on this model, for the record."""
    why_o = "GQA" if "v" in ad.LINEARS else "v fused in qkv"
    return (["qkv", "fc1", "down" if folds(ad, "up") else f"down (online, {ad.MLP_ACT})"]
            + (["out"] if folds(ad, "v") else [f"out (online, {why_o})"]))


REFERENCE_SCOPE = {  # Hsu1023/DuQuant ships LLaMA-family layers only (int_llama_layer)
    "opt": "DuQuant's reference runs LLaMA-family models only; on OPT its steps are applied as written, the "
           "LayerNorm bias divided with the weight, the down smoothing folded into fc1 (ReLU commutes with it)",
    "bloom": "DuQuant's reference runs LLaMA-family models only; on BLOOM its steps are applied as written, the "
             "LayerNorm bias divided with the weight, out and down smoothed online (fused qkv, GELU)",
}


def block_size_for(ad, wanted: int) -> int:
    """Largest power of two ≤ ``wanted`` dividing hidden, intermediate and the o_proj input size."""
    dims = (ad.hidden_size, ad.intermediate_size, ad.num_heads * ad.head_dim)
    b = 1 << int(math.log2(wanted))
    while b > 1 and any(d % b for d in dims):
        b //= 2
    if b < 2:
        raise ConfigError(f"no power-of-two DuQuant block size divides the model's widths {dims}")
    return b


@METHODS.register("duquant")
class DuQuant(Method):
    needs_calibration = True
    headline = "w4a4"
    weight_only = False  # rotations and permutation against activation outliers: the paper's W4A4 / W6A6
    modifies = ("norms", "linears")  # smoothing fused into norms and neighbouring linears
    calib_defaults = {"nsamples": 128, "seqlen": 2048, "seed": 2}
    options = {"mode": "repo", "block_size": 128, "steps": 256, "permutation_times": 1, "alpha": 0.6,
               "swc": 0.8, "lac": 0.9, "epochs": 0, "lwc_lr": 1e-2, "smooth": True, "search_dtype": "float64"}
    neutral = {"search_dtype": "float64"}  # added with the exact fast search: float64 is what earlier records ran
    choices = {"mode": dq.MODES, "search_dtype": dq.SEARCH_DTYPES}
    ranges = {"block_size": (2, None), "steps": (0, None), "permutation_times": (0, None), "alpha": (0, 1),
              "swc": (0, 1), "lac": (0, 1), "epochs": (0, None), "lwc_lr": (0, None)}
    defaults = {"w": QuantSpec(4, "minmax", "channel"), "a": QuantSpec(4, "minmax", "token"),
                **{t: QuantSpec(4, "minmax", "head") for t in "qkv"}}

    def specs(self):
        from dataclasses import replace

        o = self.opts
        s = dict(self.defaults)
        if o["swc"] > 0:  # fixed weight clip wins over LWC (reference precedence swc > lwc)
            s["w"] = replace(s["w"], clip_ratio=o["swc"])
        for t in "aqk":  # lac clips every linear input and Q, K (their params are copied from act_quant_params)
            s[t] = replace(s[t], clip_ratio=o["lac"])
        return s

    def quantize(self, lm, scheme, calib, key=None):
        ad, o = lm.adapter, self.opts
        if o["steps"] < 0 or o["permutation_times"] < 0:
            raise ConfigError("DuQuant steps and permutation_times must be >= 0")
        self.block = block_size_for(ad, o["block_size"])
        self.gen = torch.Generator().manual_seed(self.seed)
        use_lwc = self.use_lwc = o["swc"] <= 0 and o["epochs"] > 0 and scheme.w is not None
        t0 = time.perf_counter()
        online = self._smooth(lm, calib) if o["smooth"] else {}
        t_smooth = time.perf_counter() - t0
        scope = {"reference_scope": REFERENCE_SCOPE[ad.FAMILY]} if ad.FAMILY in REFERENCE_SCOPE else {}
        qm = plain_plan(lm, scheme, weights="duquant (LWC)" if use_lwc else f"duquant (fixed clip {o['swc']})",
                        mode=o["mode"], block_size_used=self.block,
                        smoothing=smoothing_pairs(ad) if o["smooth"] else [],
                        qk_hadamard=ad.head_dim if ad.ROUTES_ATTENTION else None, **scope)
        if ad.ROUTES_ATTENTION:  # Q and K rotated per head (exact in FP; BLOOM's ALiBi attention is not reachable)
            qk = Hadamard(ad.head_dim)
            for i in range(len(ad.blocks)):
                qm.attention[i].qk_pre = qk
        mean = []  # the averaged calibration sequence, pushed through the quantized blocks (rotate_inps)

        def step(ctx: BlockContext) -> dict:
            return self._block(ctx, qm, online.get(ctx.index, {}), mean, use_lwc, None)

        def restore(ctx: BlockContext, state: dict) -> None:
            self._block(ctx, qm, online.get(ctx.index, {}), mean, use_lwc, state)

        done = run_blocks(qm, calib.windows, step, restore, key=key, tag=self.name, device=self.device,
                          fp_stream=use_lwc)
        qm.info.update(smooth_s=round(t_smooth, 1), calib_per_block_s=round(done.per_block_s, 2))
        if done.resumed:
            qm.info["resumed_blocks"] = done.resumed
        return qm

    @torch.no_grad()
    def _smooth(self, lm, calib) -> dict[int, dict[str, torch.Tensor]]:
        """Fuse the smoothing scales (``duquant.py`` L180-199); return per block the scales that could not be folded
        and divide their linear's input online instead (``{role: s}``: o under GQA or a fused qkv, the
        ``smooth_fc_inplace`` fallback; down after a GELU, which does not commute with a scale)."""
        ad, alpha = lm.adapter, self.opts["alpha"]
        stats = activation_stats(lm, calib.windows)
        online: dict[int, dict[str, torch.Tensor]] = {}
        for i, block in enumerate(ad.blocks):
            lin = ad.linears(block)
            act = lambda r: stats[ad.linear_name(i, r)]["absmax"].to(lin[r].weight.device)  # noqa: E731
            for (norm, fcs), lead in zip(ad.norm_inputs(block), (ad.ATTN_IN[0], "up")):
                fuse_into_norm(norm, fcs, duquant_scales(act(lead), lin[lead].weight, alpha))
            for prev, role in (("up", ad.MLP_OUT), ("v", ad.ATTN_OUT)):
                s = duquant_scales(act(role), lin[role].weight, alpha)
                if folds(ad, prev):
                    fuse_into_linear(lin[prev], lin[role], s)
                else:  # smooth_fc_inplace: the input divided online, the weight multiplied
                    online.setdefault(i, {})[role] = s
        return online

    def _block(self, ctx: BlockContext, qm, online: dict, mean: list, use_lwc: bool, saved: dict | None) -> dict | None:
        """Calibrate block ``ctx.index`` (or, with ``saved`` from its checkpoint, redo it with the transforms and
        clips found before: same plan and same outputs, no search, no training); ``mean`` holds the averaged
        sequence (``inps.mean(dim=0)``, made from the block-0 inputs), replaced by its value after this block.
        Returns the block's checkpoint state (None when it was restored)."""
        ad, scheme, i, block = qm.adapter, qm.scheme, ctx.index, ctx.block
        if i == 0:
            mean[:] = [torch.stack(ctx.inputs).mean(0)]
            if not use_lwc:
                ctx.inputs = list(mean)  # only the averaged sequence is propagated
        lin = ad.linears(block)
        views: dict[str, DuQuantLinear] = {}
        for r in ad.LINEARS:
            pre = [Scale(online[r])] if r in online else []
            lead = views.get(ad.leader(r)) if ad.leader(r) != r else None
            fixed = [OnlineTransform.from_state(t) for t in saved["transforms"][r]] if saved and lead is None else None
            views[r] = DuQuantLinear(lin[r], self, scheme.w, scheme.a, pre, lead, fixed)  # Scale.fold: W * s
        with swapped(block, {ad.LINEARS[r]: v for r, v in views.items()}), ctx.quantized_attention():
            with torch.no_grad():  # calibrate G on the averaged sequence, quantization on; its output goes on
                mean[0] = ctx.apply(mean[0])
            if use_lwc:
                if saved:
                    for r, v in views.items():
                        v.clip.load_state_dict(saved["clips"][r])
                    loss = saved["final_loss"]
                else:
                    loss = self._train_lwc(ctx, views)
                qm.info.setdefault("final_loss", {})[i] = loss
                ctx.outputs = ctx.forward()  # quantized stream through the trained block
            else:
                ctx.outputs = list(mean)
        for r, v in views.items():
            name = ad.linear_name(i, r)
            lo_hi = tuple(t.detach() for t in v.clip()) if v.clip is not None else (None, None)
            w = v.weight_t
            if not torch.isfinite(w).all():
                raise ConfigError(f"{name}: cannot quantize a tensor with NaN/inf values")
            plan = qm.linears[name]
            plan.pre = list(v.transform)
            plan.weight = quantize(w, scheme.w, *lo_hi) if scheme.w is not None else None
            if scheme.w is None:  # FP weights: the model's linear must hold the folded weight itself
                lin[r].weight.data = w.to(lin[r].weight.dtype)
        leaders = [r for r in views if ad.leader(r) == r]
        searches = saved["searches"] if saved else {r: [s.kept for s in views[r].search.searches] for r in leaders}
        qm.info.setdefault("searches", {})[i] = searches
        if saved:
            self.gen.set_state(saved["rng"])  # the searches of later blocks draw what they would have drawn
            return None
        return {"transforms": {r: [t.state() for t in views[r].transform] for r in leaders}, "searches": searches,
                "clips": {r: v.clip.state_dict() for r, v in views.items()} if use_lwc else {},
                "final_loss": qm.info.get("final_loss", {}).get(i), "rng": self.gen.get_state()}

    def _train_lwc(self, ctx: BlockContext, views) -> float | None:
        """LWC on the rotated weights (``duquant.py`` L307-356): AdamW on the clip bounds only."""
        params = [p for v in views.values() for p in v.clip.parameters()]
        targets = ctx.fp_targets

        def loss_at(j):
            return F.mse_loss(ctx.apply(ctx.inputs[j]), targets[j])

        with torch.enable_grad():
            info = train([{"params": params, "lr": self.opts["lwc_lr"]}], loss_at, len(ctx.inputs),
                         self.opts["epochs"], f"{self.name} block {ctx.index}")
        return info["loss"][-1] if info["loss"] else None


@METHODS.register("duquant-lwc")
class DuQuantLWC(DuQuant):
    options = {**DuQuant.options, "alpha": 0.5, "swc": 0.0, "epochs": 20}
