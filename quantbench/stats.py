"""Per-channel activation statistics of every decoder linear's input, cached on disk by content.

The forward stops at the last decoder block: the final norm, lm_head and the logits (a fifth of SmolLM2-135M's
forward, with its 49k vocabulary) are never computed, as no decoder linear reads them.

SmoothQuant (``smoothquant/calibration.py::get_act_scales``) and OmniQuant/DuQuant
(``generate_act_scale_shift.py``) run the FP model over a calibration set with a forward hook on every linear
and keep, per input channel, the running ``max |x|`` (the "act scales") and ``min`` / ``max`` (OmniQuant's
"act shifts" are ``(max + min) / 2``). Which calibration set each method uses is its own (SmoothQuant: 512 x 512,
seed 42; OmniQuant/DuQuant: 128 x 2048, seed 2) and is recorded.

The cache key is the model identity (id, revision, dtype), the tokenizer hash and the sha256 of the exact token
windows, so a different model, tokenizer or calibration set can never reuse an entry. Entries are written
atomically with a checksum beside them; a truncated or altered entry is detected, logged and rebuilt.
"""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from quantbench import models, offload
from quantbench.cache import key_of, load_or_build
from quantbench.data import windows_digest
from quantbench.errors import NumericalError

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised after the last decoder block: the statistics are complete."""


def _key(lm: models.LoadedModel, windows: torch.Tensor) -> str:
    ident = {k: lm.info.get(k) for k in ("id", "revision", "tokenizer_hash")}
    ident["dtype"] = str(next(lm.model.parameters()).dtype)
    ident["windows"] = windows_digest(windows)
    return key_of(ident)


@torch.no_grad()
def collect(lm: models.LoadedModel, windows: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """``{linear name: {"absmax", "min", "max"}}`` (fp32, per input channel) over ``windows``, FP model."""
    stats: dict[str, dict[str, torch.Tensor]] = {}

    last: list = [None, None, None]  # q/k/v (gate/up) read one tensor: its reductions are computed once

    def hook(name):
        def fn(_mod, args, _out):
            if last[0] is args[0]:
                lo, hi = last[1], last[2]
            else:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                if not torch.isfinite(x).all():
                    raise NumericalError(f"activation statistics: the input of {name} has NaN/inf values")
                lo, hi = x.amin(0), x.amax(0)
                last[:] = [args[0], lo, hi]
            s = stats.get(name)
            if s is None:
                stats[name] = {"min": lo.clone(), "max": hi.clone()}  # no entry shares a tensor with another
            else:
                s["min"], s["max"] = torch.minimum(s["min"], lo), torch.maximum(s["max"], hi)

        return fn

    def stop(_mod, _args, _out):
        raise _Stop

    handles = [lin.register_forward_hook(hook(name)) for name, *_, lin in lm.adapter.named_linears()]
    handles.append(lm.adapter.blocks[-1].register_forward_hook(stop))
    try:
        with offload.execution(lm):
            for w in tqdm(windows, desc="activation stats", leave=False):
                try:
                    lm.model(w[None].to(offload.input_device(lm)), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        last.clear()
    for s in stats.values():
        s["absmax"] = torch.maximum(s["min"].abs(), s["max"].abs())
    return {k: {n: t.cpu() for n, t in v.items()} for k, v in stats.items()}


def activation_stats(lm: models.LoadedModel, windows: torch.Tensor, use_cache: bool = True) -> dict:
    """:func:`collect`, through the on-disk cache (``<cache>/act-stats/<key>.pt`` + ``.sha256``)."""
    return load_or_build("act-stats", _key(lm, windows), lambda: collect(lm, windows), "activation stats", use_cache)
