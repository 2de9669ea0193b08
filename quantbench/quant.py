"""One quantizer for every method, backend and kernel reference (docs/architecture.md, Quantizers).

A :class:`QuantSpec` names a grid, a bit width, a granularity and a clip ratio; :func:`quantize` turns a tensor
into integer codes + scale (+ zero point), :func:`dequantize` inverts it, :func:`fake_quant` does both with a
straight-through estimator so learnable clipping (OmniQuant/DuQuant LWC) can train through it.

Grids (b = bits), each as its reference code computes it:

============  ==========================  =======================================================================
grid          integer range               scale / zero point (reference)
============  ==========================  =======================================================================
``sym``       [-2^(b-1), 2^(b-1)-1]       s = absmax / (2^(b-1)-1), z = 0  (QuaRot ``quant_utils.py`` get_minq_maxq)
``sym_pm``    [-(2^(b-1)-1), 2^(b-1)-1]   s = max(absmax, 1e-5) / (2^(b-1)-1)  (SmoothQuant ``fake_quant.py``)
``asym``      [0, 2^b-1]                  min/max forced to include 0, z = round(-min/s)  (QuaRot asym)
``minmax``    [0, 2^b-1]                  raw min/max, s clamped to [1e-5, 1e4], z = round(-min/s)
                                          (DuQuant/OmniQuant ``quantizer.py::UniformAffineQuantizer``)
``minmax_sym`` [0, 2^b-1]                 s = absmax / (2^(b-1)-1) clamped, z = 2^(b-1)-1  (their ``--symmetric``)
``sym_ct``    [-2^(b-1), 2^(b-1)-1]       s = absmax / ((2^b-1)/2), 0 -> fp32 eps, z = 0  (compressed-tensors
                                          ``calculate_qparams``, symmetric: what llm-compressor writes and a
                                          compressed-tensors checkpoint's dynamic activations compute; 7.5 at 4 bits)
============  ==========================  =======================================================================

Granularity: ``tensor``; ``channel`` (weights [out, in]: one scale per output row) and ``token`` (activations
[..., C]: one scale per token, computed at run time) both reduce over the last dim; ``group`` reduces over
contiguous groups of ``group_size`` along the last dim; ``head`` (Q/K/V only) is one scale per token *and head*
(OmniQuant/DuQuant attention quantizers), where ``token`` on Q/K/V means one scale per token across all heads
(QuaRot's ``k_groupsize=-1``). Clipping multiplies min and max (or absmax) by
``clip_ratio`` or, for LWC, by per-row factors ``sigmoid(bound)``. Rounding is ``torch.round`` (half to even) in
fp32, as in all four reference repos.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from quantbench.errors import ConfigError

GRIDS = ("sym", "sym_pm", "asym", "minmax", "minmax_sym", "sym_ct")
GRANULARITIES = ("tensor", "channel", "token", "group", "head")
FP_BITS = 16  # 16 bits means "keep in floating point", as in every reference repo (``--wbits 16``)
SCALE_MIN, SCALE_MAX = 1e-5, 1e4  # DuQuant/OmniQuant ``quantize/const.py`` CLIPMIN / CLIPMAX


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. ``bits`` is 2..15; 16 is represented by *no spec* (see :class:`QuantScheme`)."""

    bits: int
    grid: str = "sym"
    granularity: str = "channel"
    group_size: int = 0
    clip_ratio: float = 1.0

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits < FP_BITS:
            raise ConfigError(f"bit width {self.bits!r} is impossible: use 2..{FP_BITS - 1} bits (16 = floating point)")
        if self.grid not in GRIDS:
            raise ConfigError(f"unknown grid {self.grid!r}; known grids: {', '.join(GRIDS)}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"unknown granularity {self.granularity!r}; known: {', '.join(GRANULARITIES)}")
        if (self.granularity == "group") != (self.group_size > 0):
            raise ConfigError("group_size > 0 goes with granularity='group' (and only with it)")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ConfigError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def signed(self) -> bool:
        return self.grid in ("sym", "sym_pm", "sym_ct")

    @property
    def qrange(self) -> tuple[int, int]:
        b = self.bits
        if self.grid in ("sym", "sym_ct"):
            return -(2 ** (b - 1)), 2 ** (b - 1) - 1
        if self.grid == "sym_pm":
            return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
        return 0, 2**b - 1

    @property
    def code_dtype(self) -> torch.dtype:
        if self.bits <= 8:
            return torch.int8 if self.signed else torch.uint8
        return torch.int16  # <= 15 bits, signed or not

    def to_dict(self) -> dict:
        return asdict(self)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the algorithms compute in for a model of ``dtype``: float32 (the reference repos'
    ``.float()``), or float64 for a float64 model (``--dtype float64``, the regression check's dtype: there no
    CPU's SIMD width or BLAS flips a rounding)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`compute_dtype` (``x.float()`` unless it is float64)."""
    return x.to(compute_dtype(x.dtype))


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` so that the reduction for one scale is the last dim."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity == "group":
        c = x.shape[-1]
        if c % spec.group_size:
            raise ConfigError(
                f"group size {spec.group_size} does not divide the dimension {c}; "
                f"pick a divisor of {c} or per-channel quantization"
            )
        return x.reshape(*x.shape[:-1], c // spec.group_size, spec.group_size)
    return x


def qparams(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None):
    """Scale and zero point for ``x`` already viewed by :func:`_grouped` (reduction over the last dim).

    ``lo``/``hi`` are optional per-row clip factors (LWC: ``sigmoid(lowbound)``, ``sigmoid(upbound)``) and take
    precedence over ``spec.clip_ratio``. Returns fp32 tensors shaped ``[..., 1]``; zero is None for signed grids.
    """
    xf = x.float()
    xmin = xf.amin(-1, keepdim=True)
    xmax = xf.amax(-1, keepdim=True)
    lo = spec.clip_ratio if lo is None else lo
    hi = spec.clip_ratio if hi is None else hi
    xmin, xmax = xmin * lo, xmax * hi
    qmin, qmax = spec.qrange
    b = spec.bits
    if spec.grid == "sym":  # QuaRot: all-zero rows get scale 1
        absmax = torch.maximum(xmin.abs(), xmax)
        scale = absmax / qmax
        return torch.where(absmax == 0, torch.ones_like(scale), scale), None
    if spec.grid == "sym_ct":  # the range is forced to include 0 (max(|min(x,0)|, max(x,0)) = absmax)
        scale = torch.maximum(xmin.abs(), xmax.abs()) / ((qmax - qmin) / 2)
        return torch.where(scale == 0, torch.finfo(scale.dtype).eps, scale), None
    if spec.grid == "sym_pm":
        return torch.maximum(xmin.abs(), xmax.abs()).clamp(min=SCALE_MIN) / qmax, None
    if spec.grid == "asym":  # QuaRot asym: 0 forced into range; an all-zero row gets [-1, 1]
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
        both0 = (xmin == 0) & (xmax == 0)
        xmin, xmax = torch.where(both0, -1.0, xmin), torch.where(both0, 1.0, xmax)
        scale = (xmax - xmin) / qmax
        return scale, torch.round(-xmin / scale)
    if spec.grid == "minmax":
        scale = ((xmax - xmin) / qmax).clamp(SCALE_MIN, SCALE_MAX)
        return scale, torch.round((-xmin / scale).clamp(-SCALE_MAX, SCALE_MAX))
    # minmax_sym
    scale = (torch.maximum(xmin.abs(), xmax.abs()) / (2 ** (b - 1) - 1)).clamp(SCALE_MIN, SCALE_MAX)
    return scale, torch.full_like(scale, 2 ** (b - 1) - 1)


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round half to even; straight-through gradient when ``x`` needs one (OmniQuant ``round_ste``)."""
    if x.requires_grad:
        return x + (torch.round(x) - x).detach()
    return torch.round(x)


@dataclass
class QTensor:
    """Integer codes + per-row/group scale (+ zero point): what a backend receives for a weight."""

    codes: torch.Tensor  # original shape, dtype spec.code_dtype
    scale: torch.Tensor  # fp32, grouped shape [..., 1]
    zero: torch.Tensor | None
    spec: QuantSpec

    def state(self) -> dict:
        """Tensors and numbers only (``torch.load(weights_only=True)``): cached plans, block checkpoints. Codes of
        at most 4 bits are stored two per byte (``code - qmin`` in a nibble, even index low)."""
        codes = self.codes
        if self.spec.bits <= 4:
            flat = (codes.reshape(-1).to(torch.int16) - self.spec.qrange[0]).to(torch.uint8)
            flat = torch.cat([flat, flat.new_zeros(flat.numel() % 2)])
            codes = flat[0::2] | (flat[1::2] << 4)
        return {"codes": codes, "shape": list(self.codes.shape), "scale": self.scale, "zero": self.zero,
                "spec": self.spec.to_dict()}

    @staticmethod
    def from_state(d: dict, device=None) -> QTensor:
        spec = QuantSpec(**d["spec"])
        codes = d["codes"]
        if spec.bits <= 4:
            n = math.prod(d["shape"])
            flat = torch.stack([codes & 15, codes >> 4], -1).reshape(-1)[:n]
            codes = (flat.to(torch.int16) + spec.qrange[0]).to(spec.code_dtype).reshape(d["shape"])
        mv = (lambda t: t.to(device)) if device is not None else (lambda t: t)  # noqa: E731
        return QTensor(mv(codes), mv(d["scale"]), mv(d["zero"]) if d["zero"] is not None else None, spec)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = _grouped(self.codes, self.spec).float()
        if self.zero is not None:
            q = q - self.zero
        return (q * self.scale).reshape(self.codes.shape).to(dtype)


def quantize(x: torch.Tensor, spec: QuantSpec, lo=None, hi=None) -> QTensor:
    """Integer codes of ``x`` on ``spec``'s grid (finite inputs only)."""
    if not torch.isfinite(x).all():
        raise ConfigError(f"cannot quantize a tensor with NaN/inf values (shape {tuple(x.shape)})")
    g = _grouped(x, spec)
    scale, zero = qparams(g, spec, lo, hi)
    q = torch.round(g.float() / scale)
    if zero is not None:
        q = q + zero
    qmin, qmax = spec.qrange
    codes = q.clamp(qmin, qmax).reshape(x.shape).to(spec.code_dtype)
    return QTensor(codes, scale, zero, spec)


def mse_clip(x: torch.Tensor, spec: QuantSpec, norm: float = 2.4, grid: int = 100, maxshrink: float = 0.8):
    """Per-row clip ratio ``p`` minimising ``sum |Q_p(x) - x|^norm`` over ``p = 1 - i/grid``, ``i < maxshrink*grid``.

    GPTQ's ``Quantizer.find_params(mse=True)`` as QuaRot's ``--w_clip`` uses it (``quant_utils.py::WeightQuantizer``,
    norm 2.4, grid 100, maxshrink 0.8). ``x`` is already viewed by :func:`_grouped`; returns ``[..., 1]`` fp32, to be
    passed as ``lo = hi = p`` to :func:`qparams` / :func:`quantize`.
    """
    g = widen(x)
    best = torch.full(g.shape[:-1] + (1,), float("inf"), device=g.device, dtype=g.dtype)
    best_p = torch.ones_like(best)
    qmin, qmax = spec.qrange
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        scale, zero = qparams(g, spec, p, p)
        zero = 0 if zero is None else zero
        q = (torch.clamp(torch.round(g / scale) + zero, qmin, qmax) - zero) * scale
        err = (q - g).abs().pow(norm).sum(-1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        best_p = torch.where(better, torch.full_like(best_p, p), best_p)
    return best_p


def fake_quant(x: torch.Tensor, spec: QuantSpec | None, lo=None, hi=None) -> torch.Tensor:
    """Quantize-dequantize ``x`` (same math as :func:`quantize` + :meth:`QTensor.dequantize`), STE gradients."""
    if spec is None:
        return x
    g = _grouped(x, spec)
    scale, zero = qparams(g, spec, lo, hi)
    q = _round(g.float() / scale)
    if zero is not None:
        q = q + zero
    qmin, qmax = spec.qrange
    q = q.clamp(qmin, qmax)
    if zero is not None:
        q = q - zero
    return (q * scale).reshape(x.shape).to(x.dtype)


class LearnableClip(nn.Module):
    """LWC: per-row clip factors ``sigmoid(upbound)``, ``sigmoid(lowbound)``, init 4.0 (OmniQuant Eq. 2;
    ``OpenGVLab/OmniQuant:quantize/quantizer.py`` L68-80). Use as ``fake_quant(w, spec, *clip())``."""

    def __init__(self, rows: int, groups: int = 1, init: float = 4.0):
        super().__init__()
        shape = (rows, 1) if groups == 1 else (rows, groups, 1)
        self.upbound = nn.Parameter(torch.full(shape, init))
        self.lowbound = nn.Parameter(torch.full(shape, init))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.lowbound), torch.sigmoid(self.upbound)


# --------------------------------------------------------------------------------------------- schemes

_TOKEN = re.compile(r"(kvg|ag|kv|w|a|q|k|v|g)(\d+)")
GROUP_KEY = {"w": "g", "a": "ag", "k": "kvg", "v": "kvg"}  # tensor -> the token that sets its group size


@dataclass(frozen=True)
class QuantScheme:
    """W/A/Q/K/V specs of a run. ``None`` = kept in floating point (16 bits)."""

    w: QuantSpec | None = None
    a: QuantSpec | None = None
    q: QuantSpec | None = None
    k: QuantSpec | None = None
    v: QuantSpec | None = None
    name: str = field(default="w16a16", compare=False)

    def to_dict(self) -> dict:
        return {"name": self.name, **{t: (getattr(self, t).to_dict() if getattr(self, t) else None) for t in "waqkv"}}


DEFAULT_SPECS = {  # what a scheme string means when a method does not say otherwise (QuaRot's RTN conventions)
    "w": QuantSpec(4, "sym", "channel"),
    "a": QuantSpec(4, "sym", "token"),
    "q": QuantSpec(4, "sym", "token"),
    "k": QuantSpec(4, "sym", "token"),
    "v": QuantSpec(4, "sym", "token"),
}


def override_specs(defaults: dict[str, QuantSpec], overrides: dict[str, dict]) -> dict[str, QuantSpec]:
    """A method's default specs with user overrides, e.g. ``{"w": {"grid": "minmax"}, "a": {"clip_ratio": 0.9}}``."""
    out = {**DEFAULT_SPECS, **defaults}
    for t, fields in overrides.items():
        if t not in out:
            raise ConfigError(f"no quantizer {t!r} to override; tensors: {', '.join(out)}")
        bad = set(fields) - {"grid", "granularity", "group_size", "clip_ratio"}
        if bad:
            raise ConfigError(f"cannot override {sorted(bad)} of the {t!r} quantizer")
        out[t] = replace(out[t], **fields)
    return out


def parse_scheme(text: str, defaults: dict[str, QuantSpec] | None = None) -> QuantScheme:
    """Parse ``w4a4``, ``w4a16g128``, ``w4a4kv4``, ``w8a8``, ``w3a16``, ``w2a16g64``, ``w4a4q4kv4ag128``...

    Tokens: ``w``/``a``/``q``/``k``/``v``/``kv`` + bits; ``g`` = weight group size (``w4a16g128`` is the usual
    "W4A16 g128"); ``ag`` / ``kvg`` = activation / KV group sizes. ``w`` and ``a`` are required; 16 bits means
    floating point. ``defaults`` gives each tensor's grid and granularity (a method's conventions).
    """
    s = text.strip().lower()
    toks = _TOKEN.findall(s)
    if not toks or "".join(k + v for k, v in toks) != s:
        raise ConfigError(f"cannot parse quantization scheme {text!r}; expected e.g. w4a4, w4a16g128, w4a4kv4")
    vals: dict[str, int] = {}
    for key, num in toks:
        for k in ("k", "v") if key == "kv" else (key,):
            if k in vals:
                raise ConfigError(f"scheme {text!r} sets {k!r} twice")
            vals[k] = int(num)
    if "w" not in vals or "a" not in vals:
        raise ConfigError(f"scheme {text!r} must give both weight and activation bits (e.g. w4a16)")
    specs = {**DEFAULT_SPECS, **(defaults or {})}
    out = {}
    for t in "waqkv":
        bits = vals.get(t, FP_BITS)
        if not 2 <= bits <= FP_BITS:
            raise ConfigError(f"bit width {bits} for {t!r} in {text!r} is impossible: use 2..16 (16 = floating point)")
        if bits == FP_BITS:
            continue
        group = vals.get(GROUP_KEY.get(t, ""), 0)
        base = replace(specs[t], bits=bits)
        out[t] = replace(base, granularity="group", group_size=group) if group else base
    return QuantScheme(**out, name=canonical_name(vals))


def canonical_name(vals: dict[str, int]) -> str:
    """Stable scheme name: w, a, then q, kv (or k, v), then group sizes; no-op tokens (``kv16``, a group size of
    a floating-point tensor) are dropped so equal schemes get equal names (and config hashes)."""
    vals = {t: b for t, b in vals.items() if not (t in "qkv" and b == FP_BITS)}
    vals = {t: b for t, b in vals.items() if t not in GROUP_KEY.values()
            or any(vals.get(x, FP_BITS) < FP_BITS for x, g in GROUP_KEY.items() if g == t)}
    parts = [f"w{vals['w']}", f"a{vals['a']}"]
    if "q" in vals:
        parts.append(f"q{vals['q']}")
    if "k" in vals and vals.get("k") == vals.get("v"):
        parts.append(f"kv{vals['k']}")
    else:
        parts += [f"{t}{vals[t]}" for t in "kv" if t in vals]
    parts += [f"{t}{vals[t]}" for t in ("g", "ag", "kvg") if vals.get(t)]
    return "".join(parts)
