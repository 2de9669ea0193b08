"""The two weight quantizers every method reuses: round-to-nearest and GPTQ (Frantar et al., 2023).

Both fill ``qm.linears[name].weight`` of an existing plan (whose online transforms are already folded into the
FP weights), so a method decides *what* each linear computes and these decide only how its weight is rounded.

GPTQ follows ``IST-DASLab/gptq:gptq.py::GPTQ.fasterquant`` as QuaRot vendors it (``fake_quant/gptq_utils.py``):
Hessian ``H = 2/N Σ x xᵀ`` of each linear's input over the calibration set, dead columns zeroed, damping
``percdamp · mean(diag H)``, upper Cholesky factor of ``H⁻¹``, columns quantized left to right in blocks of
``blocksize`` with the error ``(w - q) / [H⁻¹]_jj`` spread over the remaining columns (Eq. 3 / Alg. 1 of the
paper), optional act-order (columns by decreasing ``diag H``), group-wise scales found at each group's first
column, optional MSE clip search, and "true sequential" groups whose inputs are recomputed after the previous group
is quantized (``Adapter.SEQUENTIAL``: ``[k, v, q], [o], [up, gate], [down]`` on Llama; OPT ``[k, v, q], [out_proj],
[fc1], [fc2]`` and BLOOM ``[query_key_value], [dense], [dense_h_to_4h], [dense_4h_to_h]`` as AutoGPTQ's OPT/BLOOM
``inside_layer_modules``). Biases are kept as they are (GPTQ's ``opt.py``/``bloom.py`` quantize weights only). lm_head is never quantized.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from quantbench.errors import ConfigError
from quantbench.layerwise import BlockContext, run_blocks
from quantbench.plan import QuantizedModel
from quantbench.quant import QTensor, QuantSpec, _grouped, mse_clip, qparams, quantize, widen
from quantbench.simulate import online_view, unwrap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    percdamp: float = 0.01
    blocksize: int = 128
    act_order: bool = False
    static_groups: bool = False  # group scales from the unquantized weight (forced with act-order + groups)
    w_clip: bool = False  # QuaRot --w_clip: GPTQ's MSE shrink search (norm 2.4, grid 100, maxshrink 0.8)
    true_sequential: bool = True

    def __post_init__(self):
        if not 0 <= self.percdamp <= 1 or self.blocksize < 1:
            raise ConfigError(f"GPTQ needs 0 <= percdamp <= 1 and blocksize >= 1, got {self.percdamp}, {self.blocksize}")

    def to_dict(self) -> dict:
        return asdict(self)


def _check_finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        raise ConfigError(f"{name}: cannot quantize a tensor with NaN/inf values (shape {tuple(w.shape)})")


def round_to_nearest(qm: QuantizedModel, spec: QuantSpec, clip_search: bool = False, block: int | None = None) -> None:
    """RTN weights for every planned linear (QuaRot ``gptq_utils.py::rtn_fwrd``; ``clip_search`` = ``--w_clip``),
    or only those of decoder block ``block``."""
    names = list(qm.linears)
    if block is not None:
        names = [n for n in (qm.adapter.linear_name(block, r) for r in qm.adapter.LINEARS) if n in qm.linears]
    for name in tqdm(names, desc="rtn: quantize weights", leave=False, disable=block is not None):
        w = unwrap(qm.model.get_submodule(name)).weight.detach()
        try:  # quantize() refuses NaN/inf; the error names the layer
            p = mse_clip(_grouped(w, spec), spec) if clip_search else None
            qm.linears[name].weight = quantize(w, spec, p, p)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None


class Hessian:
    """Running ``H = 2/N Σ_samples x xᵀ`` exactly as GPTQ's ``add_batch`` accumulates it (fp32).

    Hessians given one ``shared`` memo (a list) compute ``xᵀx`` once for an input tensor they all receive (q/k/v
    read the same tensor): the same product, so the same bits, at a third of the cost."""

    def __init__(self, columns: int, device, shared: list | None = None):
        self.h = torch.zeros(columns, columns, device=device)
        self.n = 0
        self.shared = shared

    def add(self, x: torch.Tensor) -> None:
        seen = x
        x = widen(x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x)
        self.h = self.h.to(x.dtype)  # float64 inputs accumulate in float64
        batch = 1  # GPTQ counts sequences (one window per call here), not tokens
        self.h *= self.n / (self.n + batch)
        self.n += batch
        memo = self.shared
        if memo and memo[0] is seen and memo[1] == self.n:
            xtx = memo[2]
        else:
            x = math.sqrt(2 / self.n) * x
            xtx = x.t() @ x
            if memo is not None:
                memo[:] = [seen, self.n, xtx]
        self.h += xtx


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, cfg: GPTQConfig = GPTQConfig()) -> QTensor:
    """GPTQ-quantize one ``[out, in]`` weight given its input Hessian ``h`` (``[in, in]``); returns integer codes.

    Codes, scales and zero points come out in the original column order, so the result is an ordinary
    per-channel or contiguous-group :class:`QTensor` a kernel can consume. Act-order with groups therefore uses
    *static* groups (scales from the unquantized weight, GPTQ's ``--static-groups``), which keeps groups contiguous.
    """
    w = widen(w.detach()).clone()
    h = h.detach().to(w.dtype).clone()
    rows, cols = w.shape
    group = spec.group_size if spec.granularity == "group" else 0
    if spec.granularity not in ("channel", "group", "tensor"):
        raise ConfigError(f"GPTQ quantizes weights per channel, group or tensor, not per {spec.granularity}")
    if group and cols % group:
        raise ConfigError(f"group size {group} does not divide the dimension {cols}")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = bool(group) and (cfg.static_groups or cfg.act_order)

    def params(x):  # scale, zero (and clip ratio) for the rows of x (a column slice)
        if spec.granularity == "tensor":
            x = x.reshape(1, -1)
        p = mse_clip(x, spec) if cfg.w_clip else None
        return qparams(x, spec, p, p)

    ngroups = cols // group if group else 1
    scales = torch.empty(rows if spec.granularity != "tensor" else 1, ngroups, device=w.device)
    zeros = torch.empty_like(scales) if not spec.signed else None

    def set_group(g, x):
        s, z = params(x)
        scales[:, g] = s.reshape(-1)
        if zeros is not None:
            zeros[:, g] = z.reshape(-1)

    if not group:
        set_group(0, w)
    elif static:
        for g in range(ngroups):
            set_group(g, w[:, g * group:(g + 1) * group])

    perm = torch.argsort(torch.diag(h), descending=True) if cfg.act_order else torch.arange(cols, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    damp = cfg.percdamp * torch.mean(torch.diag(h))
    h[range(cols), range(cols)] += damp
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    qmin, qmax = spec.qrange
    codes = torch.empty(rows, cols, device=w.device)
    for i1 in range(0, cols, cfg.blocksize):
        i2 = min(i1 + cfg.blocksize, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if group and not static and col % group == 0:
                set_group(col // group, w[:, col:col + group])  # block-start state, as the reference reads W
            g = int(perm[col]) // group if group else 0
            s = scales[:, g]
            z = zeros[:, g] if zeros is not None else 0
            q = torch.clamp(torch.round(w1[:, i] / s) + z, qmin, qmax)
            codes[:, col] = q
            err = (w1[:, i] - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    if spec.granularity == "tensor":
        shape = (1, 1)
    elif group:
        shape = (rows, ngroups, 1)
    else:
        shape = (rows, 1)
    return QTensor(codes.to(spec.code_dtype), scales.reshape(shape),
                   zeros.reshape(shape) if zeros is not None else None, spec)


def gptq(qm: QuantizedModel, windows: torch.Tensor, spec: QuantSpec, cfg: GPTQConfig = GPTQConfig(),
         device: str = "cpu", key: str | None = None) -> dict:
    """GPTQ every planned linear block by block (QuaRot ``gptq_fwrd``), calibrating on the plan's *online view*:
    the planned online transforms active, activations unquantized. Returns timing info for provenance.

    Each block's checkpoint is its codes: a resumed block gets them back bit for bit (``key``: see
    :func:`quantbench.layerwise.run_blocks`)."""
    adapter = qm.adapter

    def names(ctx):
        return {r: adapter.linear_name(ctx.index, r) for r in adapter.LINEARS if adapter.linear_name(ctx.index, r) in qm.linears}

    def step(ctx: BlockContext) -> dict:
        gptq_block(qm, ctx, spec, cfg, outputs=True)
        return {r: qm.linears[n].weight.state() for r, n in names(ctx).items() if qm.linears[n].weight is not None}

    def restore(ctx: BlockContext, state: dict) -> None:
        lins = {r: unwrap(m) for r, m in adapter.linears(ctx.block).items()}
        for r, d in state.items():
            _set_weight(qm, adapter.linear_name(ctx.index, r), lins[r], QTensor.from_state(d, lins[r].weight.device))

    with online_view(qm):
        done = run_blocks(qm, windows, step, restore, key=key, tag="gptq", device=device)
    out = {"gptq": cfg.to_dict(), "gptq_wall_s": round(done.wall_s, 2), "gptq_per_block_s": round(done.per_block_s, 3)}
    return {**out, "gptq_resumed_blocks": done.resumed} if done.resumed else out


def _set_weight(qm: QuantizedModel, name: str, lin, qt: QTensor) -> None:
    """The plan takes the codes; the block's linear holds them dequantized, so what follows sees the quantized
    block (``gptq_fwrd``)."""
    if qt.codes.shape != lin.weight.shape:
        raise ConfigError(f"{name}: checkpointed codes {tuple(qt.codes.shape)} do not fit {tuple(lin.weight.shape)}")
    qm.linears[name].weight = qt
    lin.weight.data = qt.dequantize(lin.weight.dtype).to(lin.weight.device)


def gptq_block(qm: QuantizedModel, ctx: BlockContext, spec: QuantSpec, cfg: GPTQConfig, outputs: bool = False) -> None:
    """GPTQ the planned linears of block ``ctx.index`` on ``ctx.inputs``, true-sequential groups (``gptq_fwrd``);
    the block's linears then hold the dequantized weights, so what follows sees the quantized block. With
    ``outputs``, also the block's outputs (``ctx.outputs``). The passes replay attention once its linears are final
    (``BlockContext.replay``): the same values, fewer forwards."""
    with ctx.replay():
        _gptq_groups(qm, ctx, spec, cfg)
        if outputs:
            ctx.outputs = ctx.forward()


def _gptq_groups(qm: QuantizedModel, ctx: BlockContext, spec: QuantSpec, cfg: GPTQConfig) -> None:
    adapter, i, block = qm.adapter, ctx.index, ctx.block
    seq = adapter.SEQUENTIAL
    groups = seq if cfg.true_sequential else (tuple(r for g in seq for r in g),)
    lins = {role: unwrap(m) for role, m in adapter.linears(block).items()}
    for roles in groups:
        roles = [r for r in roles if adapter.linear_name(i, r) in qm.linears]
        if not roles:
            continue
        shared: list = []
        hs = {r: Hessian(lins[r].in_features, lins[r].weight.device, shared) for r in roles}
        ctx.feed({lins[r]: hs[r].add for r in roles})
        for r in roles:
            name = adapter.linear_name(i, r)
            _check_finite(name, lins[r].weight)
            try:
                qt = gptq_quantize(lins[r].weight, hs[r].h, spec, cfg)
            except ConfigError as e:
                raise ConfigError(f"{name}: {e}") from None
            except torch.linalg.LinAlgError as e:
                raise ConfigError(f"{name}: GPTQ Cholesky failed ({e}); raise percdamp") from None
            _set_weight(qm, name, lins[r], qt)
        ctx.settled(roles)


GPTQ_OPTIONS = GPTQConfig().to_dict()  # method options of every GPTQ-based method (reference defaults)
GPTQ_RANGES = {"percdamp": (0, 1), "blocksize": (1, None)}


def gptq_config(opts: dict) -> GPTQConfig:
    return GPTQConfig(**{k: opts[k] for k in GPTQ_OPTIONS})
