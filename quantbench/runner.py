"""One benchmark run: load -> quantize (method) -> realize (backend) -> evaluate (tasks) -> result records."""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from quantbench import models, offload, planstore
from quantbench.data import Calibration, windows_digest
from quantbench.errors import NumericalError, UnavailableError
from quantbench.method import Method
from quantbench.pipeline import resolve
from quantbench.plugins import load_plugins
from quantbench.quant import QuantScheme, override_specs, parse_scheme
from quantbench.registry import BACKENDS
from quantbench.results import SCHEMA, ResultStore, config_hash, device_info, now, peak_memory_mb, versions
from quantbench.tasks import Task
from quantbench.validate import check_run

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class RunConfig:
    method: str
    model: str
    scheme: str = "w16a16"
    backend: str = "fake_quant"
    seed: int = 0
    dtype: str = "auto"  # auto: float32 on CPU (no fast half math there), float16 on GPU (the papers' dtype)
    device: str = "cpu"
    # corpus / nsamples / seqlen / seed; what is missing or None comes from the method's reference recipe
    calibration: dict = field(default_factory=dict)  # unset keys: the method's recipe (Method.calib_defaults)
    quantizers: dict = field(default_factory=dict)  # per tensor (w/a/q/k/v) QuantSpec overrides, e.g. {"w": {"grid": "minmax"}}
    options: dict = field(default_factory=dict)  # method options, e.g. {"rotate_mode": "random", "act_order": True}
    offload: bool = False  # keep the model in CPU memory, visiting `device` block by block (quantbench.offload)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.float16
        return DTYPES[self.dtype]


def calibration_config(method, given: dict) -> dict:
    """The user's calibration settings over the method's reference recipe (``Method.calib_defaults``)."""
    return {"corpus": "austen", **method.calib_defaults, **{k: v for k, v in given.items() if v is not None}}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class RunOutcome:
    records: list[dict] = field(default_factory=list)  # written this time
    unavailable: dict[str, str] = field(default_factory=dict)  # task -> why its data could not be had
    already_done: list[str] = field(default_factory=list)  # tasks skipped by resume


def resolve_config(cfg: RunConfig) -> tuple[Method, QuantScheme]:
    """The configuration's method (built with its options) and parsed scheme; raises ConfigError on bad input.
    Build once per configuration: the bench resolves every case up front and hands the result to :func:`run`."""
    load_plugins()
    method = resolve(cfg.method)(seed=cfg.seed, device=cfg.device, **cfg.options)
    BACKENDS.get(cfg.backend)
    scheme = parse_scheme(cfg.scheme, override_specs(method.specs(), cfg.quantizers))
    return method, scheme


def run_identity(cfg: RunConfig, method: Method, scheme: QuantScheme, lm, calib) -> tuple[dict, str]:
    """(what determines the plan's values, its hash = the run id): method, backend, seed, dtype, model content,
    scheme, calibration, method options. Task and metric are added per record."""
    base = {
        "method": cfg.method, "backend": cfg.backend, "seed": cfg.seed, "dtype": str(cfg.torch_dtype)[6:],
        "model": {k: lm.info[k] for k in ("name", "id", "revision", "tokenizer_hash")},
        "scheme": scheme.to_dict(), "calibration": calib.config() if calib else None,
    }
    opts = method.identity_options()
    if opts:  # only methods with options carry the key, so option-less configs keep their hashes
        base["method_options"] = opts
    return base, config_hash(base)


