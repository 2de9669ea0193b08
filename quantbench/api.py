"""The Python API: quantize a model, run it, evaluate it, read results.

    import quantbench
    qm = quantbench.quantize("smollm2-135m", "gptq", "w4a16", calibration={"nsamples": 4, "seqlen": 512})
    model = qm.realize()                                   # an HF model: generate(), forward, ...
    quantbench.evaluate(qm, "ppl-austen", seqlen=512, ppl_windows=4)   # {"ppl-austen": {"ppl": ...}}
    quantbench.load_results("reports/results")             # pandas.DataFrame, one row per record

The same path as ``quantbench run`` (:mod:`quantbench.runner`): options and shapes are validated before any work,
calibrated plans go through the content-keyed cache (:mod:`quantbench.planstore`), and every function accepts an
already-loaded ``transformers`` model where it accepts a model name.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantbench import export, models, planstore, validate
from quantbench.data import Calibration
from quantbench.errors import ConfigError
from quantbench.adapters import adapter_for
from quantbench.models import LoadedModel
from quantbench.pipeline import resolve
from quantbench.plan import QuantizedModel as Plan
from quantbench.plugins import load_plugins
from quantbench.quant import override_specs, parse_scheme
from quantbench.registry import BACKENDS
from quantbench.results import ResultStore, versions
from quantbench.runner import RunConfig, calibration_config, run_identity, seed_everything
from quantbench.tasks import expand, make_task

log = logging.getLogger(__name__)
CALIBRATION_KEYS = ("corpus", "nsamples", "seqlen", "seed")
# load_results' first columns: what a user filters and compares on; the rest of each record follows, nested
FIRST_COLUMNS = ("model", "method", "scheme", "task", "metric", "value", "protocol", "backend", "config_hash",
                 "calibration", "seed", "revision", "device", "created")


@dataclass
class QuantizedModel:
    """A quantized model: the plan (:class:`quantbench.plan.QuantizedModel`: the FP model with its transforms
    folded, integer codes and scales per linear, attention quantizers), its tokenizer and its provenance
    (``info``: method, scheme, calibration, config hash, model revision, where the plan came from)."""

    plan: Plan
    tokenizer: object
    info: dict = field(default_factory=dict)
    _realized: tuple[str, nn.Module] | None = field(default=None, repr=False)

    def realize(self, backend: str = "fake_quant") -> nn.Module:
        """The model as ``backend`` runs the plan: an HF model (``generate``, forward). The FP modules are swapped
        in place, so a plan is realized once; asking again for the same backend returns the same module."""
        if self._realized is not None:
            if self._realized[0] != backend:
                raise ConfigError(f"this model is already realized with backend {self._realized[0]!r}; quantize "
                                  f"again to run it with {backend!r}")
            return self._realized[1]
        load_plugins()
        module = BACKENDS.get(backend)(self.plan)
        self._realized = (backend, module)
        return module

    def save_pretrained(self, path, format: str = "compressed-tensors", *, allow_activation_grid: bool = False,
                        overwrite: bool = False) -> Path:
        """Write the model as a checkpoint that transformers and vLLM load (:mod:`quantbench.export`): the plan's
        codes and scales packed as they are, activation args, tokenizer, config, and this model's provenance. What
        the format cannot express is refused before anything is written, naming the layer and why."""
        prov = export.provenance(self.info, self.plan, versions())
        return export.save(self.plan, self.tokenizer, prov, path, format,
                           allow_activation_grid=allow_activation_grid, overwrite=overwrite)


def _device_of(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return str(p.device) if p is not None else "cpu"


def _target(model, device: str | None) -> tuple[str, object, str]:
    """(name, geometry, device) of a model name or an nn.Module, without loading weights: what is validated first."""
    if isinstance(model, str):
        device = validate.check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        models.check_available(model)
        return model, models.geometry_of(model), device
    if isinstance(model, nn.Module):
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        return name, adapter_for(model), _device_of(model)
    raise ConfigError(f"model must be a name, a path or a transformers model, not {type(model).__name__}")


def _loaded(model, tokenizer, dtype: str, device: str, seed: int) -> LoadedModel:
    """The model loaded (a name: zoo alias, HF id, local dir, built-in) or wrapped where it is (an nn.Module)."""
    if isinstance(model, nn.Module):
        return models.wrap(model, tokenizer)
    lm = models.load(model, RunConfig("fp16", model, dtype=dtype, device=device).torch_dtype, device, seed=seed)
    if tokenizer is not None:
        lm.tokenizer = tokenizer
    return lm


def quantize(model, method: str, scheme: str = "headline", *, tokenizer=None, calibration: dict | None = None,
             device: str | None = None, dtype: str = "auto", seed: int = 0, quantizers: dict | None = None,
             **options) -> QuantizedModel:
    """Quantize ``model`` (an HF id, zoo alias, local path, built-in name, or a loaded ``transformers`` model:
    quantized in place) with ``method`` (a registered name or an ``a+b+c`` pipeline) at ``scheme`` (``w4a4``,
    ``w4a16g128``, ...; ``headline``: the method's own). ``calibration``: ``corpus``, ``nsamples``, ``seqlen``,
    ``seed`` (unset keys: the method's reference recipe); ``quantizers``: grid/clip overrides per tensor, as
    ``--wgrid/--agrid/--aclip`` (``{"a": {"grid": "sym_ct"}}``); ``options``: the method's options
    (``percdamp=0.1``)."""
    load_plugins()
    calibration = dict(calibration or {})
    unknown = sorted(set(calibration) - set(CALIBRATION_KEYS))
    if unknown:
        raise ConfigError(f"calibration has no key {', '.join(unknown)}; its keys: {', '.join(CALIBRATION_KEYS)}")
    cls = resolve(method)
    text = cls.headline_for(model) if scheme == "headline" else scheme
    name, geo, device = _target(model, device)
    m = cls(seed=seed, device=device, **options)  # options, scheme, shapes: all checked before the model loads
    quantizers = dict(quantizers or {})
    sch = parse_scheme("w16a16" if not cls.quantizes else text, override_specs(m.specs(), quantizers))
    merged = calibration_config(m, calibration) if m.needs_calibration else None
    validate.check_run(m, sch, model=name, device=device, backend="fake_quant", calibration=merged, geometry=geo)
    if m.needs_calibration and tokenizer is None and isinstance(model, nn.Module):
        raise ConfigError(f"{method} calibrates on text: pass tokenizer= with the model")
    lm = _loaded(model, tokenizer, dtype, device, seed)
    seed_everything(seed)
    calib = Calibration(lm.tokenizer, **merged, lm=lm) if merged else None
    cfg = RunConfig(cls.name, lm.info["name"], sch.name, "fake_quant", seed, dtype, device, calibration, quantizers,
                    options)
    base, run_id = run_identity(cfg, m, sch, lm, calib)
    plan, source = planstore.quantize(m, lm, sch, calib, planstore.calibration_key(run_id, device))
    info = {"method": cls.name, "scheme": sch.name, "config_hash": run_id, "plan_source": source,
            "model": base["model"], "calibration": base["calibration"], "method_options": m.opts,
            "method_info": plan.info}
    return QuantizedModel(plan, lm.tokenizer, info)


def _record(source, results_dir) -> dict:
    """A result record from a file, or from a config hash (prefix) in ``results_dir``."""
    import json

    p = Path(source)
    if p.suffix == ".json":
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the record {source} ({getattr(e, 'strerror', None) or e})") from None
    else:
        found = [r for r in ResultStore(results_dir, sweep=False).records() if r["config_hash"].startswith(source)
                 or r.get("run_id", "").startswith(source)] if Path(results_dir).is_dir() else []
        runs = {r.get("run_id") for r in found}
        if len(runs) != 1:
            raise ConfigError(f"{'no' if not runs else 'more than one'} run in {results_dir} matches {source!r}: "
                              f"pass a record file or a longer hash")
        rec = found[0]
    missing = [k for k in ("method", "model", "scheme", "run_id", "scheme_spec") if k not in rec]
    if missing:
        raise ConfigError(f"{source} is not a result record (it lacks {', '.join(missing)})")
    return rec


def from_record(source, *, results_dir="reports/results", device: str = "cpu") -> QuantizedModel:
    """The quantized model a result record measured (a record file, or a config hash in ``results_dir``): its
    method, scheme, grids, calibration, seed and options, the plan from the cache when the run left it there. The
    result must reproduce the record's run id, or this is an error (the code or the model changed since)."""
    rec = source if isinstance(source, dict) else _record(source, results_dir)
    load_plugins()
    cls = resolve(rec["method"])
    m = cls(**{k: v for k, v in (rec.get("method_options") or {}).items() if k in cls.options})
    default = parse_scheme(rec["scheme"], m.specs()).to_dict() if cls.quantizes else {}
    quantizers = {}
    for t, spec in (rec["scheme_spec"] or {}).items():
        if t == "name" or not spec or not default.get(t):
            continue
        diff = {k: spec[k] for k in ("grid", "clip_ratio") if spec[k] != default[t][k]}
        if diff:
            quantizers[t] = diff
    calib = rec.get("calibration")
    calibration = {k: calib[k] for k in CALIBRATION_KEYS if k in calib} if calib else None
    qm = quantize(rec["model"], rec["method"], rec["scheme"], calibration=calibration, device=device,
                  dtype=rec.get("dtype", "auto"), seed=rec.get("seed", 0), quantizers=quantizers,
                  **(rec.get("method_options") or {}))
    if qm.info["config_hash"] != rec["run_id"]:
        raise ConfigError(f"the record's configuration no longer reproduces its run (run id {rec['run_id']}, now "
                          f"{qm.info['config_hash']}): the model or the code changed since; run it again and "
                          f"export the new record")
    qm.info["record"] = {k: rec.get(k) for k in ("config_hash", "task", "metric", "value", "protocol", "created")}
    return qm


def evaluate(model, tasks, *, tokenizer=None, seqlen: int = 2048, ppl_windows: int | None = None,
             device: str | None = None, intervals: bool = False, **task_options) -> dict[str, dict]:
    """Evaluate ``model`` (a :class:`QuantizedModel`, realized with the fake-quant backend unless it already is; a
    loaded ``transformers`` model; or a model name, loaded in FP) on ``tasks`` (a name, a group, or a list of them:
    ``ppl-austen``, ``local``, ``mmlu-local-5shot``, ...) -> ``{task: {metric: value}}``. ``seqlen``/``ppl_windows``:
    the perplexity window length and an optional cap on windows; ``task_options``: ``batch_size``, ``limit``,
    ``add_bos``, ``variant`` (c4), ``longbench_max_length``, ``passkey_lengths``. With ``intervals``, each metric is
    ``{"value", "stderr", "ci95", "method", "n"}`` (``quantbench.uncertainty``), as the records hold it."""
    load_plugins()
    names = expand([tasks] if isinstance(tasks, str) else list(tasks))
    built = [make_task(t, seqlen=seqlen, max_windows=ppl_windows or 0, **task_options) for t in names]
    target = None if isinstance(model, QuantizedModel) else _target(model, device)
    context = model.plan.adapter.context if target is None else target[1].context
    for task in built:  # before anything loads
        s = task.config.get("seqlen")
        if s and context and s > context:
            raise ConfigError(f"{task.name}: seqlen {s} is longer than the model's context of {context} tokens")
    if isinstance(model, QuantizedModel):
        module, tok = model.realize() if model._realized is None else model._realized[1], tokenizer or model.tokenizer
    else:
        lm = _loaded(model, tokenizer, "auto", target[2], 0)
        module, tok = lm.model, lm.tokenizer
    if tok is None:
        raise ConfigError("evaluation reads text: pass tokenizer= with the model")
    out = {}
    for task in built:
        task.prepare(tok)
        with torch.no_grad():
            values = task.evaluate(module, tok)
        out[task.name] = {m: {"value": v, **(task.intervals.get(m) or {})} for m, v in values.items()} if intervals \
            else values
    return out


def load_results(path) -> "pandas.DataFrame":  # noqa: F821 - pandas is imported here, not at start-up
    """The records of a results directory as a DataFrame: one row per record, :data:`FIRST_COLUMNS` first
    (``calibration`` as ``corpus NxL sS``, ``revision`` = the quantbench code revision, ``device`` = its name),
    then every other field of the record as it is (nested dicts stay dicts)."""
    import pandas as pd

    if not Path(path).is_dir():
        raise ConfigError(f"no results directory {path}: pass the --results-dir a run wrote into")
    rows = []
    for r in ResultStore(path, sweep=False).records():
        c = r.get("calibration")
        first = {"calibration": f"{c['corpus']} {c['nsamples']}x{c['seqlen']} s{c['seed']}" if c else None,
                 "revision": (r.get("versions") or {}).get("quantbench"),
                 "device": (r.get("device") or {}).get("name")}
        rows.append({**{k: first.get(k, r.get(k)) for k in FIRST_COLUMNS},
                     **{k: v for k, v in r.items() if k not in FIRST_COLUMNS}})
    return pd.DataFrame(rows, columns=None if rows else list(FIRST_COLUMNS))
