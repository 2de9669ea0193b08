"""Benchmark cases from the bench's options (:mod:`quantbench.options`): every (method, scheme) pair validated
against the model's geometry before any weight loads, and nothing written. ``pytest bench/`` parametrizes its
test over these cases; ``quantbench run`` runs them in-process; both go through :func:`build_cases`.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from quantbench import models, validate
from quantbench.data import C4_VARIANTS
from quantbench.errors import ConfigError, QuantbenchError, UnavailableError
from quantbench.method import Method
from quantbench.options import EXIT_USAGE, did_you_mean
from quantbench.pipeline import resolve
from quantbench.plugins import load_plugins
from quantbench.quant import QuantScheme, override_specs, parse_scheme
from quantbench.registry import BACKENDS
from quantbench.reports.leaderboard import render, summary
from quantbench.results import ResultStore
from quantbench.runner import RunConfig, calibration_config, run
from quantbench.tasks import Task, expand, make_task

log = logging.getLogger(__name__)


@dataclass
class Case:
    cfg: RunConfig
    tasks: list[Task]
    resolved: tuple[Method, QuantScheme] | None  # built and parsed once at validation (None: run() does it)
    tag: str = ""  # tells apart the cases of one method and scheme (``--calib-seeds``: ``-calibseed1``)

    @property
    def id(self) -> str:
        return f"{self.cfg.method}-{self.cfg.scheme}{self.tag}"


def csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def schemes(opt, method: type[Method]) -> list[str]:
    """The scheme strings of ``opt`` for ``method``: ``--scheme`` (``headline`` = the method's own,
    ``Method.headline``) or the grid of ``--wbits/--abits/--kvbits/--group``."""
    if opt.scheme:
        return [method.headline_for(opt.model) if s == "headline" else s for s in csv(opt.scheme)]
    g = f"g{opt.group}" if opt.group else ""
    return [f"w{w}a{a}" + (f"kv{kv}" if kv != "16" else "") + g
            for w in csv(opt.wbits) for a in csv(opt.abits) for kv in csv(opt.kvbits)]


def quantizer_overrides(opt) -> dict:
    out: dict[str, dict] = {}
    for tensors, key, value in (("w", "grid", opt.wgrid), ("a", "grid", opt.agrid), ("kv", "grid", opt.kvgrid),
                                ("a", "clip_ratio", opt.aclip), ("kv", "clip_ratio", opt.kvclip)):
        if value is not None:
            for t in tensors:
                out.setdefault(t, {})[key] = value
    return out


def method_options(opt, methods: list) -> dict[str, dict]:
    """Per method, the --method-opt / --rotate-mode settings it accepts: ``KEY=VALUE`` goes to every selected method
    that has KEY, ``METHOD:KEY=VALUE`` to that method only (and wins over an unscoped KEY). An option no selected
    method has is an error."""
    given: dict[str, str] = {}
    scoped: dict[str, dict[str, str]] = {}
    names = {m.name: m for m in methods}
    for item in opt.method_opt:
        for kv in csv(item):
            key, sep, value = kv.partition("=")
            key = key.strip()
            if not sep or not key or key.endswith(":"):
                raise QuantbenchError(f"--method-opt expects KEY=VALUE or METHOD:KEY=VALUE, got {kv!r}")
            if ":" in key:
                scope, key = (x.strip() for x in key.split(":", 1))
                if scope not in names:
                    raise QuantbenchError(f"--method-opt {kv!r}: {scope!r} is not a selected method"
                                          f"{did_you_mean(scope, names)}; selected: {', '.join(names)}")
                if key not in names[scope].options:
                    raise QuantbenchError(f"--method-opt {kv!r}: {scope} has no option {key!r}"
                                          f"{did_you_mean(key, names[scope].options)}; its options: "
                                          f"{', '.join(sorted(names[scope].options)) or 'none'}")
                scoped.setdefault(scope, {})[key] = value.strip()
            else:
                given[key] = value.strip()
    if opt.rotate_mode is not None:
        given["rotate_mode"] = opt.rotate_mode
    unused = [k for k in given if not any(k in m.options for m in methods)]
    if unused:
        known = sorted({k for m in methods for k in m.options})
        raise QuantbenchError(f"no selected method has option {', '.join(unused)}"
                              f"{did_you_mean(unused[0], known)}; their options: {', '.join(known) or 'none'}")
    return {m.name: {**{k: v for k, v in given.items() if k in m.options}, **scoped.get(m.name, {})}
            for m in methods}


def check_options(opt) -> list[int]:
    """Options checked whether or not the requested tasks read them (a bad value is never silently ignored);
    returns the passkey lengths."""
    try:
        passkey = [int(x) for x in csv(opt.passkey_lengths)]
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
    passkey = check_options(opt)
    BACKENDS.get(opt.backend)
    models.check_available(opt.model)
    geo = models.geometry_of(opt.model)
    tasks = [make_task(t, seqlen=opt.seqlen, max_windows=opt.ppl_windows or 0, batch_size=opt.batch_size,
                       variant=opt.c4_variant if t == "ppl-c4" else None, limit=opt.limit, add_bos=opt.add_bos,
                       longbench_max_length=opt.longbench_max_length,
                       passkey_lengths=passkey) for t in expand(csv(opt.tasks))]
    calib = {"corpus": opt.calib, "nsamples": opt.nsamples, "seqlen": opt.calib_seqlen, "seed": opt.calib_seed}
    validate.check_calibration(calib, geo.context, opt.model)
    seeds = calib_seeds(opt)
    overrides = quantizer_overrides(opt)
    cases = []
    methods = [resolve(name) for name in dict.fromkeys(csv(opt.method))]
    method_opts = method_options(opt, methods)
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
        for text in schemes(opt, cls):
            m = cls(seed=opt.seed, device=device, **options)  # validates option values up front
            scheme = parse_scheme(text, override_specs(m.specs(), overrides))  # and grids, clips, bits
            if scheme.name in seen:
                continue
            seen.add(scheme.name)
            for seed in (seeds if seeds and m.needs_calibration else [calib["seed"]]):
                cal = {**calib, "seed": seed}
                cfg = RunConfig(name, opt.model, scheme.name, opt.backend, opt.seed, opt.dtype, device, cal,
                                overrides, options, opt.offload)
                validate.check_run(m, scheme, model=opt.model, device=device, backend=opt.backend, tasks=tasks,
                                   calibration=calibration_config(m, cal) if m.needs_calibration else None,
                                   geometry=geo)
                tag = f"-calibseed{seed}" if len(seeds) > 1 and m.needs_calibration else ""
                cases.append(Case(cfg, tasks, (m, scheme), tag))
    if not cases:
        raise QuantbenchError("nothing to run: --method is empty")
    return cases


def calib_seeds(opt) -> list[int]:
    """``--calib-seeds`` as distinct integers (empty: not given); it replaces ``--calib-seed``."""
    if opt.calib_seeds is None:
        return []
    try:
        seeds = list(dict.fromkeys(int(x) for x in csv(opt.calib_seeds)))
    except ValueError:
        raise ConfigError(f"--calib-seeds takes a comma list of integers, got {opt.calib_seeds!r}") from None
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--calib-seeds takes a comma list of integers >= 0, got {opt.calib_seeds!r}")
    if opt.calib_seed is not None:
        raise ConfigError("--calib-seeds replaces --calib-seed: give one of them")
    return seeds


def _worker_init(jobs: int, level: int) -> None:
    """A ``--jobs`` worker: its share of the cores, logs as the parent's, no progress bars (they would interleave)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    os.environ["TQDM_DISABLE"] = "1"
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")


