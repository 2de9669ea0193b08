"""Triton INT4 kernels (kernels.md §6.3): ``rotate_quant``, ``w4a4_gemm``, ``w4a16_gemm`` (+ split-K for decode).

Import through :func:`quantbench.backends.triton_int4.kernels`, which sets ``TRITON_INTERPRET=1`` on a machine
without a GPU *before* this module defines its kernels (the interpreter is chosen at decoration time). Interpreter
rules kept here: no bf16 into ``tl.dot`` (fp16/fp32 only), no inline asm, no libdevice (``rint`` is emulated).
Every kernel has a pure-PyTorch reference in :mod:`quantbench.backends.int4`; the integer parts match it exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantbench.backends.int4 import PACK, Int4Weight, check_k, shift_of
from quantbench.errors import ConfigError
from quantbench.quant import SCALE_MAX, SCALE_MIN, QuantSpec

GRID_IDS = {"sym": 0, "sym_pm": 1, "asym": 2, "minmax": 3, "minmax_sym": 4}
HALF = PACK // 2
# tiles: on a GPU wgmma wants BM a multiple of 64 (kernels.md §4.3); the interpreter is fastest with few, big tiles
BM, BN = (64, 128) if triton.knobs.runtime.interpret else (64, 64)


@triton.jit
def _rne(v):
    """Round half to even (``torch.round``) without libdevice: exact for every fp32 ``v``."""
    r = tl.floor(v)
    f = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(f > 0.5, r + 1.0, tl.where(f < 0.5, r, tl.where(odd, r + 1.0, r)))


@triton.jit
def _block(x_ptr, r_ptr, rows, row_mask, k0, stride_xm, B: tl.constexpr, HAS_R: tl.constexpr):
    cols = k0 + tl.arange(0, B)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
    if HAS_R:
        rr = tl.arange(0, B)
        r = tl.load(r_ptr + rr[:, None] * B + rr[None, :])
        x = tl.dot(x, r, input_precision="ieee")
    return x


@triton.jit
def _rotate_quant_kernel(x_ptr, r_ptr, q_ptr, s_ptr, z_ptr, sum_ptr, M, K, stride_xm, clip,
                         QMIN: tl.constexpr, QMAX: tl.constexpr, SHIFT: tl.constexpr, GRID: tl.constexpr,
                         SMIN: tl.constexpr, SMAX: tl.constexpr, B: tl.constexpr, BM: tl.constexpr,
                         HAS_R: tl.constexpr):
    """Per-token quantization of ``x @ blockdiag(R)``: pass 1 finds each row's min/max of the rotated values, pass 2
    recomputes them (no scratch buffer), quantizes exactly as ``quant.qparams``/``quant.quantize`` and stores signed
    int8 codes, the fp32 scale, the shifted zero point and the int32 row sum."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_mask = rows < M
    lo = tl.full((BM,), float("inf"), tl.float32)
    hi = tl.full((BM,), float("-inf"), tl.float32)
    for k0 in range(0, K, B):
        y = _block(x_ptr, r_ptr, rows, row_mask, k0, stride_xm, B, HAS_R)
        lo = tl.minimum(lo, tl.min(y, axis=1))
        hi = tl.maximum(hi, tl.max(y, axis=1))
    lo = lo * clip
    hi = hi * clip
    zero = tl.zeros((BM,), tl.float32)
    if GRID == 0:  # sym (QuaRot): all-zero rows get scale 1
        amax = tl.maximum(tl.abs(lo), hi)
        scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, tl.full((BM,), QMAX, tl.float32)))
    elif GRID == 1:  # sym_pm (SmoothQuant)
        amax = tl.maximum(tl.maximum(tl.abs(lo), tl.abs(hi)), SMIN)
        scale = tl.math.div_rn(amax, tl.full((BM,), QMAX, tl.float32))
    elif GRID == 2:  # asym (QuaRot): zero forced into range
        lo = tl.minimum(lo, 0.0)
        hi = tl.maximum(hi, 0.0)
        both0 = (lo == 0.0) & (hi == 0.0)
        lo = tl.where(both0, -1.0, lo)
        hi = tl.where(both0, 1.0, hi)
        scale = tl.math.div_rn(hi - lo, tl.full((BM,), QMAX, tl.float32))
        zero = _rne(tl.math.div_rn(-lo, scale))
    elif GRID == 3:  # minmax (DuQuant/OmniQuant)
        scale = tl.minimum(tl.maximum(tl.math.div_rn(hi - lo, tl.full((BM,), QMAX, tl.float32)), SMIN), SMAX)
        zero = _rne(tl.minimum(tl.maximum(tl.math.div_rn(-lo, scale), -SMAX), SMAX))
    else:  # minmax_sym
        amax = tl.maximum(tl.abs(lo), tl.abs(hi))
        scale = tl.minimum(tl.maximum(tl.math.div_rn(amax, tl.full((BM,), SHIFT - 1.0, tl.float32)), SMIN), SMAX)
        zero = tl.full((BM,), SHIFT - 1.0, tl.float32)
    total = tl.zeros((BM,), tl.int32)
    for k0 in range(0, K, B):
        y = _block(x_ptr, r_ptr, rows, row_mask, k0, stride_xm, B, HAS_R)
        q = _rne(tl.math.div_rn(y, scale[:, None])) + zero[:, None]
        q = tl.minimum(tl.maximum(q, QMIN), QMAX) - SHIFT
        qi = q.to(tl.int32)
        total += tl.sum(qi, axis=1)
        cols = k0 + tl.arange(0, B)
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], qi.to(tl.int8), mask=row_mask[:, None])
    tl.store(s_ptr + rows, scale, mask=row_mask)
    tl.store(z_ptr + rows, zero - SHIFT, mask=row_mask)
    tl.store(sum_ptr + rows, total, mask=row_mask)


