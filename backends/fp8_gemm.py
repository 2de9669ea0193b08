"""W4A4 on the FP8 tensor cores, exactly (docs/kernels.md, W4A4 on 8-bit tensor cores).

The signed codes of a 4-bit weight (``[-8, 7]``) and of activations of at most 5 bits (``[-16, 15]``) are integers of
magnitude at most 16, which ``float8_e4m3fn`` holds exactly (3 mantissa bits: every integer up to 16). Their products
are at most 128 and a sum of ``K`` of them stays below ``2^24`` for ``K < 2^17``, so an fp32 accumulation is exact:
``torch._scaled_mm`` with ``use_fast_accum=False`` (fp32 accumulation, cuBLASLt's row-wise scaled FP8 GEMM on Hopper;
oneDNN on a CPU) gives the same integer accumulator as the int8 kernels. Symmetric grids take the two scales inside
the GEMM (row-wise ``scale_a``, column-wise ``scale_b``); zero points add the rank-1 terms after it.
"""
from __future__ import annotations

import torch

from quantbench.backends.int4 import Int4Weight
from quantbench.errors import ConfigError
from quantbench.quant import QuantSpec

E4M3 = torch.float8_e4m3fn
EXACT = 16  # the largest integer magnitude below which every integer is exact in e4m3


def eligible(act: QuantSpec | None, k: int) -> bool:
    """Whether a W4A4 linear with activations ``act`` and ``K = k`` is exact on the FP8 path."""
    return act is not None and act.bits <= 5 and k * 8 * EXACT < 2**24


def fp8_weight(w: Int4Weight) -> torch.Tensor:
    """The weight's signed codes as ``float8_e4m3fn [N, K]`` (exact; done once per module)."""
    return w.codes().to(torch.float32).to(E4M3).to(w.packed.device)


def w4a4_fp8(xq: torch.Tensor, sx: torch.Tensor, zx: torch.Tensor | None, rowsum: torch.Tensor, w: Int4Weight,
             w8: torch.Tensor, bias=None, out_dtype=torch.float32, return_acc: bool = False) -> torch.Tensor:
    """``y [M, N]`` (or the int32 accumulator with ``return_acc``) from int8 activation codes of at most 5 bits and a
    per-channel :class:`Int4Weight` whose codes ``w8`` (:func:`fp8_weight`) are given."""
    m, k = xq.shape
    n = w.shape[0]
    if w.group_size:
        raise ConfigError("w4a4_fp8 needs per-channel weights: group scales do not factor out of the dot")
    if k * 8 * EXACT >= 2**24:
        raise ConfigError(f"w4a4_fp8: K={k} is too long for an exact fp32 accumulation (K < {2**24 // (8 * EXACT)})")
    if xq.numel() and int(xq.abs().max()) > EXACT:  # noqa: PLR2004 - a 6-bit code would round in e4m3
        raise ConfigError("w4a4_fp8 takes activation codes of at most 5 bits (|q| <= 16, exact in e4m3)")
    a = xq.to(torch.float32).to(E4M3)
    one_a = torch.ones(m, 1, device=xq.device)
    one_b = torch.ones(1, n, device=xq.device)
    if return_acc:
        acc = torch._scaled_mm(a, w8.T, scale_a=one_a, scale_b=one_b, out_dtype=torch.float32, use_fast_accum=False)
        return acc.to(torch.int32)
    sw = w.scale[:, 0]
    if zx is None and w.zero is None:  # symmetric: the scales inside the GEMM
        y = torch._scaled_mm(a, w8.T, scale_a=sx.reshape(m, 1).float(), scale_b=sw.reshape(1, n).float(),
                             out_dtype=torch.float32, use_fast_accum=False)
    else:
        y = torch._scaled_mm(a, w8.T, scale_a=one_a, scale_b=one_b, out_dtype=torch.float32, use_fast_accum=False)
        if w.zero is not None:
            zw = w.zero[:, 0]
            y = torch.addr(y, rowsum.float(), zw, alpha=-1)
            if zx is not None:
                y = torch.addr(y, zx, zw, alpha=k)
        if zx is not None:
            y = torch.addr(y, zx, w.colsum.float(), alpha=-1)
        y = y * sx[:, None] * sw[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