def _run_one(case: Case, results_dir: str, resume: bool, i: int, n: int, model: str) -> tuple[str, list[dict]]:
    """Run one case; ("ok" | "skipped" | "failed", the records it wrote). Errors are logged in one line."""
    log.info("case %d of %d: %s on %s", i, n, case.id, model)
    try:
        out = run(case.cfg, case.tasks, ResultStore(results_dir), resume=resume, resolved=case.resolved)
    except UnavailableError as e:  # e.g. a hub calibration corpus offline: say what is needed, go on
        log.warning("%s not run: %s", case.id, e)
        return "skipped", []
    except QuantbenchError as e:  # NaN/inf named where it appeared, a full disk: one line, the rest still run
        log.error("%s failed: %s", case.id, e)
        return "failed", []
    for task, why in out.unavailable.items():
        log.warning("%s %s not run: %s", case.id, task, why)
    if out.already_done and not out.records:
        log.info("%s: already in %s (--resume)", case.id, results_dir)
    log.info("%s done: %s", case.id, ", ".join(f"{r['task']} {r['metric']} {r['value']:.4g}" for r in out.records)
             or "nothing new")
    return "ok", out.records


def run_cases(opt) -> int:
    """``quantbench run``: build the cases (bad input: one line, exit 4, nothing written), run each in turn, print
    the leaderboard of the records written; exit 1 when a case failed (the others still run), else 0."""
    if getattr(opt, "no_cache", False):
        os.environ["QUANTBENCH_NO_CACHE"] = "1"
    try:
        cases = build_cases(opt)
    except QuantbenchError as e:
        print(f"quantbench run: {e}", file=sys.stderr)
        return EXIT_USAGE
    store = ResultStore(opt.results_dir)
    written, skipped, failed = [], [], []
    t0 = time.perf_counter()
    jobs = max(1, min(getattr(opt, "jobs", 1) or 1, len(cases)))
    if jobs > 1:
        models.prepare(opt.model)  # the one-time conversion, not once per worker
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                 initargs=(jobs, logging.getLogger().level)) as pool:
            # longest first (calibrating cases), so the last to finish is a short one; each worker rebuilds the
            # method from its config (a pipeline's class is made at run time and does not pickle)
            todo = sorted(enumerate(cases, 1), key=lambda ic: not ic[1].resolved[0].needs_calibration)
            futures = {pool.submit(_run_one, Case(c.cfg, c.tasks, None, c.tag), opt.results_dir, opt.resume, i, len(cases),
                                   opt.model): c for i, c in todo}
            outcomes = []
            for f in as_completed(futures):
                try:
                    outcomes.append((futures[f], f.result()))
                except Exception as e:  # noqa: BLE001 - a worker that died: say which case, keep the others
                    log.error("%s failed in its worker: %s: %s", futures[f].id, type(e).__name__, e)
                    outcomes.append((futures[f], ("failed", [])))
        order = {c.id: i for i, c in enumerate(cases)}
        outcomes.sort(key=lambda co: order[co[0].id])
    else:
        outcomes = [(c, _run_one(c, opt.results_dir, opt.resume, i, len(cases), opt.model))
                    for i, c in enumerate(cases, 1)]
    for case, (status, records) in outcomes:
        {"skipped": skipped, "failed": failed}.get(status, []).append(case.id)
        written += records
    if written:
        print(summary(written))
    if opt.leaderboard:
        Path(opt.leaderboard).parent.mkdir(parents=True, exist_ok=True)
        Path(opt.leaderboard).write_text(render(store.records()))
    print(f"{len(written)} records written to {opt.results_dir} in {time.perf_counter() - t0:.0f} s; "
          f"{len(cases) - len(skipped) - len(failed)} of {len(cases)} cases ran"
          + (f"; not run (data unavailable): {', '.join(skipped)}" if skipped else "")
          + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0