def rotate_quant(x: torch.Tensor, spec: QuantSpec, rotation: torch.Tensor | None = None, block_m: int = 32):
    """``x [M, K]`` -> (int8 codes ``[M, K]``, fp32 scale ``[M]``, shifted zero ``[M]`` or None, int32 row sums),
    after an optional block rotation ``R [b, b]`` (b a power of two >= 16) on every block of ``b`` channels."""
    if spec.granularity != "token" or spec.bits > 8:
        raise ConfigError(f"rotate_quant quantizes per token to at most 8 bits, not {spec.granularity}/{spec.bits}")
    m, k = x.shape
    b = PACK if rotation is None else rotation.shape[0]
    if b < 16 or b & (b - 1) or k % b:
        raise ConfigError(f"rotate_quant needs a power-of-two block >= 16 that divides K={k}, got {b}")
    x = x.contiguous()
    r = x if rotation is None else rotation.float().contiguous()  # .contiguous(): a QR factor can be column-major
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    z = torch.empty(m, dtype=torch.float32, device=x.device)
    rs = torch.empty(m, dtype=torch.int32, device=x.device)
    qmin, qmax = spec.qrange
    _rotate_quant_kernel[(triton.cdiv(m, block_m),)](
        x, r, q, s, z, rs, m, k, x.stride(0), float(spec.clip_ratio), QMIN=qmin, QMAX=qmax, SHIFT=shift_of(spec),
        GRID=GRID_IDS[spec.grid], SMIN=SCALE_MIN, SMAX=SCALE_MAX, B=b, BM=block_m, HAS_R=rotation is not None)
    return q, s, (None if spec.signed else z), rs


