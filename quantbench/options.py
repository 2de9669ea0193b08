"""The benchmark's options, defined once: ``pytest bench/`` (bench/conftest.py) and ``quantbench run``
(:mod:`quantbench.cli`) both build their parsers from :data:`OPTIONS`, so the two cannot drift.

A leaf module (no torch): the command line answers ``--help`` without loading the stack.
"""
from __future__ import annotations

import argparse
import difflib
import sys

DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16", "float64")  # == runner.DTYPES + auto (tested)
EXIT_USAGE = 4  # bad input: one line, before any work, nothing written (pytest's own usage-error code)

# (flag, argparse/pytest keyword arguments), in the order --help lists them
OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--method", dict(default="fp16,rtn", help="comma list of registered methods and pipelines (a+b+c) (default: "
                                               "fp16,rtn)")),
    ("--model", dict(default="smollm2-135m", help="zoo alias, HF id, local dir or built-in (default: smollm2-135m)")),
    ("--wbits", dict(default="4", help="comma list of weight bits (16 = FP)")),
    ("--abits", dict(default="16", help="comma list of activation bits (16 = FP)")),
    ("--kvbits", dict(default="16", help="comma list of K/V bits (16 = FP)")),
    ("--group", dict(type=int, default=0, help="weight group size (0 = per channel)")),
    ("--scheme", dict(default=None, help="comma list of scheme strings (w4a4kv4, w4a16g128, ...) or 'headline' "
                                         "(each method's headline scheme); overrides the bit options")),
    ("--wgrid", dict(default=None, help="weight grid: sym, sym_pm, asym, minmax, minmax_sym, sym_ct (default: the method's)")),
    ("--agrid", dict(default=None, help="activation grid (default: the method's)")),
    ("--kvgrid", dict(default=None, help="K/V grid (default: the method's)")),
    ("--aclip", dict(type=float, default=None, help="activation clip ratio in (0, 1] (default: the method's)")),
    ("--kvclip", dict(type=float, default=None, help="K/V clip ratio in (0, 1] (default: the method's)")),
    ("--rotate-mode", dict(default=None, help="QuaRot residual rotation: hadamard (randomized, default) or random")),
    ("--method-opt", dict(action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                          help="method options (e.g. act_order=true,percdamp=0.1,w_clip=true,clips=paper); each goes "
                               "to the selected methods that have it")),
    ("--tasks", dict(default="ppl-austen", help="comma list of tasks and groups: ppl-austen, ppl-wikitext2, ppl-c4, "
                     "rolling-austen, qa-<piqa|arc_easy|arc_challenge|boolq|hellaswag|winogrande|lambada_openai|"
                     "local>, mmlu-<k>shot, mmlu-local-<k>shot, longbench-<task|local>; groups: ppl, qa, qa6, mmlu, "
                     "mmlu-local, longbench, local (every shipped offline task)")),
    ("--limit", dict(type=int, default=0, help="lm-eval tasks: evaluate only the first N documents of each lm-eval "
                                               "(sub)task (0 = all; in the protocol)")),
    ("--add-bos", dict(action="store_true", help="lm-eval tasks: prepend BOS (default off: lm-eval's and DuQuant's "
                                                 "add_special_tokens=False; recorded)")),
    ("--longbench-max-length", dict(type=int, default=3500, help="LongBench middle truncation of prompts, in tokens "
                                    "(DuQuant: 3500 for Vicuna; capped by the model's context)")),
    ("--passkey-lengths", dict(default="512,1024,2048", help="longbench-local: passkey prompt lengths in tokens")),
    ("--speed", dict(action="store_true", help="pytest bench/ only: also run the speed benchmarks (tests marked "
                                               "speed; pytest-benchmark)")),
    ("--backend", dict(default="fake_quant", help="backend that runs the plan: fake_quant (exact simulation, "
                       "default) or triton (INT4 kernels; the Triton interpreter on a CPU machine: exact and slow)")),
    ("--seed", dict(type=int, default=0, help="seed for python/numpy/torch and random models")),
    ("--seqlen", dict(type=int, default=2048, help="perplexity window length (GPTQ protocol: 2048)")),
    ("--ppl-windows", dict(type=int, default=None, help="evaluate only the first N >= 1 windows (default: all; N "
                                                        "is recorded in the protocol label as firstNwindows)")),
    ("--c4-variant", dict(default="duquant-seed20", help="c4 subset: duquant-seed20, omniquant-seed0, "
                                                         "quarot-first1100")),
    ("--batch-size", dict(type=int, default=1, help="evaluation batch size (results are batch-size independent)")),
    ("--dtype", dict(default="auto", choices=list(DTYPE_CHOICES), help="model dtype (auto: fp32 on CPU, fp16 on GPU)")),
    ("--device", dict(default=None, help="cpu or cuda[:i] (default: cuda if available)")),
    ("--calib", dict(default=None, help="calibration corpus: austen, wikitext2, c4, generated (by the model itself; "
                                        "default: the method's, austen for all but norm-tweaking)")),
    ("--nsamples", dict(type=int, default=None, help="calibration windows (default: the method's reference recipe, "
                                                     "e.g. GPTQ/QuaRot/OmniQuant 128, SmoothQuant 512)")),
    ("--calib-seqlen", dict(type=int, default=None, help="calibration window length (default: the method's, 2048 "
                                                         "or 512)")),
    ("--calib-seed", dict(type=int, default=None, help="calibration sampling seed (default: the method's: "
                                                       "QuaRot/GPTQ 0, DuQuant/OmniQuant 2, SmoothQuant 42)")),
    ("--calib-seeds", dict(default=None, help="comma list of calibration seeds: each calibrating method runs once per "
                                              "seed (the leaderboard adds their mean ± standard deviation); "
                                              "replaces --calib-seed")),
    ("--results-dir", dict(default="results", help="where result records are written (one JSON per metric)")),
    ("--leaderboard", dict(default=None, help="also write the markdown leaderboard of --results-dir to this file")),
    ("--resume", dict(action="store_true", help="skip cases whose results already exist in --results-dir")),
    ("--no-cache", dict(action="store_true", help="rebuild every cached artefact (calibration windows, activation "
                        "statistics, generated calibration, calibrated plans) and store nothing "
                        "($QUANTBENCH_NO_CACHE=1)")),
    ("--offload", dict(action="store_true", help="models larger than the device: keep the model in CPU memory; "
                       "calibration streams one block at a time through --device, whole-model passes and evaluation "
                       "run through accelerate's automatic device map ($QUANTBENCH_OFFLOAD_MAX_MEMORY, e.g. "
                       "0=70GiB,cpu=400GiB)")),
)


def add_options(add) -> None:
    """Register every option with ``add(flag, **kwargs)``: argparse's ``add_argument`` or pytest's ``addoption``."""
    for flag, kwargs in OPTIONS:
        add(flag, **kwargs)


def defaults() -> dict:
    """{dest: default} of every option (what a caller that builds cases without a parser starts from)."""
    return {flag[2:].replace("-", "_"): kw.get("default", False if kw.get("action") == "store_true" else None)
            for flag, kw in OPTIONS}


def did_you_mean(name: str, known) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``known`` (difflib), else ``''``."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the suite's usage-error convention: one line on stderr, exit 4 (``--help``: stdout, 0)."""

    def error(self, message: str):  # noqa: D102
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
