"""Backends realize a plan into a runnable module. ``fake_quant`` is the reference every other backend must match."""
from quantbench.backends import fake_quant  # noqa: F401  (registers itself)
