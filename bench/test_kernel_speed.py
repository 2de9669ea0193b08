"""GEMM speed of the Triton INT4 kernels on Llama-2-7B shapes (``pytest bench/test_kernel_speed.py --speed``, GPU).

Per (linear, M): torch bf16 matmul; what a user would otherwise pick: ``torch._int_mm`` with both scales (unfused,
and fused by ``torch.compile``), FP8 ``torch._scaled_mm`` row-wise, torch's tinygemm int4 (``_weight_int4pack_mm``,
torchao's int4 weight-only, g128) and gemlite A16W4 g128 where it is installed; ours: ``w4a4`` (GEMM alone, its
``Yᵀ = W Xᵀ`` split-K twin, the exact FP8 path; with ``rotate_quant`` and a fused 128-block rotation; with DuQuant's
whole online transform, in two stages (``block_mix`` R1 + permutation, then ``rotate_quant`` R2) and in one pass
(``transform_quant``); ``rotate_quant`` and ``transform_quant`` alone) and ``w4a16`` (g128: the tiled kernel, and the
dispatch: the decode GEMV up to M = 16, dequantization for cuBLAS from M = 256): median time
(``triton.testing.do_bench``, L2 flushed), TOPS, % of the H100 dense peak (989.4 bf16, 1978.9 int8/fp8; NVIDIA H100 SXM
datasheet, dense) and speedup over bf16 (totals include the activation quantization where named). The table goes
to ``reports/kernels-<device>.md`` with the device, versions and date. Without a GPU the cases skip (the
interpreter proves correctness, not speed: tests/test_triton_kernels.py).
"""
from __future__ import annotations

import pytest
import torch

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate+up": (22016, 4096), "down": (4096, 11008)}  # (N, K)
MS = (1, 16, 256, 2048, 8192)
PEAK = {"bf16": 989.4, "int8": 1978.9}  # H100 SXM dense TFLOPS / TOPS
ROWS: list[dict] = []
UNAVAILABLE: dict[str, str] = {}  # peer rows that could not be built here, with why (listed under the table)


def cases(n: int, k: int, m: int, device: str, dtype=torch.bfloat16):
    """name -> (callable, peak kind) for one shape; every callable returns the output (on CPU, a smoke test of
    this code in the interpreter: fp16, no cuBLAS baselines)."""
    from quantbench.backends import fp8_gemm, int4
    from quantbench.backends.triton_int4 import fp8_capable, kernels
    from quantbench.quant import QuantSpec, quantize

    K = kernels()
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=g, dtype=dtype)
    wf = torch.randn(n, k, device=device, generator=g, dtype=dtype)
    w4 = int4.int4_weight(quantize(wf.float(), QuantSpec(4, "sym", "channel"))).to(device)
    w4g = int4.int4_weight(quantize(wf.float(), QuantSpec(4, "sym", "group", group_size=128))).to(device)
    spec = QuantSpec(4, "sym", "token")
    xq, sx, zx, rs = K.rotate_quant(x, spec)
    r = torch.linalg.qr(torch.randn(128, 128, device=device))[0].contiguous()
    dst = torch.randperm(k, device=device).to(torch.int32)

    def duquant():
        return K.w4a4_gemm(*K.rotate_quant(K.block_mix(x, 128, rotation=r, dst=dst), spec, r), w4, out_dtype=dtype)

    perm = torch.argsort(dst.long()).to(torch.int32)  # the gather's sources: the same permutation

    def duquant_onepass():
        return K.w4a4_gemm(*K.transform_quant(x, spec, 128, rotation=r, perm=perm, rotation2=r), w4, out_dtype=dtype)

    out = {
        "bf16 matmul": (lambda: x @ wf.T, "bf16"),
        "w4a4 gemm": (lambda: K.w4a4_gemm(xq, sx, zx, rs, w4, out_dtype=dtype), "int8"),
        "w4a4 gemm (Yt = W Xt, split-K)": (lambda: K.w4a4_gemm_t(xq, sx, zx, rs, w4, out_dtype=dtype), "int8"),
        "rotate_quant (128-block rotation)": (lambda: K.rotate_quant(x, spec, r)[0], None),
        "w4a4 + rotate_quant": (lambda: K.w4a4_gemm(*K.rotate_quant(x, spec, r), w4, out_dtype=dtype),
                                "int8"),
        "w4a4 + DuQuant R1-perm-R2": (duquant, "int8"),
        "transform_quant (one pass: R1-perm-R2 + quantize)": (
            lambda: K.transform_quant(x, spec, 128, rotation=r, perm=perm, rotation2=r)[0], None),
        "w4a4 + DuQuant one pass": (duquant_onepass, "int8"),
        "w4a16 g128": (lambda: K.w4a16_gemm(x, w4g), "bf16"),
        "w4a16 g128 (dispatch: GEMV to M=16, dequant + cuBLAS from M=256)": (lambda: K.w4a16(x, w4g), "bf16"),
    }
    if fp8_capable(device):  # exact: 4-bit codes in e4m3, fp32 accumulation
        w8 = fp8_gemm.fp8_weight(w4)
        out["w4a4 fp8 exact (_scaled_mm)"] = (lambda: fp8_gemm.w4a4_fp8(xq, sx, zx, rs, w4, w8, out_dtype=dtype),
                                              "int8")
    if device == "cuda":
        out.update(_peers(x, wf, xq, sx, w4, n, k, m, device))
    return out


