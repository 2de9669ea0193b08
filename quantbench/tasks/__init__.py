"""Evaluation tasks. ``make_task("ppl-austen", seqlen=2048)`` -> a :class:`Task` with a protocol label.

The interface lives in :mod:`quantbench.tasks.base`; importing this package registers the families: perplexity
(:mod:`~quantbench.tasks.ppl`), the lm-eval bridge (:mod:`~quantbench.tasks.lmeval`) and the shipped offline tasks
(:mod:`~quantbench.tasks.local`).
"""
from quantbench.tasks import lmeval, local, ppl  # noqa: F401  (register)
from quantbench.tasks.base import GROUPS, Task, expand, make_task

__all__ = ["GROUPS", "Task", "expand", "make_task"]
