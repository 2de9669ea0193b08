"""One LLaMA-2-7B decoder layer, prefill and decode, bf16 vs the Triton INT4 backend (``--speed``, GPU).

The layer (hidden 4096, 32 heads of 128, FFN 11008; random weights) written out directly: RMSNorm, fused QKV
(12288x4096), RoPE, bf16 SDPA (FlashAttention; kept in bf16 by every variant), O (4096x4096),
RMSNorm, fused gate+up (22016x4096), SiLU, down (4096x11008). Variants swap the four linears for
:class:`~quantbench.backends.triton_int4.TritonLinear` built from real plans:

* ``w4a4 rtn``: per-token activations, per-channel weights, no online transform;
* ``w4a4 duquant``: every linear input through ``[R1 -> permutation -> R2]`` (block 128, docs/kernels.md) fused
  with the quantization into one pass, ``transform_quant`` (what the DuQuant plans run; R1/R2 random orthogonal,
  perms random);
* ``w4a4 quarot``: the online Hadamards (``H_32 ⊗ I_128`` on the O input, ``H_172 ⊗ H_64`` on the down input);
* ``w4a16 g128``: weight-only (the decode case).

Prefill: seq 2048 at batch 1/4/16 (DuQuant Table 9's setting); decode: one token per sequence at batch 1/4/16 over
a 2048-token KV cache (CUDA-graph replays). Median ``triton.testing.do_bench`` times, speedup over bf16 and peak
memory go to ``reports/layer-<device>.md``. Skipped without a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

H, HEADS, HD, FFN, CTX = 4096, 32, 128, 11008, 2048
ROWS: list[dict] = []


def _rope(x, pos):
    """Rotate-half RoPE (theta 1e4) on ``[B, heads, T, HD]`` at positions ``pos``."""
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2, device=x.device, dtype=torch.float32) / HD))
    ang = pos.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _rms(x, w):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w


class Layer(torch.nn.Module):
    """The decoder layer; ``linears`` maps qkv/o/gate_up/down to modules taking ``[..., K]``."""

    def __init__(self, linears: dict, norms):
        super().__init__()
        self.lin = torch.nn.ModuleDict(linears)
        self.n1, self.n2 = norms

    def forward(self, x, cache=None):
        b, t, _ = x.shape
        qkv = self.lin["qkv"](_rms(x, self.n1)).view(b, t, 3, HEADS, HD).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        start = 0 if cache is None else cache[0].shape[2]
        pos = torch.arange(start, start + t, device=x.device)
        q, k = _rope(q, pos), _rope(k, pos)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        x = x + self.lin["o"](a.transpose(1, 2).reshape(b, t, H))
        gu = self.lin["gate_up"](_rms(x, self.n2))
        g, u = gu.split(FFN, -1)
        return x + self.lin["down"](F.silu(g) * u)


def layers(device="cuda", dtype=torch.bfloat16) -> dict[str, Layer]:
    """bf16 and each INT4 variant of the same random layer (the module's sizes, read at call time)."""
    from quantbench.backends.triton_int4 import TritonLinear
    from quantbench.plan import LinearPlan
    from quantbench.quant import QuantSpec, quantize
    from quantbench.transforms import DuQuantRotation, Hadamard, HeadHadamard

    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = {"qkv": (3 * H, H), "o": (H, H), "gate_up": (2 * FFN, H), "down": (H, FFN)}
    fp = {n: torch.nn.Linear(k, nn_, bias=False, device=device, dtype=dtype) for n, (nn_, k) in shapes.items()}
    for lin in fp.values():
        torch.nn.init.normal_(lin.weight, std=1 / math.sqrt(lin.in_features))
    norms = (torch.ones(H, device=device, dtype=dtype), torch.ones(H, device=device, dtype=dtype))

    def orth(b):
        return torch.linalg.qr(torch.randn(b, b, generator=g, dtype=torch.float64))[0].float()

    def duquant(k):  # the same random draws as when G was three separate transforms
        r1, perm = orth(128), torch.randperm(k, generator=g)
        return [DuQuantRotation(torch.stack([r1, orth(128)]), perm[None])]

    wspec, aspec = QuantSpec(4, "minmax", "channel"), QuantSpec(4, "minmax", "token")
    pres = {"w4a4 rtn": {n: [] for n in fp},
            "w4a4 duquant": {n: duquant(fp[n].in_features) for n in fp},
            "w4a4 quarot": {"qkv": [], "o": [HeadHadamard(HEADS, HD)], "gate_up": [], "down": [Hadamard(FFN)]}}
    def plan(n, pre, spec, act):
        w = fp[n].weight.float()
        pre = [t.to(device) for t in pre]
        for t in pre:  # the weight absorbs the online transform, as the methods fold it
            w = t.fold(w)
        return TritonLinear(fp[n], LinearPlan(quantize(w, spec), pre, act), n)

    out = {"bf16": Layer(fp, norms)}
    for name, pre in pres.items():
        out[name] = Layer({n: plan(n, pre[n], wspec, aspec) for n in fp}, norms)
    w16 = QuantSpec(4, "minmax", "group", group_size=128)
    out["w4a16 g128"] = Layer({n: plan(n, [], w16, None) for n in fp}, norms)
    return out


def _time(fn, graph: bool) -> tuple[float, str]:
    """(median ms, how it was timed): CUDA-graph replays when asked and the capture works, else plain launches."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"), "cuda graph"
        except Exception as e:  # noqa: BLE001  (a capture failure: plain launches, said in the row)
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), \
                f"launches (graph capture failed: {type(e).__name__})"
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), "launches"


@pytest.fixture(scope="module")
def variants():
    if not torch.cuda.is_available():
        pytest.skip("speed cases need a GPU (the Triton interpreter measures nothing)")
    return layers()


@pytest.mark.speed
@pytest.mark.parametrize("phase,batch", [("prefill", 1), ("prefill", 4), ("prefill", 16), ("decode", 1),
                                         ("decode", 4), ("decode", 16)])
def test_layer_speed(variants, phase, batch):
    g = torch.Generator(device="cuda").manual_seed(1)
    t = CTX if phase == "prefill" else 1
    x = torch.randn(batch, t, H, device="cuda", dtype=torch.bfloat16, generator=g)
    cache = None
    if phase == "decode":
        cache = tuple(torch.randn(batch, HEADS, CTX, HD, device="cuda", dtype=torch.bfloat16, generator=g)
                      for _ in range(2))
    base = None
    ref = None
    for name, layer in variants.items():
        with torch.no_grad():
            out = layer(x, cache)
            ref = out if ref is None else ref
            err = ((out.float() - ref.float()).norm() / (ref.float() - x.float()).norm()).item()
            torch.cuda.reset_peak_memory_stats()
            ms, how = _time(lambda: layer(x, cache), graph=phase == "decode")
            peak = torch.cuda.max_memory_allocated() / 2**20
        base = ms if name == "bf16" else base
        ROWS.append({"phase": phase, "batch": batch, "tokens": batch * t, "variant": name, "ms": round(ms, 4),
                     "speedup vs bf16": round(base / ms, 2), "peak MiB": round(peak),
                     "rel. err of the update": round(err, 3), "timed as": how})
        assert math.isfinite(err)


@pytest.fixture(autouse=True)
def _write_table():
    """After every case: the table so far."""
    yield
    if ROWS and torch.cuda.is_available():
        from quantbench.reports.speed import write_table

        write_table("layer", "A LLaMA-2-7B decoder layer: bf16 vs the Triton INT4 backend",
                    "`pytest bench/test_layer_speed.py --speed --model tiny-llama`; median of "
                    "`triton.testing.do_bench` (decode: CUDA-graph replays). Weights random; attention bf16 SDPA in "
                    "every variant. *rel. err of the update*: ‖layer(x) − bf16 layer(x)‖ / ‖bf16 layer(x) − x‖ "
                    "(4-bit quantization error on random weights, not a kernel error: the kernels are checked in "
                    "tests/).", ROWS)
