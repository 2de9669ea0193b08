"""Backends realize a plan into a runnable module. ``fake_quant`` is the reference every other backend must match.

Without a GPU, Triton kernels can only run in its interpreter, which must be chosen before ``triton`` is first
imported (its own helpers are decorated at import time), so that is decided here, at plugin load.
"""
import os
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from quantbench.backends import fake_quant, triton_int4  # noqa: E402,F401  (register themselves; triton lazily)
