"""Calibrated plans on disk, so a calibrated model is re-evaluated without recalibration, through the
content-keyed cache (``quantbench.cache``: checksummed, atomic, rebuilt if damaged).

An entry holds the plan (per linear: codes, scales, zero points and spec, online transforms, activation spec; per
attention: Q/K/V specs and the Q/K transform; the method's info) and the model tensors of the parts the method
declares it changes (``Method.modifies``: norm fusions, rotations, smoothing). A linear weight that has codes in the
plan is not stored: every backend computes with the dequantized codes and never reads it
(``simulate.FakeQuantLinear``, ``triton_int4.TritonLinear``), so it is restored as those (GPTQ leaves exactly them
there anyway; DuQuant leaves its smoothed FP weight). With codes of at most 4 bits packed two per byte
(``QTensor.state``) an entry stays near the size of the codes: SmolLM2-135M fp32, GPTQ W4A16 54 MB, DuQuant W4A4
60 MB (500 MB with its rotated FP weights), SmoothQuant W8A8 107 MB, QuaRot-GPTQ W4A4 281 MB (rotated embeddings). Restoring onto a freshly loaded model gives the same plan and
model, tensor for tensor but for those weights, and the same outputs (``tests/test_planstore.py``, every
calibrating method).

The key (:func:`calibration_key`) is the run's config hash (model revision + tokenizer hash + scheme + calibration +
options + seed), the device and torch version the calibration ran on, and a digest of quantbench's own source: a
code change never reuses a plan made by older code. ``QUANTBENCH_PLAN_CACHE=0`` (or ``--no-cache``) switches plan
caching off.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from functools import cache
from pathlib import Path

import torch
from torch import nn

from quantbench import cache as store
from quantbench.plan import AttentionPlan, LinearPlan, QuantizedModel, plain_plan
from quantbench.quant import QTensor, QuantSpec
from quantbench.transforms import OnlineTransform

log = logging.getLogger(__name__)
KIND = "plans"
FORMAT = 2  # 2: codes of <= 4 bits packed two per byte


def enabled() -> bool:
    return store.enabled() and os.environ.get("QUANTBENCH_PLAN_CACHE", "1") not in ("", "0")


@cache
def code_digest() -> str:
    """sha256 of every ``.py`` file of the core package and of ``methods/``, in path order; taken when this module
    is imported (with the code it runs), not when first used."""
    core = Path(__file__).resolve().parent
    methods = Path(importlib.util.find_spec("quantbench.methods").submodule_search_locations[0])
    h = hashlib.sha256()
    for d in (core, methods):
        for f in sorted(d.rglob("*.py")):
            h.update(str(f.relative_to(d)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


# ---- (de)serialisation: plain dicts of tensors and numbers, loadable with torch.load(weights_only=True)

def _spec(s: QuantSpec | None):
    return s.to_dict() if s is not None else None


def _unspec(d) -> QuantSpec | None:
    return QuantSpec(**d) if d is not None else None


def _qt(q: QTensor | None):
    return None if q is None else q.state()


def _unqt(d) -> QTensor | None:
    return None if d is None else QTensor.from_state(d)


def to_state(qm: QuantizedModel, modifies) -> dict:
    """The plan + the model tensors of the parts in ``modifies`` (``Method.modifies``, see ``adapters.PARTS``)."""
    linears = {n: {"weight": _qt(p.weight), "pre": [t.state() for t in p.pre], "act": _spec(p.act)}
               for n, p in qm.linears.items()}
    attention = {i: {"q": _spec(a.q), "k": _spec(a.k), "v": _spec(a.v),
                     "qk_pre": a.qk_pre.state() if a.qk_pre is not None else None} for i, a in qm.attention.items()}
    tensors, from_codes = {}, []
    sd = qm.model.state_dict()
    for k in qm.adapter.tensor_names(modifies):
        plan = qm.linears.get(k.removesuffix(".weight"))
        if plan is not None and plan.weight is not None:
            from_codes.append(k)
        else:
            tensors[k] = sd[k].detach()
    return {"format": FORMAT, "scheme": qm.scheme.name, "info": qm.info, "linears": linears, "attention": attention,
            "tensors": tensors, "from_codes": from_codes}


def _assign(model: nn.Module, key: str, value: torch.Tensor, shared: dict) -> None:
    """Replace parameter/buffer ``key`` by ``value`` (a new Parameter, so a tie the method broke stays broken;
    keys whose stored tensors share storage get one Parameter, so a tie the method kept stays kept)."""
    owner_name, _, attr = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    value = value.to(old.device)
    if attr in owner._parameters:
        ptr = value.untyped_storage().data_ptr()
        if ptr not in shared:
            shared[ptr] = nn.Parameter(value, requires_grad=old.requires_grad)
        owner._parameters[attr] = shared[ptr]
    else:
        owner._buffers[attr] = value


def restore(qm: QuantizedModel, state: dict) -> QuantizedModel:
    """Apply ``state`` (:func:`to_state`) to ``qm``, a plain plan over a freshly loaded model; returns it."""
    if state.get("format") != FORMAT or state["scheme"] != qm.scheme.name:
        raise ValueError("cached plan has another format or scheme")
    sd = qm.model.state_dict()
    for k in [*state["tensors"], *state["from_codes"]]:  # check everything before changing anything
        want = state["tensors"][k].shape if k in state["tensors"] else sd.get(k, torch.empty(0)).shape
        if k not in sd or sd[k].shape != want:
            raise ValueError(f"model tensor {k} is missing or has another shape")
    if set(state["linears"]) != set(qm.linears) or set(state["attention"]) != set(qm.attention):
        raise ValueError("the plan's layers do not match the model's")
    if any(state["linears"].get(k.removesuffix(".weight"), {}).get("weight") is None for k in state["from_codes"]):
        raise ValueError("a weight restored from its codes has no codes")
    for n, d in state["linears"].items():
        if d["weight"] is not None and list(d["weight"]["shape"]) != list(sd[n + ".weight"].shape):
            raise ValueError(f"{n}: the plan's weight has another shape than the model's")
    for n, d in state["linears"].items():
        qm.linears[n] = LinearPlan(_unqt(d["weight"]), [OnlineTransform.from_state(t) for t in d["pre"]],
                                   _unspec(d["act"]))
    for i, d in state["attention"].items():
        qm.attention[i] = AttentionPlan(_unspec(d["q"]), _unspec(d["k"]), _unspec(d["v"]),
                                        OnlineTransform.from_state(d["qk_pre"]) if d["qk_pre"] else None)
    shared: dict = {}
    with torch.no_grad():
        for k, t in state["tensors"].items():
            _assign(qm.model, k, t, shared)
        for k in state["from_codes"]:
            ref = qm.model.get_parameter(k)
            _assign(qm.model, k, qm.linears[k.removesuffix(".weight")].weight.dequantize(ref.dtype), shared)
    qm.info = state["info"]
    return qm


def calibration_key(run_id: str, device) -> str:
    """What a calibration result depends on: the run's config hash, the device, torch and quantbench's code. Names
    the cached plan and the per-block checkpoints (``layerwise.run_blocks``)."""
    return store.key_of({"run": run_id, "device": str(device), "torch": torch.__version__, "code": code_digest()})


def quantize(method, lm, scheme, calib, key: str | None = None) -> tuple[QuantizedModel, str]:
    """``method.quantize(lm, scheme, calib, key)``, or its plan from the cache (``key``: :func:`calibration_key`);
    returns the plan and where it came from: "built" (a method without calibration: never cached, rebuilt in
    seconds), "calibrated", or "cache:<key>"."""
    if not method.needs_calibration:
        return method.quantize(lm, scheme, calib), "built"
    if not enabled() or key is None:
        return method.quantize(lm, scheme, calib, key=key), "calibrated"
    state = store.load(KIND, key, "calibrated plan")
    if state is not None:
        undo = method.restructure(lm)  # the module structure the plan was made on
        try:
            return restore(plain_plan(lm, scheme), state), f"cache:{key}"
        except (ValueError, KeyError, TypeError) as e:  # checked before the model is touched: recalibrate
            undo()
            log.warning("cached plan %s does not apply (%s); recalibrating", key, e)
    qm = method.quantize(lm, scheme, calib, key=key)
    store.save(KIND, key, to_state(qm, method.modifies))
    return qm, "calibrated"


code_digest()  # now: a file edited while a run goes on must not lend its digest to the old code's plans
