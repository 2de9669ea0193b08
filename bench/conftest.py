"""pytest driver for benchmark runs (the design card's entry point; ``quantbench run`` takes the same options):

    pytest bench/ --method duquant --model mistral-7b --wbits 4 --abits 4 --tasks ppl-wikitext2,ppl-c4

Every (method, scheme) pair is one test case (:func:`quantbench.cases.build_cases`); each writes result records
into --results-dir, and the session ends with the markdown leaderboard of that directory (also written to
--leaderboard when given). Bad requests (unknown method/model/task, impossible bits, a group size that does not
divide the model) stop the session with a one-line usage error (exit 4) before any work.
"""
from __future__ import annotations

import logging
import os

import pytest

from quantbench.cache import keep_benchmarks_out_of_the_checkout
from quantbench.cases import Case, build_cases  # noqa: F401  (Case: the parametrized value)
from quantbench.errors import QuantbenchError
from quantbench.options import add_options
from quantbench.reports.leaderboard import render
from quantbench.results import ResultStore

def pytest_addoption(parser):
    add_options(parser.getgroup("quantbench", "quantbench benchmark runs").addoption)


def pytest_configure(config):
    if not hasattr(config.option, "method"):
        return
    config.addinivalue_line("markers", "speed: a speed benchmark; runs only with --speed")
    logging.getLogger("quantbench").setLevel(logging.INFO)
    if config.option.log_cli_level is None:  # live "what is happening" logs unless the user chose a level
        config.option.log_cli_level = "INFO"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    keep_benchmarks_out_of_the_checkout(config)
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
