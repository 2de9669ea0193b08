"""Models larger than the accelerator: the model lives in CPU memory and only visits the device.

* Block-wise calibration (GPTQ, OmniQuant, DuQuant, norm-tweaking) streams one decoder block at a time through the
  device: the layer-wise runner already moves each block there and back (``quantbench.layerwise``).
* Passes over the whole model (activation statistics, self-generated calibration text, evaluation) run under
  :func:`dispatched`: accelerate's big-model inference, ``dispatch_model`` over ``infer_auto_device_map`` (as many
  decoder blocks resident on the device as fit in ``max_memory``, the others kept in CPU memory, or on disk, and
  moved in for their forward). Leaving the context removes the hooks and puts every weight back in CPU memory.

The arithmetic is the resident model's: only where weights wait between uses differs (tests/test_offload.py: equal
logits and equal records with blocks offloaded to disk).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections import Counter

import torch
from torch import nn

from quantbench.cache import cache_dir
from quantbench.errors import ConfigError

log = logging.getLogger(__name__)


def max_memory_from_env() -> dict | None:
    """``QUANTBENCH_OFFLOAD_MAX_MEMORY="0=70GiB,cpu=200GiB"`` -> accelerate's ``max_memory`` (default: its own,
    90% of what is free on each device)."""
    text = os.environ.get("QUANTBENCH_OFFLOAD_MAX_MEMORY", "").strip()
    if not text:
        return None
    out = {}
    for part in text.split(","):
        dev, _, size = part.partition("=")
        if not size:
            raise ConfigError(f"QUANTBENCH_OFFLOAD_MAX_MEMORY: {part!r} is not DEVICE=SIZE (e.g. 0=70GiB,cpu=200GiB)")
        size = size.strip()
        out[int(dev) if dev.strip().isdigit() else dev.strip()] = int(size) if size.isdigit() else size
    return out


@contextlib.contextmanager
def dispatched(model: nn.Module, device: str, max_memory: dict | None = None, offload_dir: str | None = None):
    """Run ``model`` (in CPU memory) on ``device`` through accelerate's automatic device map; see the module doc."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_submodules

    max_memory = max_memory if max_memory is not None else max_memory_from_env()
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
    if set(device_map.values()) <= {"disk"}:
        raise ConfigError(f"offload: not even the embeddings fit on {device} or in CPU memory within max_memory "
                          f"{max_memory}; raise QUANTBENCH_OFFLOAD_MAX_MEMORY")
    if "disk" in device_map.values() and offload_dir is None:
        offload_dir = str(cache_dir() / "offload" / f"pid{os.getpid()}")
    log.info("offload: %s on %s", dict(Counter(str(d) for d in device_map.values())), device)
    main = torch.device(device)
    dispatch_model(model, device_map, main_device=main if main.type != "cpu" else "cpu", offload_dir=offload_dir)
    try:
        if next(model.parameters()).device.type == "meta":
            raise ConfigError(f"offload: not even the embeddings fit on {device} within max_memory {max_memory}; "
                              "raise QUANTBENCH_OFFLOAD_MAX_MEMORY")
        yield model
    finally:
        remove_hook_from_submodules(model)
        model.to("cpu")
        if hasattr(model, "hf_device_map"):
            del model.hf_device_map
        if offload_dir is not None and os.path.basename(offload_dir).startswith("pid"):
            shutil.rmtree(offload_dir, ignore_errors=True)


def execution(lm) -> contextlib.AbstractContextManager:
    """:func:`dispatched` for a model loaded with offloading (``LoadedModel.exec_device`` set), else nothing."""
    return dispatched(lm.model, lm.exec_device) if lm.exec_device else contextlib.nullcontext(lm.model)


def input_device(lm) -> torch.device:
    """Where a whole-model pass's input ids go: the execution device when offloaded, else the model's."""
    return torch.device(lm.exec_device) if lm.exec_device else lm.model.device
