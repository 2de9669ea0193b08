"""``normtweak``: norm-tweaking as a plug-in after a base method (Li et al., AAAI 2024; Algorithm 1 as transcribed
in ``smpanaro/norm-tweaking:norm_tweaker.py`` and the authors' ``xingyueye/gptq-for-llama:llama_ln_mean_4.py``).

``gptq+normtweak`` (the paper's setting), ``rtn+normtweak``, ``smoothquant+normtweak``, ``quarot+gptq+normtweak``:
per block, on the plan's online view, the FP target is the block's output on its current (quantized-stream) input;
the base quantizes the block (GPTQ on those inputs); with the block run as the fake-quant backend runs it (weights
dequantized and frozen, activations quantized per the scheme), Adam updates only the block's norm parameters,
one pass over the calibration samples at batch size 1 and learning rate ``lr0 * (1 + scale * l / L)``
(:mod:`quantbench.normtweak`); the tweaked, quantized block's outputs feed the next block.

Defaults: loss ``authors`` (their code; ``paper`` and ``mse`` as options), calibration 128 x 2048 tokens generated
by the model itself (:mod:`quantbench.generate`, seed 1 as their generator), lr from the per-model table.
"""
from __future__ import annotations

import logging

import torch

from quantbench import normtweak as nt
from quantbench.blocktrain import train
from quantbench.errors import ConfigError
from quantbench.layerwise import BlockContext, run_blocks
from quantbench.method import Method
from quantbench.quant import QTensor
from quantbench.registry import METHODS
from quantbench.simulate import online_view, quantized_block

log = logging.getLogger(__name__)


@METHODS.register("normtweak")
class NormTweak(Method):
    role = "plugin"
    needs_calibration = True
    modifies = ("norms",)
    calib_defaults = {"corpus": "generated", "nsamples": 128, "seqlen": 2048, "seed": 1}
    options = {"nt_lr": -1.0, "nt_scale": -1.0, "nt_loss": "authors", "nt_epochs": 1}  # < 0: the lr table's
    choices = {"nt_loss": nt.LOSSES}
    ranges = {"nt_lr": (0, None), "nt_scale": (0, None), "nt_epochs": (0, None)}

    def __init__(self, seed: int = 0, device: str = "cpu", _in_pipeline: bool = False, **opts):
        if not _in_pipeline:
            raise ConfigError("normtweak is a plug-in: put a base method before it, e.g. --method gptq+normtweak")
        super().__init__(seed, device, **opts)

    def run(self, lm, qm, base: Method, calib, key: str | None = None) -> None:
        ad, o, scheme = qm.adapter, self.opts, qm.scheme
        lr0, scale, source = nt.lr_settings(lm.info.get("id", ""), ad.config.model_type, o["nt_lr"], o["nt_scale"])
        nblocks = len(ad.blocks)
        losses = {}

        def names(ctx):
            return [n for n in (ad.linear_name(ctx.index, r) for r in ad.linears(ctx.block)) if n in qm.linears]

        def step(ctx: BlockContext) -> dict:
            with torch.no_grad():  # FP target: the FP block on the current input (before quantizing)
                targets = ctx.forward()
            if scheme.w:
                base.quantize_block(qm, scheme.w, ctx)
            losses[ctx.index] = self._tweak(qm, ctx, targets, nt.lr_for(ctx.index, nblocks, lr0, scale))
            return {"block": ctx.block.state_dict(), "loss": losses[ctx.index], "codes": {
                n: qm.linears[n].weight.state() for n in names(ctx) if qm.linears[n].weight is not None}}

        def restore(ctx: BlockContext, saved: dict) -> None:  # the base's and the tweak's result, then the outputs
            ctx.block.load_state_dict(saved["block"])
            for n in names(ctx):
                d = saved["codes"].get(n)
                qm.linears[n].weight = QTensor.from_state(d, next(ctx.block.parameters()).device) if d else None
            losses[ctx.index] = saved["loss"]
            with quantized_block(qm, ctx.index, ctx.block), torch.no_grad():
                ctx.outputs = ctx.forward()

        with online_view(qm):
            done = run_blocks(qm, calib.windows, step, restore, key=key, tag=self.name, device=self.device)
        log.info("normtweak: %d blocks tweaked, lr0 %g scale %g (%s), loss %s", nblocks, lr0, scale, source,
                 o["nt_loss"])
        qm.info.update(normtweak={"lr0": lr0, "scale": scale, "lr_source": source, "loss": o["nt_loss"],
                                  "epochs": o["nt_epochs"], "mean_loss": losses,
                                  "per_block_s": round(done.per_block_s, 2)})
        if done.resumed:
            qm.info["normtweak"]["resumed_blocks"] = done.resumed

    def _tweak(self, qm, ctx: BlockContext, targets, lr) -> float | None:
        ad, kind, kw, i, block = qm.adapter, self.opts["nt_loss"], ctx.kwargs, ctx.index, ctx.block
        params = nt.norm_parameters(ad.norms(block))
        frozen = [p for p in block.parameters() if p.requires_grad and all(p is not q for q in params)]
        for p in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        dtype = params[0].dtype
        wide = dtype in (torch.float16, torch.bfloat16)  # fp32 during the tweak, then cast back (authors: qlayer.float())
        kw32 = _cast(kw, torch.float32) if wide else kw
        try:
            with quantized_block(qm, i, block):
                if wide:
                    block.float()

                def loss_at(j):
                    x = ctx.inputs[j].float() if wide else ctx.inputs[j]
                    return nt.channel_loss(ctx.apply(x, kw32), targets[j], kind)

                with torch.enable_grad():
                    info = train([{"params": params, "lr": lr}], loss_at, len(ctx.inputs), self.opts["nt_epochs"],
                                 f"normtweak block {i}", optimizer=torch.optim.Adam)
                if wide:
                    block.to(dtype)
                with torch.no_grad():
                    ctx.outputs = ctx.forward()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return info["loss"][-1] if info["loss"] else None


def _cast(v, dtype):
    """Floating tensors in ``v`` (block keyword arguments: position embeddings, masks) to ``dtype``."""
    if torch.is_tensor(v):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, (tuple, list)):
        return type(v)(_cast(x, dtype) for x in v)
    if isinstance(v, dict):
        return {k: _cast(x, dtype) for k, x in v.items()}
    return v
