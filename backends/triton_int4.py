"""Triton INT4 backend: the plan's linears on the kernels of :mod:`quantbench.backends.triton_kernels`.

Per planned linear (weights of at most 4 bits, K a multiple of 64):

* activations quantized per token (at most 8 bits): the online transforms before the last one run in PyTorch
  exactly as in the fake-quant backend; a trailing block rotation (DuQuant's ``R2``, a power-of-two block) is fused
  into ``rotate_quant``; then ``w4a4_gemm`` (per-channel weights) with the zero-point epilogue;
* activations in floating point: ``w4a16_gemm`` (per-channel or grouped weights), split-K at decode sizes.

Attention (Q/K/V quantization) runs as in the fake-quant backend: these kernels cover the linears. A plan the kernels
cannot run (weights above 4 bits, grouped weights with quantized activations, K not a multiple of 64) is an error
naming the linear, never a silent fallback. Without a GPU the kernels run in the Triton interpreter (exact, slow).
"""
from __future__ import annotations

import torch
from torch import nn

from quantbench.backends import fake_quant
from quantbench.backends.int4 import Int4Weight, int4_weight
from quantbench.errors import ConfigError
from quantbench.plan import LinearPlan, QuantizedModel
from quantbench.registry import BACKENDS
from quantbench.transforms import BlockRotation


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
        self.rotation = None
        if self.act is not None:
            if self.act.granularity != "token" or self.act.bits > 8:
                raise ConfigError(f"{name}: the triton backend quantizes activations per token to at most 8 bits, "
                                  f"not {self.act.granularity}/{self.act.bits}")
            if self.w.group_size:
                raise ConfigError(f"{name}: W4A4 needs per-channel weights, not groups of {self.w.group_size}")
            last = pre[-1] if pre else None
            b = last.r.shape[0] if isinstance(last, BlockRotation) else 0
            if b >= 16 and not b & (b - 1):
                self.rotation = last.r.float().contiguous()  # fused into rotate_quant
                pre = pre[:-1]
        self.pre = nn.Sequential(*pre)
        self.k = kernels()

    def forward(self, x):
        shape = x.shape
        x2 = self.pre(x).reshape(-1, shape[-1])
        if self.act is None:
            y = self.k.w4a16_gemm(x2, self.w, self.bias)
        else:
            q, s, z, rs = self.k.rotate_quant(x2, self.act, self.rotation)
            y = self.k.w4a4_gemm(q, s, z, rs, self.w, self.bias, out_dtype=x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        act = f"a{self.act.bits}-{self.act.grid}" if self.act else "a16"
        fused = f", fused rotation {self.rotation.shape[0]}" if self.rotation is not None else ""
        return f"{self.in_features}, {self.out_features}, w{self.w.spec.bits}-{self.w.spec.grid}, {act}{fused}"


@BACKENDS.register("triton")
def realize(qm: QuantizedModel) -> nn.Module:
    """Swap every planned linear for a :class:`TritonLinear` (checked first, so a bad plan changes nothing) and
    hook the attention plans as the fake-quant backend does."""
    model = qm.model
    swaps = []
    for name, plan in qm.linears.items():
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        swaps.append((owner, attr, TritonLinear(getattr(owner, attr), plan, name)))
    for owner, attr, mod in swaps:
        setattr(owner, attr, mod)
    fake_quant.hook_attention(qm)
    return model
