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
import time

import torch

from quantbench import normtweak as nt
from quantbench.backends.fake_quant import quantized_block
from quantbench.blocktrain import train
from quantbench.errors import ConfigError
from quantbench.layerwise import BlockCheckpoint, Layerwise
from quantbench.method import Method
from quantbench.plan import online_view
from quantbench.quant import QTensor
from quantbench.registry import METHODS

log = logging.getLogger(__name__)


@METHODS.register("normtweak")
class NormTweak(Method):
    role = "plugin"
    needs_calibration = True
    calib_defaults = {"corpus": "generated", "nsamples": 128, "seqlen": 2048, "seed": 1}
    options = {"nt_lr": -1.0, "nt_scale": -1.0, "nt_loss": "authors", "nt_epochs": 1}  # < 0: the lr table's
    choices = {"nt_loss": nt.LOSSES}

    def __init__(self, seed: int = 0, device: str = "cpu", _in_pipeline: bool = False, **opts):
        if not _in_pipeline:
            raise ConfigError("normtweak is a plug-in: put a base method before it, e.g. --method gptq+normtweak")
        super().__init__(seed, device, **opts)

    def run(self, lm, qm, base: Method, calib) -> None:
        ad, o, scheme = qm.adapter, self.opts, qm.scheme
        lr0, scale, source = nt.lr_settings(lm.info.get("id", ""), ad.config.model_type, o["nt_lr"], o["nt_scale"])
        nblocks = len(ad.blocks)
        losses, per_block, resumed = {}, [], []
        ckpt = BlockCheckpoint(self.name, self.run_key)  # a killed run resumes after its last finished block
        with online_view(qm):
            runner = Layerwise(ad, calib.windows, self.device, desc="normtweak")
            for i, block in runner:
                tb = time.perf_counter()
                names = [n for n in (ad.linear_name(i, r) for r in ad.linears(block)) if n in qm.linears]
                if i in ckpt.blocks:  # the base's and the tweak's result for this block, then its outputs
                    saved = ckpt.blocks[i]
                    block.load_state_dict(saved["block"])
                    for n in names:
                        d = saved["codes"].get(n)
                        qm.linears[n].weight = QTensor.from_state(d, next(block.parameters()).device) if d else None
                    losses[i] = saved["loss"]
                    with quantized_block(qm, i, block), torch.no_grad():
                        runner.set_outputs([_out(block(x, **runner.kwargs)) for x in runner.inputs])
                    resumed.append(i)
                    continue
                with torch.no_grad():  # FP target: the FP block on the current input (before quantizing)
                    targets = [_out(block(x, **runner.kwargs)) for x in runner.inputs]
                if scheme.w:
                    base.quantize_weights(qm, scheme.w, calib, blocks=(i, block, runner))
                losses[i] = self._tweak(qm, i, block, runner, targets, nt.lr_for(i, nblocks, lr0, scale))
                ckpt.save(i, {"block": block.state_dict(), "loss": losses[i], "codes": {
                    n: qm.linears[n].weight.state() for n in names if qm.linears[n].weight is not None}})
                per_block.append(time.perf_counter() - tb)
        ckpt.done()
        avg = sum(per_block) / max(len(per_block), 1)
        log.info("normtweak: %d blocks tweaked, lr0 %g scale %g (%s), loss %s, %.2fs/block", nblocks, lr0, scale,
                 source, o["nt_loss"], avg)
        qm.info.update(normtweak={"lr0": lr0, "scale": scale, "lr_source": source, "loss": o["nt_loss"],
                                  "epochs": o["nt_epochs"], "mean_loss": losses, "per_block_s": round(avg, 2)})
        if resumed:
            qm.info["normtweak"]["resumed_blocks"] = resumed

    def _tweak(self, qm, i, block, runner, targets, lr) -> float | None:
        ad, kind, kw = qm.adapter, self.opts["nt_loss"], runner.kwargs
        params = nt.norm_parameters(ad.norms(block))
        frozen = [p for p in block.parameters() if p.requires_grad and all(p is not q for q in params)]
        for p in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        dtype = params[0].dtype
        wide = dtype != torch.float32  # fp32 during the tweak, then cast back (authors: qlayer.float())
        kw32 = _cast(kw, torch.float32) if wide else kw
        try:
            with quantized_block(qm, i, block):
                if wide:
                    block.float()

                def loss_at(j):
                    x = runner.inputs[j].float() if wide else runner.inputs[j]
                    return nt.channel_loss(_out(block(x, **kw32)), targets[j], kind)

                with torch.enable_grad():
                    info = train([{"params": params, "lr": lr}], loss_at, len(runner.inputs), self.opts["nt_epochs"],
                                 f"normtweak block {i}", optimizer=torch.optim.Adam)
                if wide:
                    block.to(dtype)
                with torch.no_grad():
                    runner.set_outputs([_out(block(x, **kw)) for x in runner.inputs])
        finally:
            for p in frozen:
                p.requires_grad_(True)
        return info["loss"][-1] if info["loss"] else None


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _cast(v, dtype):
    """Floating tensors in ``v`` (block keyword arguments: position embeddings, masks) to ``dtype``."""
    if torch.is_tensor(v):
        return v.to(dtype) if v.is_floating_point() else v
    if isinstance(v, (tuple, list)):
        return type(v)(_cast(x, dtype) for x in v)
    if isinstance(v, dict):
        return {k: _cast(x, dtype) for k, x in v.items()}
    return v