def _peers(x, wf, xq, sx, w4, n, k, m, device) -> dict:
    """The kernels a user would pick instead of ours (GPU only); a peer that cannot be built is left out and named
    in :data:`UNAVAILABLE` with the reason."""
    out = {}
    sw = w4.scale[:, 0]
    if m > 16:  # _int_mm needs M > 16 (ATen Blas.cpp::_int_mm_out_cuda)
        # B column-major ([N, K] row-major, transposed): cuBLASLt's int8 "TN" layout. Measured on 2026-11-22 with a
        # row-major [K, N] B instead, _int_mm ran at ~120 TOPS (a slow path) in reports/kernels-*.md.
        x8, w8 = xq.contiguous(), torch.randint(-8, 8, (n, k), dtype=torch.int8, device=device).T
        out["torch._int_mm + both scales (unfused)"] = (
            lambda: (torch._int_mm(x8, w8).float() * sx[:, None] * sw[None, :]).to(x.dtype), "int8")
        fused = torch.compile(lambda a, b, s1, s2: (torch._int_mm(a, b).float() * s1[:, None] * s2[None, :])
                              .to(x.dtype), dynamic=False)
        out["torch._int_mm, scales fused (torch.compile)"] = (lambda: fused(x8, w8, sx, sw), "int8")
    if torch.cuda.get_device_capability() >= (9, 0):
        xf8, wf8 = x.to(torch.float8_e4m3fn), wf.to(torch.float8_e4m3fn)
        sa, sb = torch.ones(m, 1, device=device), torch.ones(1, n, device=device)
        out["fp8 _scaled_mm rowwise"] = (lambda: torch._scaled_mm(xf8, wf8.T, sa, sb, out_dtype=torch.bfloat16), "int8")
    g = 128
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scales = torch.rand(n, k // g, device=device, dtype=torch.bfloat16) + 0.5
    try:  # torchao's int4 weight-only kernel (tinygemm): its tensor-core tiled layout, bf16 scales and zeros
        packed = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).contiguous(), 8)
        sz = torch.stack([scales.T, torch.zeros_like(scales.T)], -1).contiguous()
        out["tinygemm int4 g128 (torch _weight_int4pack_mm)"] = (
            lambda: torch.ops.aten._weight_int4pack_mm(x, packed, g, sz), "bf16")
    except (RuntimeError, AttributeError) as e:
        UNAVAILABLE["tinygemm int4 g128"] = str(e).splitlines()[0][:120]
    try:
        import gemlite
        from gemlite import DType, GemLiteLinear

        lin = GemLiteLinear(4, group_size=g, in_features=k, out_features=n, input_dtype=DType.BF16,
                            output_dtype=DType.BF16)
        lin.pack(codes, scales, torch.full_like(scales, 8), None)
        out[f"gemlite {gemlite.__version__ if hasattr(gemlite, '__version__') else ''} A16W4 g128"] = (
            lambda: lin(x), "bf16")
    except Exception as e:  # noqa: BLE001 - not installed, or its API moved: the row is named as missing
        UNAVAILABLE["gemlite A16W4 g128"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return out


def row(linear: str, n: int, k: int, m: int, name: str, ms: float, kind: str | None, base_ms: float | None) -> dict:
    """One table row; ``kind`` None (not a GEMM): no TOPS, the time as a share of the bf16 GEMM instead."""
    tops = 2 * m * n * k / (ms * 1e-3) / 1e12
    return {"linear": linear, "N x K": f"{n}x{k}", "M": m, "kernel": name, "ms": round(ms, 4),
            "TOPS": round(tops, 1) if kind else "", "% peak": round(100 * tops / PEAK[kind], 1) if kind else "",
            "speedup vs bf16": (round(base_ms / ms, 2) if kind else f"{100 * ms / base_ms:.0f}% of bf16")
            if base_ms else ""}


@pytest.mark.speed
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("linear", list(SHAPES))
def test_gemm_speed(linear, m):
    if not torch.cuda.is_available():
        pytest.skip("speed cases need a GPU (the Triton interpreter measures nothing)")
    import triton.testing

    n, k = SHAPES[linear]
    base = None
    for name, (fn, kind) in cases(n, k, m, "cuda").items():
        fn()
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        base = ms if name == "bf16 matmul" else base
        ROWS.append(row(linear, n, k, m, name, ms, kind, base))


@pytest.fixture(autouse=True)
def _write_table():
    """After every case: the table so far."""
    yield
    if ROWS and torch.cuda.is_available():
        from quantbench.reports.speed import write_table

        missing = "".join(f" Not measured: {k} ({v})." for k, v in UNAVAILABLE.items())
        write_table("kernels", "Triton INT4 kernels: GEMM speed", "Median of `triton.testing.do_bench` (L2 flushed). "
                    "% peak: of 989.4 (bf16) or 1978.9 (int8/fp8) dense." + missing, ROWS)