@triton.jit
def _w4a4_kernel(x_ptr, w_ptr, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr, b_ptr, y_ptr, M, N, K,
                 HAS_ZX: tl.constexpr, HAS_ZW: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_ACC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, H: tl.constexpr):
    """``acc = xq @ qw'ᵀ`` with int8 ``tl.dot`` -> int32; weights unpacked in registers by the high-nibble trick
    (``int8(p << 4) = 16 lo``, ``int8(p & 0xF0) = 16 hi``, then ``acc >> 4``); scales, zero points and bias in the
    epilogue; int32 never goes to memory unless ``OUT_ACC`` (tests)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm, nm = rm < M, rn < N
    kk = tl.arange(0, H)
    acc = tl.zeros((BM, BN), tl.int32)
    for k0 in range(0, K, 2 * H):
        xlo = tl.load(x_ptr + rm[:, None] * K + (k0 + kk)[None, :], mask=mm[:, None], other=0)
        xhi = tl.load(x_ptr + rm[:, None] * K + (k0 + H + kk)[None, :], mask=mm[:, None], other=0)
        p = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + kk)[None, :], mask=nm[:, None], other=0)
        wlo = (p << 4).to(tl.int8, bitcast=True)
        whi = (p & 0xF0).to(tl.int8, bitcast=True)
        acc += tl.dot(xlo, tl.trans(wlo), out_dtype=tl.int32)
        acc += tl.dot(xhi, tl.trans(whi), out_dtype=tl.int32)
    acc = acc >> 4
    if OUT_ACC:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=mm[:, None] & nm[None, :])
    else:
        y = acc.to(tl.float32)
        if HAS_ZW:
            zw = tl.load(zw_ptr + rn, mask=nm, other=0.0)
            rs = tl.load(rs_ptr + rm, mask=mm, other=0).to(tl.float32)
            y -= rs[:, None] * zw[None, :]
        if HAS_ZX:
            zx = tl.load(zx_ptr + rm, mask=mm, other=0.0)
            cs = tl.load(cs_ptr + rn, mask=nm, other=0).to(tl.float32)
            y -= zx[:, None] * cs[None, :]
            if HAS_ZW:
                y += K * zx[:, None] * zw[None, :]
        sx = tl.load(sx_ptr + rm, mask=mm, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=nm, other=0.0)
        y = y * sx[:, None] * sw[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def w4a4_gemm(xq, sx, zx, rowsum, w: Int4Weight, bias=None, out_dtype=torch.float32, return_acc: bool = False,
              block_m: int = BM, block_n: int = BN):
    """``y [M, N]`` from int8 activation codes ``[M, K]`` (values of at most 8 bits, per-token scale/zero) and a
    per-channel :class:`Int4Weight`; ``return_acc`` returns the int32 accumulator instead (tests)."""
    m, k = xq.shape
    n, kw = w.shape
    check_k(k)
    if k != kw:
        raise ConfigError(f"w4a4_gemm: activations have K={k}, the weight {kw}")
    if w.group_size:
        raise ConfigError("w4a4_gemm needs per-channel weights: group scales do not factor out of the integer dot")
    y = torch.empty(m, n, dtype=torch.int32 if return_acc else out_dtype, device=xq.device)
    dummy = w.scale
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a4_kernel[grid](
        xq.contiguous(), w.packed, sx, zx if zx is not None else dummy, rowsum, w.scale, w.zero if w.zero is not None
        else dummy, w.colsum, bias if bias is not None else dummy, y, m, n, k, HAS_ZX=zx is not None,
        HAS_ZW=w.zero is not None, HAS_BIAS=bias is not None, OUT_ACC=return_acc, BM=block_m, BN=block_n, H=HALF)
    return y


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, K_SPLIT, G, stride_ys,
                  HAS_Z: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, H: tl.constexpr):
    """``x @ dequant(W)ᵀ`` over the K range of split ``program_id(2)``: nibbles -> ``(q' - z') * s`` in registers
    (per 64-block group index ``k // G``), fp32 accumulation; each split writes its own partial (a deterministic
    two-stage reduction rather than atomics)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm, nm = rm < M, rn < N
    kk = tl.arange(0, H)
    acc = tl.zeros((BM, BN), tl.float32)
    k_start = tl.program_id(2) * K_SPLIT
    for k0 in range(k_start, k_start + K_SPLIT, 2 * H):
        xlo = tl.load(x_ptr + rm[:, None] * K + (k0 + kk)[None, :], mask=mm[:, None], other=0.0)
        xhi = tl.load(x_ptr + rm[:, None] * K + (k0 + H + kk)[None, :], mask=mm[:, None], other=0.0)
        p = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + kk)[None, :], mask=nm[:, None], other=0)
        lo = ((p << 4).to(tl.int8, bitcast=True) >> 4).to(tl.float32)
        hi = ((p & 0xF0).to(tl.int8, bitcast=True) >> 4).to(tl.float32)
        g = k0 // G
        ngroups = K // G
        s = tl.load(s_ptr + rn * ngroups + g, mask=nm, other=0.0)
        if HAS_Z:
            z = tl.load(z_ptr + rn * ngroups + g, mask=nm, other=0.0)
            lo = lo - z[:, None]
            hi = hi - z[:, None]
        wlo = (lo * s[:, None]).to(x_ptr.dtype.element_ty)
        whi = (hi * s[:, None]).to(x_ptr.dtype.element_ty)
        acc += tl.dot(xlo, tl.trans(wlo), input_precision="ieee")
        acc += tl.dot(xhi, tl.trans(whi), input_precision="ieee")
    ys = y_ptr + tl.program_id(2) * stride_ys
    tl.store(ys + rm[:, None] * N + rn[None, :], acc, mask=mm[:, None] & nm[None, :])


def w4a16_gemm(x: torch.Tensor, w: Int4Weight, bias=None, split_k: int | None = None, block_m: int = BM,
               block_n: int = BN) -> torch.Tensor:
    """``x [M, K]`` (fp16/fp32; bf16 on GPU) times a packed per-channel or grouped weight, fp32 accumulation.
    Small M (decode) splits K (``split_k`` default: 8 for M <= 16 when K allows, else 1)."""
    m, k = x.shape
    n, kw = w.shape
    if k != kw:
        raise ConfigError(f"w4a16_gemm: activations have K={k}, the weight {kw}")
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        raise ConfigError("bf16 cannot go through tl.dot in the Triton interpreter: use fp16 or fp32 on CPU")
    g = w.group_size or k
    if split_k is None:
        split_k = next((s for s in (8, 4, 2) if m <= 16 and k % (s * PACK) == 0), 1)
    if split_k < 1 or k % (split_k * PACK):
        raise ConfigError(f"split_k={split_k} does not cut K={k} into multiples of {PACK}")
    parts = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _w4a16_kernel[grid](x.contiguous(), w.packed, w.scale, w.zero if w.zero is not None else w.scale, parts, m, n, k,
                        k // split_k, g, m * n, HAS_Z=w.zero is not None, BM=block_m, BN=block_n, H=HALF)
    y = parts.sum(0) if split_k > 1 else parts[0]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