def run(cfg: RunConfig, tasks: list[Task], store: ResultStore, resume: bool = False,
        resolved: tuple[Method, QuantScheme] | None = None) -> RunOutcome:
    """Run one (method, model, scheme, backend) configuration on ``tasks`` and write their records.

    Task data is prepared before quantizing, so an unavailable dataset costs no calibration; such tasks are
    reported in the outcome, the others still run. With ``resume``, tasks whose records already exist are not
    evaluated again (and if none is left, the model is not quantized). ``resolved``: :func:`resolve_config`'s
    result when the caller already has it.
    """
    method, scheme = resolved or resolve_config(cfg)
    check_run(method, scheme, model=cfg.model, device=cfg.device, backend=cfg.backend,
              calibration=calibration_config(method, cfg.calibration) if method.needs_calibration else None,
              tasks=tasks)
    backend = BACKENDS.get(cfg.backend)
    if scheme.a is None and scheme.w is not None and not method.weight_only:
        log.info("%s %s: weight-only is outside %s's reference scope (it exists to quantize activations); running "
                 "it as asked", cfg.method, scheme.name, cfg.method)
    seed_everything(cfg.seed)
    lm = models.load(cfg.model, cfg.torch_dtype, "cpu" if cfg.offload else cfg.device, seed=cfg.seed)
    if cfg.offload:
        lm.exec_device = cfg.device
    calib = Calibration(lm.tokenizer, **calibration_config(method, cfg.calibration), lm=lm) \
        if method.needs_calibration else None
    base, run_id = run_identity(cfg, method, scheme, lm, calib)
    out = RunOutcome()
    todo = []
    for task in tasks:
        if resume and _done(store, base, task):
            out.already_done.append(task.name)
            continue
        try:
            task.prepare(lm.tokenizer)
            todo.append(task)
        except UnavailableError as e:
            log.warning("%s: %s", task.name, e)
            out.unavailable[task.name] = str(e)
    if not todo:
        return out
    log.info("%s: %s %s on %s (backend %s)", cfg.model, cfg.method, scheme.name, cfg.device, cfg.backend)
    if calib is not None:
        calib.windows  # noqa: B018 - build (or fail on unavailable data) before any quantization work
    t0 = time.perf_counter()
    key = planstore.calibration_key(run_id, cfg.device)  # names the cached plan and the block checkpoints
    qm, plan_source = planstore.quantize(method, lm, scheme, calib, key)
    module = backend(qm)
    quant_s = time.perf_counter() - t0
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # run-level provenance, once (versions() shells out to git)
    shared = {
        # an imported checkpoint joins the section of the model it was made from (``load``'s ``base``)
        "run_id": run_id, "method": cfg.method, "model": qm.info.get("base_model") or cfg.model,
        "model_id": lm.info["id"],
        "model_revision": lm.info["revision"], "model_notes": lm.info["notes"],
        **({"model_source_revision": lm.info["source_revision"]} if "source_revision" in lm.info else {}),
        "tokenizer_hash": lm.info["tokenizer_hash"], "tokenizer_class": lm.info["tokenizer_class"],
        "scheme": scheme.name, "scheme_spec": scheme.to_dict(), "backend": cfg.backend, "dtype": base["dtype"],
        "seed": cfg.seed, "seeds": {"python": cfg.seed, "numpy": cfg.seed, "torch": cfg.seed,
                                    "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()},
        "method_options": method.opts, "calibration": {**base["calibration"], "windows_sha256": windows_digest(calib.windows)}
        if calib else None, "method_info": qm.info, "versions": versions(), "device": device_info(cfg.device),
        "quant_wall_s": round(quant_s, 3), "plan_source": plan_source, "offload": cfg.offload,
    }
    with offload.dispatched(module, cfg.device) if cfg.offload else contextlib.nullcontext():  # --offload
        for task in todo:
            t1 = time.perf_counter()
            metrics = task.evaluate(module, lm.tokenizer)
            wall = time.perf_counter() - t1
            peak, peak_kind = peak_memory_mb(cfg.device)
            for metric, value in metrics.items():
                if not math.isfinite(value):
                    raise NumericalError(f"{task.name} {metric} is {value} for {cfg.method} {scheme.name}")
                full = {**base, "task": task.config, "metric": metric}
                rec = {
                    **shared, "schema": SCHEMA, "config_hash": config_hash(full), "task": task.name,
                    "task_config": task.config, "task_options": task.run_options, "metric": metric, "value": value,
                    "interval": task.intervals.get(metric), **({"items": task.items[metric]} if metric in task.items
                                                               else {}),
                    "protocol": task.protocol, "wall_s": round(wall, 3), "peak_mem_mb": round(peak, 1),
                    "peak_mem_kind": peak_kind, "created": now(),
                }
                store.write(rec)
                out.records.append(rec)
                log.info("%s %s %s %s %s = %.4f (%.1fs)", cfg.model, cfg.method, scheme.name, task.protocol, metric,
                         value, wall)
    return out


def _done(store: ResultStore, base: dict, task: Task) -> bool:
    return bool(task.metrics) and all(
        store.has(config_hash({**base, "task": task.config, "metric": m}), m) for m in task.metrics)

