"""Triton INT4 backend: the plan's linears on the kernels of :mod:`quantbench.backends.triton_kernels`.

Per planned linear (weights of at most 4 bits, K a multiple of 64):

* activations quantized per token (at most 8 bits): the plan's online transform is fused (:func:`fuse`, by the
  transform's type) with the quantization into one pass, ``transform_quant`` (the row held whole: smoothing
  division, block-mixing factor, rotation ``R1``, permutation gather, the trailing block rotation, quantization),
  or where a row is wider than that kernel holds (``onepass_fits``), two stages: ``block_mix`` then
  ``rotate_quant``. The transforms fused:
  DuQuant's ``[Scale] R1 -> perm -> R2`` (:class:`~quantbench.transforms.DuQuantRotation`), QuaRot's online
  Hadamard of any size ``K * 2^m`` (``H_K ⊗ H_2^m = (H_K ⊗ H_2^m/b) ⊗ H_b``) and its head Hadamard
  (``H_heads ⊗ I``); a transform with no fused kernel runs in PyTorch before the kernels, exactly as in the
  fake-quant backend, logged when the model is realized and shown by ``extra_repr``; then ``w4a4_gemm``
  (per-channel weights) with the zero-point epilogue, or its ``Yᵀ = W Xᵀ`` split-K twin ``w4a4_gemm_t``, or the exact
  FP8 path (:mod:`quantbench.backends.fp8_gemm`, activations of at most 5 bits): on a GPU the fastest, measured
  once per shape (:func:`choose_w4a4`; ``QUANTBENCH_W4A4`` forces one);
* activations in floating point: ``w4a16`` (per-channel or grouped weights): the decode GEMV up to 16 tokens, the
  tiled kernel below 256, the weight dequantized to the activations' dtype and a cuBLAS matmul from ``M = 256`` on.

Attention (Q/K/V quantization) runs as in the fake-quant backend: these kernels cover the linears. A plan the kernels
cannot run (weights above 4 bits, grouped weights with quantized activations, K not a multiple of 64) is an error
naming the linear, never a silent fallback. Without a GPU the kernels run in the Triton interpreter (exact, slow).
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import torch
from torch import nn

from quantbench.backends import fp8_gemm
from quantbench.backends.int4 import PACK, Int4Weight, int4_weight
from quantbench import hadamard
from quantbench.errors import ConfigError
from quantbench.plan import LinearPlan, QuantizedModel
from quantbench.registry import BACKENDS
from quantbench.simulate import apply_attention_plans, swap_modules
from quantbench.transforms import BlockRotation, DuQuantRotation, Hadamard, HeadHadamard, Scale

log = logging.getLogger(__name__)
HAD_BLOCK = 64  # the in-block part of a fused Hadamard: H_64 as one tl.dot (docs/kernels.md, Stage 2)


def _pow2_block(b: int) -> bool:
    return b >= 16 and not b & (b - 1)


def _fuse_duquant(t: DuQuantRotation):
    """``[R1 · P ·] R2``: ``block_mix`` does R1 and the permutation scatter, ``rotate_quant`` R2; a longer chain
    (``permutation_times > 1``) runs its leading ``R · P`` pairs in PyTorch first."""
    if not _pow2_block(t.block) or t.perm.shape[1] % t.block:
        return None
    head, tail = t.split_last()
    rot = tail.r[-1].float().contiguous()
    mix = {"block": t.block, "perm": tail.perm[0], "rotation": tail.r[0]} if tail.perm.shape[0] else None
    return head, mix, rot


def _fuse_block_rotation(t: BlockRotation):
    return ([], None, t.r.float().contiguous()) if _pow2_block(t.r.shape[0]) else None


def _fuse_hadamard(t: Hadamard):
    """``H_K ⊗ H_2^m = (H_K ⊗ H_2^m/b) ⊗ H_b``: the in-block ``H_b`` in ``rotate_quant``, the rest in ``block_mix``."""
    k, p = hadamard.factor(t.n)
    b = min(p, HAD_BLOCK)
    if not _pow2_block(b):
        return None
    rot = (hadamard.sylvester(b) / b ** 0.5).float()
    nb = t.n // b
    left = torch.kron(hadamard.had_k(k) if k > 1 else torch.ones(1, 1, dtype=torch.float64), hadamard.sylvester(p // b))
    return [], ({"block": b, "left": (left / nb ** 0.5).float()} if nb > 1 else None), rot


def _fuse_head_hadamard(t: HeadHadamard):
    if not _pow2_block(t.head_dim):
        return None
    return [], {"block": t.head_dim, "left": hadamard.hadamard_matrix(t.heads).float()}, None


FUSERS = {DuQuantRotation: _fuse_duquant, BlockRotation: _fuse_block_rotation, Hadamard: _fuse_hadamard,
          HeadHadamard: _fuse_head_hadamard}  # by type: the transforms the kernels run


def fuse(pre: list) -> tuple[list, dict | None, torch.Tensor | None]:
    """Split a plan's online transforms into (what runs in PyTorch first, ``block_mix`` arguments or None, the
    ``rotate_quant`` rotation or None), dispatching on the type of the transform next to the quantizer
    (:data:`FUSERS`); a :class:`Scale` right before it joins ``block_mix``. The composition is unchanged."""
    pre = list(pre)
    fuser = FUSERS.get(type(pre[-1])) if pre else None
    found = fuser(pre[-1]) if fuser is not None else None
    if found is None:
        return pre, None, None
    head, mix, rot = found
    pre = pre[:-1] + list(head)
    if not head and pre and isinstance(pre[-1], Scale):
        mix = {"block": rot.shape[0]} if mix is None else mix
        mix["scale"] = pre.pop().s
    return pre, mix, rot


def kernels():
    """The kernel module; on a machine without CUDA it runs in the interpreter (``TRITON_INTERPRET=1``, set by
    :mod:`quantbench.backends` before triton is imported)."""
    try:
        import triton
    except ImportError as e:
        raise ConfigError(f"the triton backend needs triton ({e}); pip install 'quantbench[triton]'") from None
    if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
        raise ConfigError("no GPU, and triton was imported before TRITON_INTERPRET=1 was set: run with "
                          "TRITON_INTERPRET=1 in the environment to use the triton backend on CPU")
    from quantbench.backends import triton_kernels

    return triton_kernels


W4A4_PATHS = ("int8", "int8t", "fp8")  # w4a4_gemm, w4a4_gemm_t (Yᵀ = W Xᵀ, split-K), fp8_gemm.w4a4_fp8
_CHOSEN: dict[tuple, str] = {}  # (M bucket, N, K, zero points) -> the path measured fastest on this GPU


def fp8_capable(device) -> bool:
    """FP8 ``_scaled_mm``: Ada/Hopper GPUs (compute capability 8.9+) and the CPU."""
    device = torch.device(device)
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def choose_w4a4(lin: TritonLinear, m: int) -> str:
    """The W4A4 path for ``lin`` at ``m`` tokens: ``QUANTBENCH_W4A4`` if set; on a GPU the fastest of the eligible
    paths, measured once per (M bucket, N, K, zero points) with ``triton.testing.do_bench`` and logged; else
    ``int8`` (the interpreter's exactness is what a CPU tests)."""
    forced = os.environ.get("QUANTBENCH_W4A4")
    if forced:
        if forced not in W4A4_PATHS:
            raise ConfigError(f"QUANTBENCH_W4A4={forced!r}: choose one of {', '.join(W4A4_PATHS)}")
        if forced == "fp8" and not lin.fp8_ok:
            raise ConfigError("QUANTBENCH_W4A4=fp8: this linear's activations or K are not exact on the FP8 path "
                              "(activations of at most 5 bits on an FP8-capable device)")
        return forced
    if lin.w.packed.device.type != "cuda":
        return "int8"
    import triton.testing

    bucket = lin.k._bucket(m)
    key = (bucket, lin.out_features, lin.in_features, lin.act.signed, lin.w.zero is None)
    if key not in _CHOSEN:
        dev = lin.w.packed.device
        q = torch.randint(-8, 8, (bucket, lin.in_features), dtype=torch.int8, device=dev)
        s, rs = torch.ones(bucket, device=dev), q.sum(1, dtype=torch.int32)
        z = None if lin.act.signed else torch.zeros(bucket, device=dev)
        times = {p: triton.testing.do_bench(lambda p=p: lin.gemm(p, q, s, z, rs, torch.bfloat16), warmup=5, rep=20)
                 for p in W4A4_PATHS if p != "fp8" or lin.fp8_ok}
        _CHOSEN[key] = min(times, key=times.get)
        log.info("triton backend: W4A4 %dx%dx%d (M bucket) -> %s (%s)", bucket, lin.out_features, lin.in_features,
                 _CHOSEN[key], ", ".join(f"{p} {t * 1e3:.0f} us" for p, t in times.items()))
    return _CHOSEN[key]


class TritonLinear(nn.Module):
    """One planned linear on the INT4 kernels (``w4a4`` when the plan quantizes activations, else ``w4a16``)."""

    def __init__(self, linear: nn.Linear, plan: LinearPlan, name: str = ""):
        super().__init__()
        if plan.weight is None:
            raise ConfigError(f"{name}: the triton backend needs quantized weights (the plan keeps this one FP)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        try:
            self.w: Int4Weight = int4_weight(plan.weight).to(linear.weight.device)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        self.bias = linear.bias
        self.act = plan.act
        pre = list(plan.pre)
        self.rotation, self.mix, self.onepass = None, None, None
        self.k = kernels()
        if self.act is not None:
            if self.act.granularity != "token" or self.act.bits > 8:
                raise ConfigError(f"{name}: the triton backend quantizes activations per token to at most 8 bits, "
                                  f"not {self.act.granularity}/{self.act.bits}")
            if self.w.group_size:
                raise ConfigError(f"{name}: W4A4 needs per-channel weights, not groups of {self.w.group_size}")
            pre, self.mix, self.rotation = fuse(pre)
            dev = linear.weight.device
            if self.mix is not None:
                if "left" in self.mix:  # padded to the kernel's tile once, not per call
                    self.mix["left"] = self.k.pad_left(self.mix["left"].float(), self.in_features // self.mix["block"])
                if "rotation" in self.mix:
                    self.mix["rotation"] = self.mix["rotation"].float().contiguous()
                if "perm" in self.mix:
                    self.mix["perm"] = self.mix["perm"].to(torch.int32)
                self.mix = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in self.mix.items()}
            if self.rotation is not None:
                self.rotation = self.rotation.to(dev)
            block = self.mix["block"] if self.mix else (self.rotation.shape[0] if self.rotation is not None else PACK)
            # one pass (x read once) where a row fits the kernel; else stage 1 (block_mix) and stage 2 (rotate_quant)
            self.onepass = {**(self.mix or {}), "block": block, "rotation2": self.rotation} \
                if self.k.onepass_fits(self.in_features, block) else None
            if self.onepass is None and self.mix is not None and "perm" in self.mix:  # the scatter's destinations
                self.mix["dst"] = torch.argsort(self.mix.pop("perm").long()).to(torch.int32)
        self.pre = nn.Sequential(*pre)
        self.fp8_ok = fp8_gemm.eligible(self.act, self.in_features) and fp8_capable(linear.weight.device)
        self._w8 = None  # the FP8 path's weight, made on its first use

    def gemm(self, path: str, q, s, z, rs, out_dtype):
        """The W4A4 GEMM on one of :data:`W4A4_PATHS` (all give the same integer accumulator)."""
        if path == "fp8":
            if self._w8 is None:
                self._w8 = fp8_gemm.fp8_weight(self.w)
            return fp8_gemm.w4a4_fp8(q, s, z, rs, self.w, self._w8, self.bias, out_dtype=out_dtype)
        gemm = self.k.w4a4_gemm_t if path == "int8t" else self.k.w4a4_gemm
        return gemm(q, s, z, rs, self.w, self.bias, out_dtype=out_dtype)

    def forward(self, x):
        shape = x.shape
        x2 = self.pre(x).reshape(-1, shape[-1])
        if self.act is None:
            y = self.k.w4a16(x2, self.w, self.bias)
        else:
            if self.onepass is not None:
                q, s, z, rs = self.k.transform_quant(x2, self.act, **self.onepass)
            else:
                if self.mix is not None:
                    x2 = self.k.block_mix(x2, **self.mix)
                q, s, z, rs = self.k.rotate_quant(x2, self.act, self.rotation)
            y = self.gemm(choose_w4a4(self, x2.shape[0]), q, s, z, rs, x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        act = f"a{self.act.bits}-{self.act.grid}" if self.act else "a16"
        fused = ""
        if self.mix is not None:
            fused += ", fused stage 1: " + "+".join(k for k in ("scale", "left", "rotation", "perm", "dst")
                                                    if k in self.mix)
        if self.rotation is not None:
            fused += f", fused rotation {self.rotation.shape[0]}"
        if self.act is not None:
            fused += ", one pass" if self.onepass is not None else ", two stages"
        if len(self.pre):
            fused += f", in torch first: {[type(t).__name__ for t in self.pre]}"
        return f"{self.in_features}, {self.out_features}, w{self.w.spec.bits}-{self.w.spec.grid}, {act}{fused}"


@BACKENDS.register("triton")
def realize(qm: QuantizedModel) -> nn.Module:
    """Swap every planned linear for a :class:`TritonLinear` (all built first, so a bad plan changes nothing) and
    apply the attention plans as the fake-quant backend does. Online transforms with no fused kernel run in
    PyTorch before the kernels: said here once, and in each module's ``repr``."""
    mods = {name: TritonLinear(qm.model.get_submodule(name), plan, name) for name, plan in qm.linears.items()}
    unfused = Counter(tuple(type(t).__name__ for t in m.pre) for m in mods.values() if len(m.pre))
    for kinds, n in unfused.items():
        log.warning("triton backend: %d linears run %s in PyTorch before the kernels (no fused kernel for it)",
                    n, " -> ".join(kinds))
    swap_modules(qm.model, mods)
    apply_attention_plans(qm)
    return qm.model
