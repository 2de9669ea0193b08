"""INT4 data layouts and the exact integer math the Triton kernels are checked against (docs/kernels.md, Layout).

Codes: every kernel works on *signed* codes. Signed grids (``sym``, ``sym_pm``) are used as they are; unsigned
grids (``asym``, ``minmax``, ``minmax_sym``: codes ``[0, 2^b - 1]``, zero point ``z``) are shifted by ``2^(b-1)``:
``q' = q - 2^(b-1)``, ``z' = z - 2^(b-1)``, so ``q - z = q' - z'`` and 4-bit codes fit ``[-8, 7]`` (int8 holds
activation codes up to 8 bits).

Packing (:func:`pack_int4`): weights ``[N, K]`` -> ``uint8 [N, K/2]``, K-major. Within each 64-wide block of K,
byte ``j`` holds ``k = j`` in its low nibble and ``k = j + 32`` in its high nibble (two's complement), so a 64-wide
tile unpacks into two contiguous ``[N, 32]`` halves with one shift or one mask each (the high-nibble trick:
``int8(p << 4) = 16 * low``, ``int8(p & 0xF0) = 16 * high``). K must be a multiple of 64.

W4A4: ``acc[m, n] = sum_k qx'[m, k] * qw'[n, k]`` (int32), then
``y = sx[m] * sw[n] * (acc - zw'[n] * rowsum_x[m] - zx'[m] * colsum_w[n] + K * zx'[m] * zw'[n]) + b[n]``
(the rank-1 zero-point terms of docs/kernels.md, "W4A4 GEMM and its epilogue", applied in the epilogue, never in the main loop).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from quantbench.errors import ConfigError
from quantbench.quant import QTensor, QuantSpec, _grouped, qparams

PACK = 64  # K block of the nibble layout


def shift_of(spec: QuantSpec) -> int:
    """What unsigned codes are shifted by to become signed (0 for signed grids)."""
    return 0 if spec.signed else 2 ** (spec.bits - 1)


def check_k(k: int, what: str = "K") -> None:
    if k % PACK:
        raise ConfigError(f"the triton INT4 kernels need {what} to be a multiple of {PACK}, got {k}; "
                          f"use --backend fake_quant for this model")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Signed codes ``[N, K]`` in ``[-8, 7]`` -> ``uint8 [N, K/2]`` in the layout above."""
    n, k = q.shape
    check_k(k)
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ConfigError(f"int4 codes must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8).reshape(n, k // PACK, 2, PACK // 2)
    return (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``uint8 [N, K/2]`` -> int8 ``[N, K]``."""
    n, half = p.shape
    b = p.reshape(n, half // (PACK // 2), 1, PACK // 2).to(torch.int16)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    both = torch.cat([lo, hi], dim=2)
    return torch.where(both > 7, both - 16, both).to(torch.int8).reshape(n, half * 2)


@dataclass
class Int4Weight:
    """A packed weight: codes, per-row (``group_size`` 0) or per-group fp32 scales, shifted zero points and the
    row sums of the signed codes (for the W4A4 zero-point epilogue)."""

    packed: torch.Tensor  # uint8 [N, K/2]
    scale: torch.Tensor  # fp32 [N, G]
    zero: torch.Tensor | None  # fp32 [N, G] (z'), None for signed grids
    colsum: torch.Tensor  # int32 [N]: sum_k q'
    group_size: int
    spec: QuantSpec

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def codes(self) -> torch.Tensor:
        return unpack_int4(self.packed)

    @cached_property
    def scale_gm(self) -> torch.Tensor:
        """The scales group-major, fp32 ``[G, N]`` (made once): a decode kernel's ``BN`` rows of one group are one
        contiguous load."""
        return self.scale.t().contiguous()

    @cached_property
    def zero_gm(self) -> torch.Tensor | None:
        return None if self.zero is None else self.zero.t().contiguous()

    def dequantize(self) -> torch.Tensor:
        """fp32 ``[N, K]``, equal to :meth:`QTensor.dequantize` (``(q' - z') * s`` = ``(q - z) * s``)."""
        n, k = self.shape
        g = self.group_size or k
        q = self.codes().float().reshape(n, k // g, g)
        if self.zero is not None:
            q = q - self.zero.unsqueeze(-1)
        return (q * self.scale.unsqueeze(-1)).reshape(n, k)

    def to(self, device) -> Int4Weight:
        z = None if self.zero is None else self.zero.to(device)
        return Int4Weight(self.packed.to(device), self.scale.to(device), z, self.colsum.to(device), self.group_size,
                          self.spec)


def int4_weight(qt: QTensor) -> Int4Weight:
    """Pack a plan's weight :class:`QTensor` (at most 4 bits, per channel or per group along K)."""
    spec = qt.spec
    if spec.bits > 4:
        raise ConfigError(f"the triton INT4 backend runs weights of at most 4 bits, not {spec.bits}; "
                          f"use --backend fake_quant")
    if spec.granularity not in ("channel", "group"):
        raise ConfigError(f"the triton INT4 backend needs per-channel or grouped weights, not {spec.granularity}")
    n, k = qt.codes.shape
    check_k(k)
    if spec.group_size and spec.group_size % PACK:
        raise ConfigError(f"weight group size {spec.group_size} must be a multiple of {PACK} for the triton kernels")
    shift = shift_of(spec)
    q = qt.codes.to(torch.int16) - shift
    g = k // (spec.group_size or k)
    zero = None if qt.zero is None else (qt.zero.reshape(n, g) - shift).float().contiguous()
    return Int4Weight(pack_int4(q.to(torch.int8)), qt.scale.reshape(n, g).float().contiguous(), zero,
                      q.sum(1, dtype=torch.int32), spec.group_size, spec)


# ---- pure-PyTorch references of each kernel's math --------------------------------------------------------------

def ref_rotate_quant(x: torch.Tensor, spec: QuantSpec, rotation: torch.Tensor | None = None):
    """Per-token quantization of ``x [M, K]`` after an optional block rotation (``x`` blocks of ``b`` @ ``R``),
    as :func:`quantbench.quant.quantize` computes it. Returns signed int8 codes, fp32 scale ``[M]``, shifted zero
    ``[M]`` (None for signed grids) and the int32 row sums of the codes."""
    x = x.float()
    if rotation is not None:
        b = rotation.shape[0]
        x = (x.reshape(x.shape[0], -1, b) @ rotation.float()).reshape(x.shape)
    scale, zero = qparams(_grouped(x, spec), spec)
    q = torch.round(x / scale)
    if zero is not None:
        q = q + zero
    qmin, qmax = spec.qrange
    shift = shift_of(spec)
    codes = (q.clamp(qmin, qmax) - shift).to(torch.int8)
    z = None if zero is None else (zero - shift).reshape(-1)
    return codes, scale.reshape(-1), z, codes.sum(1, dtype=torch.int32)


def ref_w4a4_acc(xq: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """The int32 accumulator ``xq @ qw'ᵀ`` (exact: int64 matmul on the CPU, then checked to fit int32)."""
    acc = xq.cpu().long() @ w.codes().cpu().long().T
    assert acc.abs().max() < 2**31
    return acc.to(torch.int32).to(xq.device)


def ref_w4a4(xq, sx, zx, rowsum, w: Int4Weight, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """The W4A4 epilogue of the module docstring on :func:`ref_w4a4_acc`, in fp32."""
    if w.group_size:
        raise ConfigError("W4A4 needs per-channel weights (group scales do not factor out of the int dot)")
    k = w.shape[1]
    acc = ref_w4a4_acc(xq, w).float()
    zw = None if w.zero is None else w.zero[:, 0]
    if zw is not None:
        acc = acc - zw[None, :] * rowsum.float()[:, None]
    if zx is not None:
        acc = acc - zx[:, None] * w.colsum.float()[None, :]
        if zw is not None:
            acc = acc + k * zx[:, None] * zw[None, :]
    y = acc * sx[:, None] * w.scale[:, 0][None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def ref_w4a16(x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor:
    """``x @ dequant(W)ᵀ`` in fp32."""
    y = x.float() @ w.dequantize().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
