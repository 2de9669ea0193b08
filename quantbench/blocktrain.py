"""Block-wise quantization-aware calibration (OmniQuant §3.1; reused by DuQuant+LWC and norm-tweaking).

A decoder block is trained in place: its linears are temporarily swapped (``simulate.swapped``) for
:class:`QLinearView` modules that compute ``Q_a(x / s_in) · Q_w^{LWC}(W diag(s_col) ⊙ r_row)ᵀ + b ⊙ r_row`` with
learnable smoothing factors (LET) and clipping (LWC), straight-through rounding, and the block's attention quantized
through its :class:`~quantbench.plan.AttentionPlan`. :func:`train` runs the optimiser loop with a NaN guard; the
layer-wise runner checkpoints what each block learned, so a killed run resumes there.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantbench.quant import LearnableClip, QuantSpec, fake_quant

log = logging.getLogger(__name__)


def truncate(s: torch.Tensor, threshold: float = 1e-2) -> torch.Tensor:
    """OmniQuant ``truncate_number``: entries with ``|s| < 1e-2`` become ``sign(s) * 1e-2``."""
    small = s.abs() < threshold
    return torch.where(small, torch.sign(s) * threshold, s)


class QLinearView(nn.Module):
    """Training view of one linear (OmniQuant ``QuantLinear`` + ``smooth_and_quant_temporary``).

    ``in_div``: divide the input by it (the scale a norm or previous linear will absorb); ``col``: multiply weight
    columns; ``row``: multiply weight rows and bias. LET shifts (OmniQuant's OPT path, ``smooth_ln_fcs_temporary``
    / ``smooth_fc_fc_temporary``): ``in_shift`` is subtracted from the input before ``in_div`` (what the norm will
    absorb), ``shift`` adds ``W δ`` to the bias (what the input lost), ``row_shift`` is subtracted from the bias
    before ``row`` (this linear's output is the shifted input of the next). Each is a callable returning a tensor,
    or None.
    """

    def __init__(self, linear: nn.Linear, w_spec: QuantSpec | None, a_spec: QuantSpec | None,
                 clip: LearnableClip | None = None, in_div: Callable | None = None, col: Callable | None = None,
                 row: Callable | None = None, in_shift: Callable | None = None, shift: Callable | None = None,
                 row_shift: Callable | None = None):
        super().__init__()
        self.inner, self.w_spec, self.a_spec, self.clip = linear, w_spec, a_spec, clip
        self.in_div, self.col, self.row = in_div, col, row
        self.in_shift, self.shift, self.row_shift = in_shift, shift, row_shift

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The FP weight and bias after the LET factors (what is fused in place after training)."""
        w, b = self.inner.weight, self.inner.bias
        if self.shift is not None:
            b = b + w @ self.shift().to(w.dtype)
        if self.col is not None:
            w = w * self.col().to(w.dtype)
        if self.row_shift is not None:
            b = b - self.row_shift().to(w.dtype)
        if self.row is not None:
            r = self.row().to(w.dtype)
            w = w * r.unsqueeze(1)
            b = b * r if b is not None else None
        return w, b

    def qweight(self) -> torch.Tensor:
        w, _ = self.effective()
        if self.w_spec is None:
            return w
        lo_hi = self.clip() if self.clip is not None else (None, None)
        return fake_quant(w, self.w_spec, *lo_hi)

    def forward(self, x):
        if self.in_shift is not None:
            x = x - self.in_shift().to(x.dtype)
        if self.in_div is not None:
            x = x / self.in_div().to(x.dtype)
        _, b = self.effective()
        return F.linear(fake_quant(x, self.a_spec), self.qweight(), b)


def train(param_groups: list[dict], loss_at: Callable[[int], torch.Tensor], nsamples: int, epochs: int,
          desc: str, before_step: Callable[[], None] | None = None, optimizer=torch.optim.AdamW) -> dict:
    """AdamW (or ``optimizer``) over ``epochs`` x ``nsamples`` steps of batch 1 (OmniQuant's loop, ``wd`` 0).

    NaN guard: if a loss is not finite, the parameters go back to their values at the start of that epoch and
    training of this block stops there (the reference drops into ``pdb``). Returns per-epoch mean losses.
    """
    params = [p for g in param_groups for p in g["params"]]
    if not params or epochs <= 0:
        return {"epochs_run": 0, "loss": [], "nan_restored": False}
    opt = optimizer(param_groups, weight_decay=0.0)
    history, restored = [], False
    for epoch in range(epochs):
        start = [p.detach().clone() for p in params]
        total = 0.0
        for j in range(nsamples):
            if before_step is not None:
                before_step()
            loss = loss_at(j)
            if not torch.isfinite(loss):
                with torch.no_grad():
                    for p, s in zip(params, start):
                        p.copy_(s)
                log.warning("%s: non-finite loss at epoch %d step %d; parameters restored to the epoch start, "
                            "training of this block stopped", desc, epoch, j)
                restored = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        if restored:
            break
        history.append(total / nsamples)
        log.debug("%s epoch %d loss %.6g", desc, epoch, history[-1])
    return {"epochs_run": len(history), "loss": history, "nan_restored": restored}
