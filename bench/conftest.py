"""pytest driver for benchmark runs:

    pytest bench/ --method duquant --model mistral-7b --wbits 4 --abits 4 --tasks ppl-wikitext2,ppl-c4

Every (method, scheme) pair is one test case; each writes result records into --results-dir, and the session
ends with the markdown leaderboard of that directory (also written to --leaderboard when given).
Bad requests (unknown method/model/task, impossible bits) stop the session with a one-line usage error.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pytest
import torch

from quantbench import models, validate
from quantbench.data import C4_VARIANTS
from quantbench.errors import QuantbenchError
from quantbench.method import Method
from quantbench.pipeline import resolve
from quantbench.plugins import load_plugins
from quantbench.quant import QuantScheme, override_specs, parse_scheme
from quantbench.reports.leaderboard import render
from quantbench.results import ResultStore
from quantbench.registry import BACKENDS
from quantbench.runner import DTYPES, RunConfig, calibration_config
from quantbench.tasks import Task, expand, make_task


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def pytest_addoption(parser):
    g = parser.getgroup("quantbench", "quantbench benchmark runs")
    add = g.addoption
    add("--method", default="fp16,rtn", help="comma list of registered methods (default: fp16,rtn)")
    add("--model", default="smollm2-135m", help="zoo alias, HF id, local dir or built-in (default: smollm2-135m)")
    add("--wbits", default="4", help="comma list of weight bits (16 = FP)")
    add("--abits", default="16", help="comma list of activation bits (16 = FP)")
    add("--kvbits", default="16", help="comma list of K/V bits (16 = FP)")
    add("--group", type=int, default=0, help="weight group size (0 = per channel)")
    add("--scheme", default=None, help="comma list of scheme strings (w4a4kv4, w4a16g128, ...); overrides the bit options")
    add("--wgrid", default=None, help="weight grid: sym, sym_pm, asym, minmax, minmax_sym (default: the method's)")
    add("--agrid", default=None, help="activation grid (default: the method's)")
    add("--kvgrid", default=None, help="K/V grid (default: the method's)")
    add("--aclip", type=float, default=None, help="activation clip ratio in (0, 1] (default: the method's)")
    add("--kvclip", type=float, default=None, help="K/V clip ratio in (0, 1] (default: the method's)")
    add("--rotate-mode", default=None, help="QuaRot residual rotation: hadamard (randomized, default) or random")
    add("--method-opt", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
        help="method options (e.g. act_order=true,percdamp=0.1,w_clip=true,clips=paper); each goes to the "
             "selected methods that have it")
    add("--tasks", default="ppl-austen", help="comma list of tasks and groups: ppl-austen, ppl-wikitext2, ppl-c4, "
        "rolling-austen, qa-<piqa|arc_easy|arc_challenge|boolq|hellaswag|winogrande|lambada_openai|local>, "
        "mmlu-<k>shot, mmlu-local-<k>shot, longbench-<task|local>; groups: ppl, qa, qa6, mmlu, mmlu-local, "
        "longbench, local (every shipped offline task)")
    add("--limit", type=int, default=0, help="lm-eval tasks: evaluate only the first N documents of each lm-eval (sub)task (0 = all; in the protocol)")
    add("--add-bos", action="store_true", help="lm-eval tasks: prepend BOS (default off: lm-eval's and DuQuant's "
        "add_special_tokens=False; recorded)")
    add("--longbench-max-length", type=int, default=3500, help="LongBench middle truncation of prompts, in tokens "
        "(DuQuant: 3500 for Vicuna; capped by the model's context)")
    add("--passkey-lengths", default="512,1024,2048", help="longbench-local: passkey prompt lengths in tokens")
    add("--speed", action="store_true", help="also run the speed benchmarks (tests marked speed; pytest-benchmark)")
    add("--backend", default="fake_quant", help="backend that runs the plan: fake_quant (exact simulation, default) "
        "or triton (INT4 kernels; the Triton interpreter on a CPU machine: exact and slow)")
    add("--seed", type=int, default=0, help="seed for python/numpy/torch and random models")
    add("--seqlen", type=int, default=2048, help="perplexity window length (GPTQ protocol: 2048)")
    add("--ppl-windows", type=int, default=None, help="evaluate only the first N >= 1 windows (default: all; N is "
        "recorded in the protocol label as firstNwindows)")
    add("--c4-variant", default="duquant-seed20", help="c4 subset: duquant-seed20, omniquant-seed0, quarot-first1100")
    add("--batch-size", type=int, default=1, help="evaluation batch size (results are batch-size independent)")
    add("--dtype", default="auto", choices=["auto", *DTYPES], help="model dtype (auto: fp32 on CPU, fp16 on GPU)")
    add("--device", default=None, help="cpu or cuda[:i] (default: cuda if available)")
    add("--calib", default=None, help="calibration corpus: austen, wikitext2, c4, generated (by the model itself; "
        "default: the method's, austen for all but norm-tweaking)")
    add("--nsamples", type=int, default=None, help="calibration windows (default: the method's reference recipe, "
        "e.g. GPTQ/QuaRot/OmniQuant 128, SmoothQuant 512)")
    add("--calib-seqlen", type=int, default=None, help="calibration window length (default: the method's, 2048 or 512)")
    add("--calib-seed", type=int, default=None, help="calibration sampling seed (default: the method's: QuaRot/GPTQ 0, "
        "DuQuant/OmniQuant 2, SmoothQuant 42)")
    add("--results-dir", default="results", help="where result records are written (one JSON per metric)")
    add("--leaderboard", default=None, help="also write the markdown leaderboard of --results-dir to this file")
    add("--resume", action="store_true", help="skip cases whose results already exist in --results-dir")
    add("--no-cache", action="store_true", help="rebuild every cached artefact (calibration windows, activation "
        "statistics, generated calibration, calibrated plans) and store nothing ($QUANTBENCH_NO_CACHE=1)")
    add("--offload", action="store_true", help="models larger than the device: keep the model in CPU memory; "
        "calibration streams one block at a time through --device, whole-model passes and evaluation run through "
        "accelerate's automatic device map ($QUANTBENCH_OFFLOAD_MAX_MEMORY, e.g. 0=70GiB,cpu=400GiB)")


@dataclass
class Case:
    cfg: RunConfig
    tasks: list[Task]
    resolved: tuple[Method, QuantScheme]  # the method built and the scheme parsed once, at validation

    @property
    def id(self) -> str:
        return f"{self.cfg.method}-{self.cfg.scheme}"


def _schemes(opt) -> list[str]:
    if opt.scheme:
        return _csv(opt.scheme)
    g = f"g{opt.group}" if opt.group else ""
    return [f"w{w}a{a}" + (f"kv{kv}" if kv != "16" else "") + g
            for w in _csv(opt.wbits) for a in _csv(opt.abits) for kv in _csv(opt.kvbits)]


def _quantizer_overrides(opt) -> dict:
    out: dict[str, dict] = {}
    for tensors, key, value in (("w", "grid", opt.wgrid), ("a", "grid", opt.agrid), ("kv", "grid", opt.kvgrid),
                                ("a", "clip_ratio", opt.aclip), ("kv", "clip_ratio", opt.kvclip)):
        if value is not None:
            for t in tensors:
                out.setdefault(t, {})[key] = value
    return out


def _method_options(opt, methods: list) -> dict[str, dict]:
    """Per method, the --method-opt / --rotate-mode settings it accepts; an option no selected method has is an error."""
    given: dict[str, str] = {}
    for item in opt.method_opt:
        for kv in _csv(item):
            key, sep, value = kv.partition("=")
            if not sep or not key.strip():
                raise QuantbenchError(f"--method-opt expects KEY=VALUE, got {kv!r}")
            given[key.strip()] = value.strip()
    if opt.rotate_mode is not None:
        given["rotate_mode"] = opt.rotate_mode
    unused = [k for k in given if not any(k in m.options for m in methods)]
    if unused:
        known = sorted({k for m in methods for k in m.options})
        raise QuantbenchError(f"no selected method has option {', '.join(unused)}; their options: "
                              f"{', '.join(known) or 'none'}")
    return {m.name: {k: v for k, v in given.items() if k in m.options} for m in methods}


def _check_options(opt) -> list[int]:
    """Options checked whether or not the requested tasks read them (a bad value is never silently ignored);
    returns the passkey lengths."""
    try:
        passkey = [int(x) for x in _csv(opt.passkey_lengths)]
    except ValueError:
        raise QuantbenchError(f"--passkey-lengths expects integers, got {opt.passkey_lengths!r}") from None
    for flag, value, low in (("--seqlen", opt.seqlen, 2), ("--ppl-windows", opt.ppl_windows, 1),
                             ("--batch-size", opt.batch_size, 1), ("--limit", opt.limit, 0),
                             ("--longbench-max-length", opt.longbench_max_length, 16),
                             *(("--passkey-lengths", n, 1) for n in passkey)):
        if value is not None and value < low:
            extra = " (leave it out for all windows)" if flag == "--ppl-windows" else \
                " (0 = all documents)" if flag == "--limit" else ""
            raise QuantbenchError(f"{flag} {value}: must be >= {low}{extra}")
    if opt.c4_variant not in C4_VARIANTS:
        raise QuantbenchError(f"unknown --c4-variant {opt.c4_variant!r}; known: {', '.join(C4_VARIANTS)}")
    return passkey


def build_cases(opt) -> list[Case]:
    """Validate every option against the model's geometry and expand the (method x scheme) grid, before any weight
    loads and without writing anything; raises QuantbenchError on bad input."""
    load_plugins()
    device = validate.check_device(opt.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    passkey = _check_options(opt)
    BACKENDS.get(opt.backend)
    models.check_available(opt.model)
    geo = models.geometry_of(opt.model)
    tasks = [make_task(t, seqlen=opt.seqlen, max_windows=opt.ppl_windows or 0, batch_size=opt.batch_size,
                       variant=opt.c4_variant if t == "ppl-c4" else None, limit=opt.limit, add_bos=opt.add_bos,
                       longbench_max_length=opt.longbench_max_length,
                       passkey_lengths=passkey) for t in expand(_csv(opt.tasks))]
    calib = {"corpus": opt.calib, "nsamples": opt.nsamples, "seqlen": opt.calib_seqlen, "seed": opt.calib_seed}
    validate.check_calibration(calib, geo.context, opt.model)
    overrides = _quantizer_overrides(opt)
    cases = []
    methods = [resolve(name) for name in dict.fromkeys(_csv(opt.method))]
    method_opts = _method_options(opt, methods)
    for cls in methods:
        name = cls.name
        options = method_opts[name]
        if not cls.quantizes:
            m = cls(seed=opt.seed, device=device, **options)
            scheme = parse_scheme("w16a16", m.specs())
            validate.check_run(m, scheme, model=opt.model, device=device, backend=opt.backend, tasks=tasks,
                               calibration=None, geometry=geo)
            cases.append(Case(RunConfig(name, opt.model, "w16a16", opt.backend, opt.seed, opt.dtype, device,
                                        offload=opt.offload), tasks, (m, scheme)))
            continue
        seen = set()
        for text in _schemes(opt):
            m = cls(seed=opt.seed, device=device, **options)  # validates option values up front
            scheme = parse_scheme(text, override_specs(m.specs(), overrides))  # and grids, clips, bits
            if scheme.name in seen:
                continue
            seen.add(scheme.name)
            cfg = RunConfig(name, opt.model, scheme.name, opt.backend, opt.seed, opt.dtype, device, calib, overrides,
                            options, opt.offload)
            validate.check_run(m, scheme, model=opt.model, device=device, backend=opt.backend, tasks=tasks,
                               calibration=calibration_config(m, calib) if m.needs_calibration else None,
                               geometry=geo)
            cases.append(Case(cfg, tasks, (m, scheme)))
    if not cases:
        raise QuantbenchError("nothing to run: --method is empty")
    return cases


def pytest_configure(config):
    if not hasattr(config.option, "method"):
        return
    config.addinivalue_line("markers", "speed: a speed benchmark; runs only with --speed")
    logging.getLogger("quantbench").setLevel(logging.INFO)
    if config.option.log_cli_level is None:  # live "what is happening" logs unless the user chose a level
        config.option.log_cli_level = "INFO"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if getattr(config.option, "no_cache", False):
        os.environ["QUANTBENCH_NO_CACHE"] = "1"
    try:
        config._qb_cases = build_cases(config.option)
    except QuantbenchError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_collection_modifyitems(config, items):
    """Speed benchmarks are opt-in (``--speed``): accuracy runs should not pay for them."""
    if config.getoption("speed", False):
        return
    skipped = [i for i in items if i.get_closest_marker("speed")]
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = [i for i in items if not i.get_closest_marker("speed")]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = metafunc.config._qb_cases
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def pytest_terminal_summary(terminalreporter, config):
    if not hasattr(config, "_qb_cases"):
        return
    records = ResultStore(config.option.results_dir).records()
    if not records:
        return
    text = render(records)
    terminalreporter.write_sep("=", f"leaderboard ({config.option.results_dir})")
    terminalreporter.write_line(text)
    if config.option.leaderboard:
        with open(config.option.leaderboard, "w") as f:
            f.write(text)
        terminalreporter.write_line(f"leaderboard written to {config.option.leaderboard}")
