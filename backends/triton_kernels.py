"""Triton INT4 kernels (docs/kernels.md): ``block_mix`` + ``rotate_quant`` (a plan's online transform fused with
per-token quantization, two stages), ``w4a4_gemm``, ``w4a16_gemm`` (+ split-K for decode).

Import through :func:`quantbench.backends.triton_int4.kernels`, which sets ``TRITON_INTERPRET=1`` on a machine
without a GPU *before* this module defines its kernels (the interpreter is chosen at decoration time). Interpreter
rules kept here: no bf16 into ``tl.dot`` (fp16/fp32 only), no inline asm, no libdevice (``rint`` is emulated).
Every kernel has a pure-PyTorch reference (:mod:`quantbench.backends.int4`; for ``block_mix``, the plan's own
transforms in :mod:`quantbench.transforms`); the integer parts match it exactly.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from quantbench.backends.int4 import PACK, Int4Weight, check_k, shift_of
from quantbench.errors import ConfigError
from quantbench.quant import SCALE_MAX, SCALE_MIN, QuantSpec

GRID_IDS = {"sym": 0, "sym_pm": 1, "asym": 2, "minmax": 3, "minmax_sym": 4, "sym_ct": 5}
HALF = PACK // 2
# fp32 rotation dots: exact fp32 FMAs in the interpreter; on a GPU "ieee" runs without tensor cores and spills (6 ms
# for one 4096-wide row on H100), so 3xTF32 (fp32-level error, ~1e-6 relative) on the tensor cores
ROT_PREC: tl.constexpr = tl.constexpr("ieee" if triton.knobs.runtime.interpret else "tf32x3")
# tiles: on a GPU wgmma wants BM a multiple of 64 (docs/kernels.md, Tiles); the interpreter is fastest with few, big tiles
BM, BN = (64, 128) if triton.knobs.runtime.interpret else (64, 64)


@triton.jit
def _rne(v):
    """Round half to even (``torch.round``) without libdevice: exact for every fp32 ``v``."""
    r = tl.floor(v)
    f = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(f > 0.5, r + 1.0, tl.where(f < 0.5, r, tl.where(odd, r + 1.0, r)))


@triton.jit
def _block(x_ptr, r, rows, row_mask, k0, stride_xm, B: tl.constexpr, HAS_R: tl.constexpr):
    """Block ``k0`` of the rows, times the rotation ``r`` (staged once per program by the caller)."""
    cols = k0 + tl.arange(0, B)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
    if HAS_R:
        x = tl.dot(x, r, input_precision=ROT_PREC)
    return x


@triton.jit
def _qparams(lo, hi, clip, QMIN: tl.constexpr, QMAX: tl.constexpr, SHIFT: tl.constexpr, GRID: tl.constexpr,
             SMIN: tl.constexpr, SMAX: tl.constexpr):
    """Per-row scale and zero point from the rows' min/max, exactly as ``quant.qparams`` for each grid."""
    lo = lo * clip
    hi = hi * clip
    zero = tl.zeros(lo.shape, tl.float32)
    if GRID == 0:  # sym (QuaRot): all-zero rows get scale 1
        amax = tl.maximum(tl.abs(lo), hi)
        scale = tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, tl.full(lo.shape, QMAX, tl.float32)))
    elif GRID == 1:  # sym_pm (SmoothQuant)
        amax = tl.maximum(tl.maximum(tl.abs(lo), tl.abs(hi)), SMIN)
        scale = tl.math.div_rn(amax, tl.full(lo.shape, QMAX, tl.float32))
    elif GRID == 2:  # asym (QuaRot): zero forced into range
        lo = tl.minimum(lo, 0.0)
        hi = tl.maximum(hi, 0.0)
        both0 = (lo == 0.0) & (hi == 0.0)
        lo = tl.where(both0, -1.0, lo)
        hi = tl.where(both0, 1.0, hi)
        scale = tl.math.div_rn(hi - lo, tl.full(lo.shape, QMAX, tl.float32))
        zero = _rne(tl.math.div_rn(-lo, scale))
    elif GRID == 3:  # minmax (DuQuant/OmniQuant)
        scale = tl.minimum(tl.maximum(tl.math.div_rn(hi - lo, tl.full(lo.shape, QMAX, tl.float32)), SMIN), SMAX)
        zero = _rne(tl.minimum(tl.maximum(tl.math.div_rn(-lo, scale), -SMAX), SMAX))
    elif GRID == 4:  # minmax_sym
        amax = tl.maximum(tl.abs(lo), tl.abs(hi))
        scale = tl.minimum(tl.maximum(tl.math.div_rn(amax, tl.full(lo.shape, SHIFT - 1.0, tl.float32)), SMIN), SMAX)
        zero = tl.full(lo.shape, SHIFT - 1.0, tl.float32)
    else:  # sym_ct (compressed-tensors): absmax / ((QMAX - QMIN) / 2), an all-zero row gets fp32 eps
        amax = tl.maximum(tl.abs(lo), tl.abs(hi))
        scale = tl.math.div_rn(amax, tl.full(lo.shape, (QMAX - QMIN) / 2.0, tl.float32))
        scale = tl.where(scale == 0.0, 1.1920928955078125e-07, scale)
    return scale, zero


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
    rr = tl.arange(0, B)
    if HAS_R:  # the rotation is loaded once per program, not once per K step
        r = tl.load(r_ptr + rr[:, None] * B + rr[None, :])
    else:
        r = tl.zeros((B, B), tl.float32)
    lo = tl.full((BM,), float("inf"), tl.float32)
    hi = tl.full((BM,), float("-inf"), tl.float32)
    for k0 in range(0, K, B):
        y = _block(x_ptr, r, rows, row_mask, k0, stride_xm, B, HAS_R)
        lo = tl.minimum(lo, tl.min(y, axis=1))
        hi = tl.maximum(hi, tl.max(y, axis=1))
    scale, zero = _qparams(lo, hi, clip, QMIN, QMAX, SHIFT, GRID, SMIN, SMAX)
    total = tl.zeros((BM,), tl.int32)
    for k0 in range(0, K, B):
        y = _block(x_ptr, r, rows, row_mask, k0, stride_xm, B, HAS_R)
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
def _transform_quant_kernel(x_ptr, s_ptr, l_ptr, r1_ptr, src_ptr, r2_ptr, q_ptr, sc_ptr, z_ptr, sum_ptr, M, K, NB,
                            ROWS, stride_xm, clip, QMIN: tl.constexpr, QMAX: tl.constexpr, SHIFT: tl.constexpr,
                            GRID: tl.constexpr, SMIN: tl.constexpr, SMAX: tl.constexpr, HAS_S: tl.constexpr,
                            HAS_L: tl.constexpr, HAS_R1: tl.constexpr, HAS_P: tl.constexpr, HAS_R2: tl.constexpr,
                            P: tl.constexpr, NBP: tl.constexpr):
    """One pass per row: the row held whole as ``X [NB, P]`` (``NB`` blocks of ``P`` channels, padded to ``NBP``),
    ``X / s``, ``Lᵀ X`` (blocks mixed: the Hadamard's ``H_K`` factor, a head Hadamard), ``X R1`` (a batched dot:
    every block by the same rotation), the permutation as an in-program gather (``y[c] = y[perm[c]]``), ``X R2``,
    then the row's min/max, scale and zero (:func:`_qparams`) and the codes from registers: one read of ``x``, one
    write of the codes. The program takes ``ROWS`` consecutive rows; its transform operands are loaded once."""
    a = tl.arange(0, NBP)
    j = tl.arange(0, P)
    cols = a[:, None] * P + j[None, :]
    valid = (a < NB)[:, None] & (j < P)[None, :]
    if HAS_S:
        sv = tl.load(s_ptr + cols, mask=valid, other=1.0)
    if HAS_L:
        lt = tl.load(l_ptr + a[None, :] * NBP + a[:, None])  # Lᵀ[c, a], zero-padded to NBP
    if HAS_R1:
        r1 = tl.load(r1_ptr + j[:, None] * P + j[None, :])
    if HAS_P:
        src = tl.reshape(tl.load(src_ptr + cols, mask=valid, other=0), [NBP * P])
    if HAS_R2:
        r2 = tl.load(r2_ptr + j[:, None] * P + j[None, :])
    for i in range(ROWS):
        row = tl.program_id(0) * ROWS + i
        ok = valid & ((cols * 0 + row) < M)
        y = tl.load(x_ptr + row * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_S:
            y = tl.math.div_rn(y, sv)
        if HAS_L:
            y = tl.dot(lt, y, input_precision=ROT_PREC)
        if HAS_R1:
            y = tl.dot(y, r1, input_precision=ROT_PREC)
        if HAS_P:
            y = tl.reshape(tl.gather(tl.reshape(y, [NBP * P]), src, 0), [NBP, P])
        if HAS_R2:
            y = tl.dot(y, r2, input_precision=ROT_PREC)
        flat = tl.reshape(y, [1, NBP * P])
        vflat = tl.reshape(valid, [1, NBP * P])
        lo = tl.min(tl.where(vflat, flat, float("inf")), axis=1)
        hi = tl.max(tl.where(vflat, flat, float("-inf")), axis=1)
        scale, zero = _qparams(lo, hi, clip, QMIN, QMAX, SHIFT, GRID, SMIN, SMAX)
        q = _rne(tl.math.div_rn(flat, scale[:, None])) + zero[:, None]
        qi = (tl.minimum(tl.maximum(q, QMIN), QMAX) - SHIFT).to(tl.int32)
        tl.store(q_ptr + row * K + tl.reshape(cols, [1, NBP * P]), qi.to(tl.int8), mask=tl.reshape(ok, [1, NBP * P]))
        one = tl.arange(0, 1)
        tl.store(sc_ptr + row + one, scale, mask=(row + one) < M)
        tl.store(z_ptr + row + one, zero - SHIFT, mask=(row + one) < M)
        tl.store(sum_ptr + row + one, tl.sum(tl.where(vflat, qi, 0), axis=1), mask=(row + one) < M)


ONEPASS_MAX_K = 16384  # the one-pass kernel holds a row whole: up to this padded width (LLaMA-2-7B's 11008 -> 16384)


def onepass_fits(k: int, block: int) -> bool:
    """Whether :func:`transform_quant` takes rows of ``k`` channels in blocks of ``block`` (else the two stages)."""
    return k % block == 0 and max(16, triton.next_power_of_2(k // block)) * block <= ONEPASS_MAX_K


def transform_quant(x: torch.Tensor, spec: QuantSpec, block: int = PACK, scale=None, left=None, rotation=None,
                    perm=None, rotation2=None, rows: int | None = None):
    """:func:`block_mix` (``scale``, ``left``, ``rotation``, ``perm``; same meanings) then :func:`rotate_quant` with
    ``rotation2``, in one kernel (:func:`_transform_quant_kernel`): the same codes, scales, zero points and row sums,
    with ``x`` read once. ``left`` may come padded (:func:`pad_left`); ``rows`` per program default: enough programs
    for about two waves of :func:`_programs_wanted`."""
    if spec.granularity != "token" or spec.bits > 8:
        raise ConfigError(f"transform_quant quantizes per token to at most 8 bits, not {spec.granularity}/{spec.bits}")
    m, k = x.shape
    b = block
    if b < 16 or b & (b - 1) or not onepass_fits(k, b):
        raise ConfigError(f"transform_quant needs a power-of-two block >= 16 dividing K={k} and a padded row of at "
                          f"most {ONEPASS_MAX_K} (block {b}): use block_mix + rotate_quant")
    for name, r in (("rotation", rotation), ("rotation2", rotation2)):
        if r is not None and r.shape != (b, b):
            raise ConfigError(f"transform_quant: {name} must be {b}x{b}, got {tuple(r.shape)}")
    nb = k // b
    nbp = max(16, triton.next_power_of_2(nb))
    dev = x.device
    x = x.contiguous()
    lp = None
    if left is not None:
        lp = left if left.shape == (nbp, nbp) and left.dtype == torch.float32 else pad_left(left, nb).to(dev)
    q = torch.empty(m, k, dtype=torch.int8, device=dev)
    s = torch.empty(m, dtype=torch.float32, device=dev)
    z = torch.empty(m, dtype=torch.float32, device=dev)
    rs = torch.empty(m, dtype=torch.int32, device=dev)
    rows = rows or max(1, triton.cdiv(m, 2 * _programs_wanted(dev)))
    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731
    ops = [f32(scale), lp, f32(rotation), None if perm is None else perm.to(dev, torch.int32).contiguous(),
           f32(rotation2)]
    qmin, qmax = spec.qrange
    _transform_quant_kernel[(triton.cdiv(m, rows),)](
        x, *(x if t is None else t for t in ops), q, s, z, rs, m, k, nb, rows, x.stride(0), float(spec.clip_ratio),
        QMIN=qmin, QMAX=qmax, SHIFT=shift_of(spec), GRID=GRID_IDS[spec.grid], SMIN=SCALE_MIN, SMAX=SCALE_MAX,
        HAS_S=scale is not None, HAS_L=left is not None, HAS_R1=rotation is not None, HAS_P=perm is not None,
        HAS_R2=rotation2 is not None, P=b, NBP=nbp)
    return q, s, (None if spec.signed else z), rs


@triton.jit
def _mix_kernel(x_ptr, s_ptr, l_ptr, r_ptr, dst_ptr, y_ptr, K, NB, stride_xm,
                HAS_S: tl.constexpr, HAS_L: tl.constexpr, HAS_R: tl.constexpr, HAS_P: tl.constexpr,
                P: tl.constexpr, NBP: tl.constexpr, BC: tl.constexpr, BA: tl.constexpr):
    """One row, output blocks ``BC`` at a time; the row seen as ``X [NB, P]`` (``NB`` blocks of ``P`` channels):
    ``Y = Lᵀ (X / s) R`` (``L`` mixes blocks, ``R`` rotates inside each), then column ``c`` is stored at
    ``dst[c]`` (a permutation's inverse: the scatter of docs/kernels.md, Stage 1). fp32 throughout, ``div_rn``."""
    row = tl.program_id(0)
    cb = tl.program_id(1) * BC + tl.arange(0, BC)
    j = tl.arange(0, P)
    cm = cb < NB
    if HAS_L:
        acc = tl.zeros((BC, P), tl.float32)
        for a0 in range(0, NB, BA):
            ab = a0 + tl.arange(0, BA)
            cols = ab[:, None] * P + j[None, :]
            xa = tl.load(x_ptr + row * stride_xm + cols, mask=(ab < NB)[:, None], other=0.0).to(tl.float32)
            if HAS_S:
                xa = tl.math.div_rn(xa, tl.load(s_ptr + cols, mask=(ab < NB)[:, None], other=1.0))
            lt = tl.load(l_ptr + ab[None, :] * NBP + cb[:, None])  # Lᵀ[c, a], zero-padded to NBP
            acc += tl.dot(lt, xa, input_precision=ROT_PREC)
    else:
        cols = cb[:, None] * P + j[None, :]
        acc = tl.load(x_ptr + row * stride_xm + cols, mask=cm[:, None], other=0.0).to(tl.float32)
        if HAS_S:
            acc = tl.math.div_rn(acc, tl.load(s_ptr + cols, mask=cm[:, None], other=1.0))
    if HAS_R:
        acc = tl.dot(acc, tl.load(r_ptr + j[:, None] * P + j[None, :]), input_precision=ROT_PREC)
    out = cb[:, None] * P + j[None, :]
    if HAS_P:
        out = tl.load(dst_ptr + out, mask=cm[:, None], other=0)
    tl.store(y_ptr + row * K + out, acc, mask=cm[:, None])


def pad_left(left: torch.Tensor, nb: int) -> torch.Tensor:
    """The block-mixing matrix ``[nb, nb]`` zero-padded to the kernel's power-of-two tile, fp32 (done once per
    module by the backend, not per call)."""
    if left.shape != (nb, nb):
        raise ConfigError(f"block_mix: the block-mixing matrix must be {nb}x{nb}, got {tuple(left.shape)}")
    nbp = max(16, triton.next_power_of_2(nb))
    lp = torch.zeros(nbp, nbp, dtype=torch.float32, device=left.device)
    lp[:nb, :nb] = left
    return lp


def block_mix(x: torch.Tensor, block: int, scale=None, left=None, rotation=None, perm=None, dst=None) -> torch.Tensor:
    """Stage 1 of a fused online transform, fp32 ``[M, K]``: ``x / scale`` (smoothing), then ``Lᵀ`` across the
    ``K/block`` blocks (``left [K/b, K/b]``: the Hadamard's ``H_K`` factor, or a head Hadamard), ``R`` inside each
    block (``rotation [b, b]``: DuQuant's R1), then the columns in ``perm`` order (``y[:, perm]``; ``dst``, its
    inverse ``argsort(perm)`` as int32, may be given instead)."""
    m, k = x.shape
    b = block
    if b < 16 or b & (b - 1) or k % b:
        raise ConfigError(f"block_mix needs a power-of-two block >= 16 that divides K={k}, got {b}")
    nb = k // b
    nbp = max(16, triton.next_power_of_2(nb))
    x = x.contiguous()
    dev = x.device
    lp = None
    if left is not None:
        lp = left if left.shape == (nbp, nbp) and left.dtype == torch.float32 else pad_left(left, nb).to(dev)
    if dst is None and perm is not None:
        dst = torch.argsort(perm.to(dev)).to(torch.int32)  # column c of y goes where perm points at it
    y = torch.empty(m, k, dtype=torch.float32, device=dev)
    bc = 16 if left is not None else max(16, min(triton.next_power_of_2(nb), 4096 // b))
    any_ = x  # placeholder pointer for absent operands
    _mix_kernel[(m, triton.cdiv(nb, bc))](
        x, any_ if scale is None else scale.float().contiguous(), any_ if lp is None else lp,
        any_ if rotation is None else rotation.float().contiguous(), any_ if dst is None else dst, y, k, nb,
        x.stride(0), HAS_S=scale is not None, HAS_L=left is not None, HAS_R=rotation is not None,
        HAS_P=dst is not None, P=b, NBP=nbp, BC=bc, BA=16)
    return y


@triton.jit
def _grouped_pid(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile (m, n) of a 1-D launch in grouped order: ``GROUP_M`` row tiles share each weight tile while it is in L2."""
    pid = tl.program_id(0)
    gm, gn = tl.cdiv(M, BM), tl.cdiv(N, BN)
    per_group = GROUP_M * gn
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(gm - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _unpacked_cols(k0, K, BK: tl.constexpr, H: tl.constexpr):
    """Byte ``j`` of a ``BK``-wide tile (``BK/64`` layout blocks) -> the K index of its low nibble, and the mask of
    columns inside K; its high nibble is that index + ``H``."""
    kk = tl.arange(0, BK // 2)
    lo = k0 + (kk // H) * (2 * H) + kk % H
    return kk, lo, lo < K


@triton.jit
def _epilogue(acc, rm, rn, mm, nm, K, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr, b_ptr,
              HAS_ZX: tl.constexpr, HAS_ZW: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 ``y [BM, BN]`` from the int32 accumulator of rows ``rm`` and columns ``rn`` (docs/kernels.md, W4A4 GEMM
    and its epilogue): the rank-1 zero-point terms, the two scales, the bias. One helper for every W4A4 kernel."""
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
    return y


@triton.jit
def _w4a4_kernel(x_ptr, w_ptr, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr, b_ptr, y_ptr, M, N, K, MB,
                 HAS_ZX: tl.constexpr, HAS_ZW: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_ACC: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, H: tl.constexpr):
    """``acc = xq @ qw'ᵀ`` with int8 ``tl.dot`` -> int32; weights unpacked in registers by the high-nibble trick
    (``int8(p << 4) = 16 lo``, ``int8(p & 0xF0) = 16 hi``, then ``acc >> 4``); scales, zero points and bias in the
    epilogue; int32 never goes to memory unless ``OUT_ACC`` (tests). Grouped launch order (``GROUP_M``)."""
    pid_m, pid_n = _grouped_pid(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm, nm = rm < M, rn < N
    acc = tl.zeros((BM, BN), tl.int32)
    for k0 in range(0, K, BK):
        kk, klo, km = _unpacked_cols(k0, K, BK, H)
        xlo = tl.load(x_ptr + rm[:, None] * K + klo[None, :], mask=mm[:, None] & km[None, :], other=0)
        xhi = tl.load(x_ptr + rm[:, None] * K + (klo + H)[None, :], mask=mm[:, None] & km[None, :], other=0)
        p = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + kk)[None, :], mask=nm[:, None] & km[None, :],
                    other=0)
        wlo = (p << 4).to(tl.int8, bitcast=True)
        whi = (p & 0xF0).to(tl.int8, bitcast=True)
        acc += tl.dot(xlo, tl.trans(wlo), out_dtype=tl.int32)
        acc += tl.dot(xhi, tl.trans(whi), out_dtype=tl.int32)
    acc = acc >> 4
    if OUT_ACC:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=mm[:, None] & nm[None, :])
    else:
        y = _epilogue(acc, rm, rn, mm, nm, K, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr, b_ptr, HAS_ZX, HAS_ZW,
                      HAS_BIAS)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


@triton.jit
def _w4a4t_kernel(x_ptr, w_ptr, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr, b_ptr, y_ptr, M, N, K, MB, K_SPLIT,
                  HAS_ZX: tl.constexpr, HAS_ZW: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                  BN: tl.constexpr, BMT: tl.constexpr, BK: tl.constexpr, GROUP_N: tl.constexpr, H: tl.constexpr):
    """``accᵀ = qw' · xqᵀ`` (``Yᵀ = W Xᵀ``): the weight tile, unpacked in registers, is the dot's *left* operand
    (wgmma's A, which may come from registers; B, the activations, from shared memory as loaded), ``BN`` weight rows
    by ``BMT`` tokens. ``program_id(1)`` takes one ``K_SPLIT`` range of K (split-K for small M): with ``PARTIAL``
    each split stores its int32 partial at ``y_ptr[split]`` (exact; :func:`_w4a4_reduce_kernel` adds them and runs
    the epilogue), else the epilogue runs here."""
    pid_n, pid_m = _grouped_pid(N, M, BN, BMT, GROUP_N)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BMT + tl.arange(0, BMT)
    mm, nm = rm < M, rn < N
    acc = tl.zeros((BN, BMT), tl.int32)
    k_start = tl.program_id(1) * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    for k0 in range(k_start, k_end, BK):
        kk, klo, km = _unpacked_cols(k0, k_end, BK, H)
        p = tl.load(w_ptr + rn[:, None] * (K // 2) + (k0 // 2 + kk)[None, :], mask=nm[:, None] & km[None, :],
                    other=0)
        xlo = tl.load(x_ptr + rm[None, :] * K + klo[:, None], mask=km[:, None] & mm[None, :], other=0)
        xhi = tl.load(x_ptr + rm[None, :] * K + (klo + H)[:, None], mask=km[:, None] & mm[None, :], other=0)
        acc += tl.dot((p << 4).to(tl.int8, bitcast=True), xlo, out_dtype=tl.int32)
        acc += tl.dot((p & 0xF0).to(tl.int8, bitcast=True), xhi, out_dtype=tl.int32)
    acc = tl.trans(acc >> 4)  # every term is 16 * w * x: each partial is a multiple of 16, the shift exact
    if PARTIAL:
        ys = y_ptr + tl.program_id(1) * M * N
        tl.store(ys + rm[:, None] * N + rn[None, :], acc, mask=mm[:, None] & nm[None, :])
    else:
        y = _epilogue(acc, rm, rn, mm, nm, K, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr, b_ptr, HAS_ZX, HAS_ZW,
                      HAS_BIAS)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


@triton.jit
def _w4a4_reduce_kernel(parts_ptr, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr, b_ptr, y_ptr, M, N, K,
                        SPLITS: tl.constexpr, HAS_ZX: tl.constexpr, HAS_ZW: tl.constexpr, HAS_BIAS: tl.constexpr,
                        OUT_ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Split-K's second stage: the int32 partials summed in split order (exact), then the epilogue."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm, nm = rm < M, rn < N
    mask = mm[:, None] & nm[None, :]
    acc = tl.zeros((BM, BN), tl.int32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(parts_ptr + s * M * N + rm[:, None] * N + rn[None, :], mask=mask, other=0)
    if OUT_ACC:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask)
    else:
        y = _epilogue(acc, rm, rn, mm, nm, K, sx_ptr, zx_ptr, rs_ptr, sw_ptr, zw_ptr, cs_ptr, b_ptr, HAS_ZX, HAS_ZW,
                      HAS_BIAS)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def w4a4_gemm(xq, sx, zx, rowsum, w: Int4Weight, bias=None, out_dtype=torch.float32, return_acc: bool = False,
              config: dict | None = None):
    """``y [M, N]`` from int8 activation codes ``[M, K]`` (values of at most 8 bits, per-token scale/zero) and a
    per-channel :class:`Int4Weight`; ``return_acc`` returns the int32 accumulator instead (tests). Tiles: ``config``
    (``BM``, ``BN``, ``BK``, ``GROUP_M``), else autotuned on a GPU, :data:`INTERP` in the interpreter."""
    m, k = xq.shape
    n, kw = w.shape
    check_k(k)
    if k != kw:
        raise ConfigError(f"w4a4_gemm: activations have K={k}, the weight {kw}")
    if w.group_size:
        raise ConfigError("w4a4_gemm needs per-channel weights: group scales do not factor out of the integer dot")
    y = torch.empty(m, n, dtype=torch.int32 if return_acc else out_dtype, device=xq.device)
    dummy = w.scale
    kern, meta = _pick(_w4a4_kernel, _W4A4_TUNED, config)
    grid = lambda c: (triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"]),)  # noqa: E731
    kern[grid](
        xq.contiguous(), w.packed, sx, zx if zx is not None else dummy, rowsum, w.scale, w.zero if w.zero is not None
        else dummy, w.colsum, bias if bias is not None else dummy, y, m, n, k, _bucket(m), HAS_ZX=zx is not None,
        HAS_ZW=w.zero is not None, HAS_BIAS=bias is not None, OUT_ACC=return_acc, H=HALF, **meta)
    return y


def _programs_wanted(device) -> int:
    """Programs that fill a GPU: 4 per SM (a CPU: the interpreter's 8, enough to test the split paths)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def split_for(m: int, tiles: int, k: int, device) -> int:
    """Split-K factor for small M (``m <= 16``): the fewest splits (powers of two, 64-aligned ranges, at most
    ``k/256`` so each split keeps a few steps) that bring ``tiles`` output tiles to :func:`_programs_wanted`."""
    if m > 16:
        return 1
    want, s = _programs_wanted(torch.device(device)), 1
    while tiles * s < want and k % (2 * s * PACK) == 0 and k // (2 * s) >= 4 * PACK:
        s *= 2
    return s


def w4a4_gemm_t(xq, sx, zx, rowsum, w: Int4Weight, bias=None, out_dtype=torch.float32, return_acc: bool = False,
                split_k: int | None = None, config: dict | None = None):
    """:func:`w4a4_gemm` computed as ``Yᵀ = W Xᵀ`` (:func:`_w4a4t_kernel`), with split-K for small M (``split_k``
    default :func:`split_for`): the same integer accumulator, the same epilogue."""
    m, k = xq.shape
    n, kw = w.shape
    check_k(k)
    if k != kw:
        raise ConfigError(f"w4a4_gemm_t: activations have K={k}, the weight {kw}")
    if w.group_size:
        raise ConfigError("w4a4_gemm_t needs per-channel weights: group scales do not factor out of the integer dot")
    kern, meta = _pick(_w4a4t_kernel, _W4A4T_TUNED, config, INTERP_T)
    if split_k is None:
        split_k = split_for(m, triton.cdiv(n, meta.get("BN", 128)) * triton.cdiv(m, meta.get("BMT", 16)), k,
                            xq.device)
    if split_k < 1 or k % (split_k * PACK):
        raise ConfigError(f"split_k={split_k} does not cut K={k} into multiples of {PACK}")
    dummy = w.scale
    ops = (sx, zx if zx is not None else dummy, rowsum, w.scale, w.zero if w.zero is not None else dummy, w.colsum,
           bias if bias is not None else dummy)
    flags = dict(HAS_ZX=zx is not None, HAS_ZW=w.zero is not None, HAS_BIAS=bias is not None)
    y = torch.empty(m, n, dtype=torch.int32 if return_acc else out_dtype, device=xq.device)
    partial = split_k > 1 or return_acc
    out = torch.empty(split_k, m, n, dtype=torch.int32, device=xq.device) if partial else y
    grid = lambda c: (triton.cdiv(n, c["BN"]) * triton.cdiv(m, c["BMT"]), split_k)  # noqa: E731
    kern[grid](xq.contiguous(), w.packed, *ops, out, m, n, k, _bucket(m), k // split_k, PARTIAL=partial, H=HALF,
               **flags, **meta)
    if partial:
        _w4a4_reduce_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 64))](
            out, *ops, y, m, n, k, SPLITS=split_k, OUT_ACC=return_acc, BM=16, BN=64, **flags)
    return y


@triton.jit
def _nibbles(p):
    """Signed codes of a byte's two nibbles as fp32, by the magic number: ``(u ^ 8) | 0x6400`` is the fp16
    ``1024 + (u ^ 8)`` (exact), and ``(u ^ 8) - 8`` is the 4-bit two's complement ``u`` — no integer-to-float
    conversion, two bit operations and a subtraction per code."""
    lo = (((p & 0xF) ^ 8).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    hi = (((p >> 4) ^ 8).to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    return lo.to(tl.float32) - 1032.0, hi.to(tl.float32) - 1032.0


@triton.jit
def _dequant_tile(w_ptr, s_ptr, z_ptr, rn, nm, kb, km, K, G, S_ROW, S_GROUP, HAS_Z: tl.constexpr, H: tl.constexpr):
    """Weight rows ``rn`` of the 64-wide layout block at ``kb`` (columns ``km`` valid): ``(q' - z') * s`` in fp32,
    as :meth:`Int4Weight.dequantize`, low and high halves ``[len(rn), H]``. The scale (and zero) of row ``n``,
    group ``g`` sits at ``n * S_ROW + g * S_GROUP``: row-major ``[N, G]`` (``K/G, 1``) or group-major ``[G, N]``
    (``1, N``)."""
    kk = tl.arange(0, H)
    p = tl.load(w_ptr + rn[:, None] * (K // 2) + (kb // 2 + kk)[None, :], mask=nm[:, None] & km[None, :], other=0)
    lo, hi = _nibbles(p)
    at = rn * S_ROW + (tl.minimum(kb, K - 1) // G) * S_GROUP  # G % 64 == 0: one group per block (clamped: masked)
    sc = tl.load(s_ptr + at, mask=nm, other=0.0)
    if HAS_Z:
        z = tl.load(z_ptr + at, mask=nm, other=0.0)
        lo = lo - z[:, None]
        hi = hi - z[:, None]
    return lo * sc[:, None], hi * sc[:, None]


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, MB, K_SPLIT, G, stride_ys,
                  HAS_Z: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                  H: tl.constexpr):
    """``x @ dequant(W)ᵀ`` over the K range of split ``program_id(1)``: :func:`_dequant_tile` in registers, fp32
    accumulation; each split writes its own partial (a deterministic
    two-stage reduction rather than atomics)."""
    pid_m, pid_n = _grouped_pid(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm, nm = rm < M, rn < N
    acc = tl.zeros((BM, BN), tl.float32)
    k_start = tl.program_id(1) * K_SPLIT
    k_end = k_start + K_SPLIT
    kk = tl.arange(0, H)
    for k0 in range(k_start, k_end, BK):
        for j in tl.static_range(BK // (2 * H)):  # one 64-wide layout block: one scale (and zero) per row
            kb = k0 + j * 2 * H
            km = (kb + kk) < k_end
            xm = mm[:, None] & km[None, :]
            xlo = tl.load(x_ptr + rm[:, None] * K + (kb + kk)[None, :], mask=xm, other=0.0)
            xhi = tl.load(x_ptr + rm[:, None] * K + (kb + H + kk)[None, :], mask=xm, other=0.0)
            wlo, whi = _dequant_tile(w_ptr, s_ptr, z_ptr, rn, nm, kb, km, K, G, K // G, 1, HAS_Z, H)
            wlo = wlo.to(x_ptr.dtype.element_ty)
            whi = whi.to(x_ptr.dtype.element_ty)
            acc += tl.dot(xlo, tl.trans(wlo), input_precision="ieee")
            acc += tl.dot(xhi, tl.trans(whi), input_precision="ieee")
    ys = y_ptr + tl.program_id(1) * stride_ys
    tl.store(ys + rm[:, None] * N + rn[None, :], acc, mask=mm[:, None] & nm[None, :])


def w4a16_gemm(x: torch.Tensor, w: Int4Weight, bias=None, split_k: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """``x [M, K]`` (fp16/fp32; bf16 on GPU) times a packed per-channel or grouped weight, fp32 accumulation.
    Small M (decode) splits K (``split_k`` default: :func:`split_for`, enough programs to fill the GPU)."""
    m, k = x.shape
    n, kw = w.shape
    if k != kw:
        raise ConfigError(f"w4a16_gemm: activations have K={k}, the weight {kw}")
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        raise ConfigError("bf16 cannot go through tl.dot in the Triton interpreter: use fp16 or fp32 on CPU")
    g = w.group_size or k
    kern, meta = _pick(_w4a16_kernel, _W4A16_TUNED, config)
    if split_k is None:
        split_k = split_for(m, triton.cdiv(n, meta.get("BN", 64)) * triton.cdiv(m, meta.get("BM", 16)), k, x.device)
    if split_k < 1 or k % (split_k * PACK):
        raise ConfigError(f"split_k={split_k} does not cut K={k} into multiples of {PACK}")
    parts = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    grid = lambda c: (triton.cdiv(m, c["BM"]) * triton.cdiv(n, c["BN"]), split_k)  # noqa: E731
    kern[grid](x.contiguous(), w.packed, w.scale, w.zero if w.zero is not None else w.scale, parts, m, n, k,
               _bucket(m), k // split_k, g, m * n, HAS_Z=w.zero is not None, H=HALF, **meta)
    y = parts.sum(0) if split_k > 1 else parts[0]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _w4a16t_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, MB, K_SPLIT, G,
                   HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BN: tl.constexpr,
                   BMT: tl.constexpr, BK: tl.constexpr, H: tl.constexpr):
    """Decode W4A16 as ``Yᵀ = W Xᵀ``: ``BN`` weight rows by ``BMT`` tokens over one ``K_SPLIT`` range of K. The
    codes come from :func:`_nibbles`; ``(q' - z') * s`` with the group-major scales (``[G, N]``: one contiguous load
    of ``BN`` rows per 64-wide block) is cast to the activations' dtype and is the dot's left, register-side
    operand. With ``PARTIAL`` each split stores its fp32 partial (:func:`_w4a16_reduce_kernel` sums them in split
    order); else bias and cast run here."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.arange(0, BMT)
    mm, nm = rm < M, rn < N
    acc = tl.zeros((BN, BMT), tl.float32)
    k_start = tl.program_id(1) * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    kk = tl.arange(0, H)
    for k0 in range(k_start, k_end, BK):
        for j in tl.static_range(BK // (2 * H)):  # one 64-wide layout block: one scale (and zero) per row
            kb = k0 + j * 2 * H
            km = (kb + kk) < k_end
            wlo, whi = _dequant_tile(w_ptr, s_ptr, z_ptr, rn, nm, kb, km, K, G, 1, N, HAS_Z, H)
            wlo = wlo.to(x_ptr.dtype.element_ty)
            whi = whi.to(x_ptr.dtype.element_ty)
            xm = km[:, None] & mm[None, :]
            xlo = tl.load(x_ptr + rm[None, :] * K + (kb + kk)[:, None], mask=xm, other=0.0)
            xhi = tl.load(x_ptr + rm[None, :] * K + (kb + H + kk)[:, None], mask=xm, other=0.0)
            acc += tl.dot(wlo, xlo, input_precision="ieee")
            acc += tl.dot(whi, xhi, input_precision="ieee")
    out = rm[None, :] * N + rn[:, None]
    if PARTIAL:
        tl.store(y_ptr + tl.program_id(1) * M * N + out, acc, mask=nm[:, None] & mm[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=nm, other=0.0)[:, None]
        tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=nm[:, None] & mm[None, :])


@triton.jit
def _w4a16_reduce_kernel(parts_ptr, b_ptr, y_ptr, M, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr):
    """Split-K's second stage for W4A16, one kernel: the fp32 partials in split order, the bias, the cast."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(parts_ptr + s * M * N + rm[:, None] * N + rn[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


W4A16_GEMV_M = 16  # up to here: the decode GEMV (one token tile); see :func:`w4a16`


def w4a16_gemv(x: torch.Tensor, w: Int4Weight, bias=None, split_k: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """Decode W4A16 (``M <= 16``): :func:`_w4a16t_kernel` split along K so that the GPU gets four programs per SM
    (:func:`split_for`), then one reduce kernel that adds the partials, the bias and casts (none when unsplit)."""
    m, k = x.shape
    n, kw = w.shape
    if k != kw or m > W4A16_GEMV_M:
        raise ConfigError(f"w4a16_gemv: needs K={kw} and at most {W4A16_GEMV_M} tokens, got {tuple(x.shape)}")
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        raise ConfigError("bf16 cannot go through tl.dot in the Triton interpreter: use fp16 or fp32 on CPU")
    kern, meta = _pick(_w4a16t_kernel, _W4A16T_TUNED, config, INTERP_GEMV)
    if split_k is None:
        split_k = split_for(m, triton.cdiv(n, meta.get("BN", 128)), k, x.device)
    if split_k < 1 or k % (split_k * PACK):
        raise ConfigError(f"split_k={split_k} does not cut K={k} into multiples of {PACK}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    partial = split_k > 1
    out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device) if partial else y
    b = bias.float().contiguous() if bias is not None else w.scale
    grid = lambda c: (triton.cdiv(n, c["BN"]), split_k)  # noqa: E731
    kern[grid](x.contiguous(), w.packed, w.scale_gm, w.zero_gm if w.zero is not None else w.scale_gm, b, out, m, n, k,
               _bucket(m), k // split_k, w.group_size or k, HAS_Z=w.zero is not None, HAS_BIAS=bias is not None,
               PARTIAL=partial, BMT=16, H=HALF, **meta)
    if partial:
        _w4a16_reduce_kernel[(triton.cdiv(m, 16), triton.cdiv(n, 64))](out, b, y, m, n, SPLITS=split_k,
                                                                       HAS_BIAS=bias is not None, BM=16, BN=64)
    return y


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, y_ptr, N, K, G, HAS_Z: tl.constexpr, BN: tl.constexpr, H: tl.constexpr):
    """One 64-wide layout block of ``BN`` weight rows -> ``(q' - z') * s`` (fp32, as :meth:`Int4Weight.dequantize`)
    stored in the output's dtype."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    kb = tl.program_id(1) * 2 * H
    nm = rn < N
    kk = tl.arange(0, H)
    lo, hi = _dequant_tile(w_ptr, s_ptr, z_ptr, rn, nm, kb, kk < H, K, G, K // G, 1, HAS_Z, H)
    out = y_ptr + rn[:, None] * K + kb
    tl.store(out + kk[None, :], lo.to(y_ptr.dtype.element_ty), mask=nm[:, None])
    tl.store(out + H + kk[None, :], hi.to(y_ptr.dtype.element_ty), mask=nm[:, None])


def dequantize(w: Int4Weight, dtype=torch.float32) -> torch.Tensor:
    """The packed weight as a dense ``[N, K]`` tensor of ``dtype`` (one pass over the int4 bytes)."""
    n, k = w.shape
    y = torch.empty(n, k, dtype=dtype, device=w.packed.device)
    _dequant_kernel[(triton.cdiv(n, 64), k // PACK)](w.packed, w.scale, w.zero if w.zero is not None else w.scale,
                                                    y, n, k, w.group_size or k, HAS_Z=w.zero is not None, BN=64, H=HALF)
    return y


W4A16_DENSE_M = 256  # from here on: dequantize, then cuBLAS (vLLM's AWQ path does the same for large batches)


def w4a16(x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor:
    """W4A16 chosen by M: the decode GEMV (:func:`w4a16_gemv`) up to :data:`W4A16_GEMV_M` tokens, :func:`w4a16_gemm`
    below :data:`W4A16_DENSE_M`, else the weight dequantized to ``x.dtype`` (:func:`dequantize`) and a dense matmul
    (fp32 accumulation in cuBLAS)."""
    if x.shape[0] <= W4A16_GEMV_M:
        return w4a16_gemv(x, w, bias)
    if x.shape[0] < W4A16_DENSE_M:
        return w4a16_gemm(x, w, bias)
    return torch.nn.functional.linear(x, dequantize(w, x.dtype), None if bias is None else bias.to(x.dtype))


# ---- tiles: one config in the interpreter, autotuned on a GPU (docs/kernels.md, Tiles) ----------------------------

def _bucket(m: int) -> int:
    """Autotune key for M: the next power of two (capped), so every prefill length does not retune."""
    return min(triton.next_power_of_2(max(m, 1)), 8192)


def _gpu_configs(small_m: bool, wide: bool = False):
    """Candidate tiles; ``wide`` (16-bit activations, twice the bytes of int8) gets shallower K and pipelines so
    that every candidate fits the 227 KB of shared memory."""
    cfg = []
    small = [(16, 64, 256, 4, 4), (16, 128, 256, 4, 4), (32, 64, 256, 4, 4)]
    large = [(128, 128, 128, 8, 4), (128, 128, 256, 8, 3), (128, 256, 128, 8, 3), (64, 128, 256, 4, 3)]
    if wide:
        small = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (32, 64, 128, 4, 4)]
        large = [(128, 128, 64, 8, 4), (64, 128, 128, 4, 3), (128, 64, 128, 4, 3), (128, 128, 128, 8, 2)]
    for bm, bn, bk, w, st in (small if small_m else large):
        cfg.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=st))
    return cfg


def _pruner(m_tile: str):
    """Early config pruning: a small-M bucket (``MB <= 32``) keeps the tiles whose token side ``m_tile`` is at most
    32, a large one the others."""
    def prune(configs, named_args, **_):
        small = named_args["MB"] <= 32
        keep = [c for c in configs if (c.kwargs[m_tile] <= 32) == small]
        return keep or configs
    return prune


INTERP = {"BM": BM, "BN": BN, "BK": 2 * PACK, "GROUP_M": 8}
INTERP_T = {"BN": 64, "BMT": 16, "BK": 2 * PACK, "GROUP_N": 8}  # Yᵀ = W Xᵀ: weight rows x tokens
INTERP_GEMV = {"BN": 64, "BK": 2 * PACK}


def _transposed_configs():
    """``Yᵀ = W Xᵀ`` tiles for wgmma: the weight tile (the left operand) a multiple of 64 rows with 4 or 8 warps,
    the token tile (wgmma's N) 16 to 128 wide."""
    out = []
    for bn, bmt, bk, w, st in ((64, 16, 256, 4, 4), (128, 16, 256, 8, 4), (64, 32, 256, 4, 4), (128, 32, 128, 8, 4),
                               (128, 64, 128, 8, 3), (128, 128, 128, 8, 3), (256, 128, 128, 8, 3),
                               (128, 256, 128, 8, 3)):
        out.append(triton.Config({"BN": bn, "BMT": bmt, "BK": bk, "GROUP_N": 8}, num_warps=w, num_stages=st))
    return out


def _gemv_configs():
    """Decode tiles: ``BN`` weight rows (wgmma's M, a multiple of 64) by one 16-token tile, K steps of 128-512."""
    return [triton.Config({"BN": bn, "BK": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((64, 256, 4, 4), (64, 512, 4, 3), (128, 128, 4, 4), (128, 256, 4, 3),
                                  (128, 256, 8, 3), (256, 128, 8, 3))]


_W4A4_TUNED = _W4A16_TUNED = _W4A4T_TUNED = _W4A16T_TUNED = None
if not triton.knobs.runtime.interpret:
    _W4A16T_TUNED = triton.autotune(_gemv_configs(), key=["MB", "N", "K", "K_SPLIT"])(_w4a16t_kernel)
    _W4A4T_TUNED = triton.autotune(_transposed_configs(), key=["MB", "N", "K", "K_SPLIT"],
                                   prune_configs_by={"early_config_prune": _pruner("BMT")})(_w4a4t_kernel)
    _ALL = _gpu_configs(True) + _gpu_configs(False)
    _W4A4_TUNED = triton.autotune(_ALL, key=["MB", "N", "K"],
                                  prune_configs_by={"early_config_prune": _pruner("BM")})(_w4a4_kernel)
    _W4A16_TUNED = triton.autotune(_gpu_configs(True, True) + _gpu_configs(False, True), key=["MB", "N", "K", "K_SPLIT"],
                                   prune_configs_by={"early_config_prune": _pruner("BM")})(_w4a16_kernel)


def _pick(kernel, tuned, config, interp=None):
    """Explicit ``config``; else the autotuned kernel on a GPU unless ``QUANTBENCH_AUTOTUNE=0`` (tests: one
    compile per kernel variant instead of one per config and shape); else the interpreter's tiles (``interp``,
    default :data:`INTERP`)."""
    interp = INTERP if interp is None else interp
    if config is not None:
        return kernel, dict(interp, **config)
    if tuned is None or os.environ.get("QUANTBENCH_AUTOTUNE", "1") == "0":
        return kernel, dict(interp)
    return tuned, {}
