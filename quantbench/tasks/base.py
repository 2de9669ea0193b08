"""The task interface: :class:`Task`, :func:`make_task`, and the named groups of tasks (:data:`GROUPS`).

A task family registers a factory in ``TASKS`` under its prefix (``ppl``, ``qa``, ``mmlu``, ``longbench``,
``rolling``) and its groups in :data:`GROUPS`; a task name is ``<prefix>-<arg>``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from quantbench.errors import ConfigError
from quantbench.options import did_you_mean
from quantbench.registry import TASKS


GROUPS: dict[str, list[str]] = {}  # group name -> task names; filled by the family modules


@dataclass
class Task:
    name: str
    protocol: str  # e.g. ppl/gptq/austen-test/seqlen2048
    config: dict  # everything that determines the value (enters the config hash)
    run_options: dict = field(default_factory=dict)  # recorded, not hashed (batch size: value-neutral)
    metrics: ClassVar[tuple[str, ...]] = ()  # metric names ``evaluate`` returns
    # after ``evaluate``: per metric, its interval (``quantbench.uncertainty``: stderr, ci95, method) and, where the
    # task has them, the items the value averages (kept in the record for paired comparisons)
    intervals: dict = field(default_factory=dict, repr=False)
    items: dict = field(default_factory=dict, repr=False)

    def prepare(self, tokenizer) -> None:
        """Load and tokenize the task's data (before any quantization, so a missing dataset fails fast)."""

    def evaluate(self, model, tokenizer) -> dict[str, float]:  # pragma: no cover - interface
        raise NotImplementedError


def make_task(name: str, **options) -> Task:
    if name in GROUPS:
        raise ConfigError(f"{name!r} is a group of tasks ({', '.join(GROUPS[name])}): expand it with expand()")
    prefix, _, arg = name.partition("-")
    hint = did_you_mean(name, known_names())
    if prefix not in TASKS:
        raise ConfigError(f"unknown task {name!r}{hint}; known families: {', '.join(f'{p}-<...>' for p in sorted(TASKS))}"
                          f"; groups: {', '.join(GROUPS)} (e.g. ppl-austen, qa-piqa, mmlu-5shot, local)")
    try:
        return TASKS[prefix](arg, **options)
    except ConfigError as e:
        if hint and str(e).startswith("unknown"):
            raise ConfigError(f"{e}{hint}") from None
        raise


def known_names() -> list[str]:
    """Every task and group name the families declare (what "did you mean" picks from)."""
    return list(dict.fromkeys([*GROUPS, *(t for ts in GROUPS.values() for t in ts)]))


def expand(names: list[str]) -> list[str]:
    """Task names with groups (``qa``, ``mmlu``, ``longbench``, ``ppl``, ``local``, ...) expanded, order kept."""
    out: list[str] = []
    for n in names:
        out += GROUPS.get(n, [n])
    return list(dict.fromkeys(out))
