"""Online input transforms of a linear layer and how each folds into the weight (``LinearPlan.pre``).

Row-vector convention, as ``nn.Linear``: ``y = x Wᵀ``. A transform ``T`` applied online to ``x`` is compensated
by the weight ``T.fold(W)``, so ``F.linear(T(x), T.fold(W)) == F.linear(x, W)`` in exact arithmetic:
for an orthogonal ``M`` (``x -> x M``) the weight becomes ``W M``; for a smoothing scale (``x -> x / s``,
SmoothQuant Eq. 3) the weight becomes ``W diag(s)``. Methods fold offline what they can and leave the rest
online in the plan, where a kernel backend may fuse it with activation quantization.

Each transform is one typed object, composites included (DuQuant's ``R1 → P → R2`` is one
:class:`DuQuantRotation`, QuaRot's ``H_K ⊗ H_2^m`` one :class:`Hadamard`): a backend dispatches on the type and
never has to recognise a composite from a sequence of parts.
"""
from __future__ import annotations

import torch
from torch import nn

from quantbench import hadamard
from quantbench.errors import ConfigError


TRANSFORMS: dict[str, type] = {}  # class name -> class, for :meth:`OnlineTransform.from_state`


class OnlineTransform(nn.Module):
    """Base: ``forward`` transforms activations ``[..., C]``; ``fold`` gives the compensating weight.

    A transform is its buffers plus the integer attributes named in ``attrs``, which are also its constructor's
    arguments: :meth:`state` / :meth:`from_state` round-trip it (a cached plan, ``quantbench.planstore``)."""

    attrs: tuple[str, ...] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        TRANSFORMS[cls.__name__] = cls

    def fold(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def state(self) -> dict:
        return {"type": type(self).__name__, **{a: getattr(self, a) for a in self.attrs}, **dict(self.named_buffers())}

    @staticmethod
    def from_state(state: dict) -> OnlineTransform:
        kind = state["type"]
        if kind not in TRANSFORMS:
            raise ValueError(f"unknown online transform {kind!r}")
        return TRANSFORMS[kind](**{k: v for k, v in state.items() if k != "type"})


class Scale(OnlineTransform):
    """``x -> x / s`` (smoothing); the weight absorbs ``s`` column-wise."""

    def __init__(self, s: torch.Tensor):
        super().__init__()
        self.register_buffer("s", s.detach().clone())

    def forward(self, x):
        return x / self.s.to(x.dtype)

    def fold(self, weight):
        return weight * self.s.to(weight.dtype)


class Rotation(OnlineTransform):
    """``x -> x M`` for an orthogonal ``M`` of size C x C."""

    def __init__(self, m: torch.Tensor):
        super().__init__()
        self.register_buffer("m", m.detach().clone())

    def forward(self, x):
        return x @ self.m.to(x.dtype)

    def fold(self, weight):
        return weight @ self.m.to(weight.dtype)


class BlockRotation(OnlineTransform):
    """The same ``b x b`` orthogonal matrix on every contiguous block of ``b`` channels (DuQuant Remark 2)."""

    def __init__(self, r: torch.Tensor):
        super().__init__()
        self.register_buffer("r", r.detach().clone())

    def forward(self, x):
        b = self.r.shape[0]
        if x.shape[-1] % b:
            raise ConfigError(f"block rotation of size {b} cannot transform a dimension of {x.shape[-1]}")
        return (x.reshape(*x.shape[:-1], -1, b) @ self.r.to(x.dtype)).reshape(x.shape)

    fold = forward  # orthogonal: W -> W M, i.e. the same map on the weight's rows


class Permute(OnlineTransform):
    """``x -> x[..., perm]`` along channels only (never along tokens: any batch size and length)."""

    def __init__(self, perm: torch.Tensor):
        super().__init__()
        if not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
            raise ConfigError("Permute needs a permutation of 0..C-1")
        self.register_buffer("perm", perm.detach().clone().long())

    def forward(self, x):
        return x.index_select(-1, self.perm)

    fold = forward


class Hadamard(OnlineTransform):
    """``x -> x H_n / sqrt(n)`` over the last dim, ``n = K * 2^m`` (QuaRot's online Hadamard, e.g. on the down_proj
    input, ``quant_utils.py::ActQuantWrapper.forward``; also the per-head Q/K Hadamard after RoPE)."""

    def __init__(self, n: int):
        super().__init__()
        hadamard.factor(n)  # fail now, naming the size, if no Hadamard of this size exists
        self.n = n

    def forward(self, x):
        return hadamard.hadamard_transform(x, self.n)

    fold = forward
    attrs = ("n",)

    def extra_repr(self):
        return f"n={self.n}"


class HeadHadamard(OnlineTransform):
    """``x -> x (H_heads ⊗ I_head_dim)``: a Hadamard *across* heads, each head's channels kept together (QuaRot's
    o_proj input transform; with the per-head Hadamard fused into v_proj it makes ``H_heads ⊗ H_head_dim``)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        hadamard.factor(heads)
        self.heads, self.head_dim = heads, head_dim

    def forward(self, x):
        y = x.reshape(*x.shape[:-1], self.heads, self.head_dim).transpose(-1, -2)
        return hadamard.hadamard_transform(y, self.heads).transpose(-1, -2).reshape(x.shape)

    fold = forward
    attrs = ("heads", "head_dim")

    def extra_repr(self):
        return f"heads={self.heads}, head_dim={self.head_dim}"


class DuQuantRotation(OnlineTransform):
    """DuQuant's ``G = R1 · P1 · R2 (· P2 · R3 ...)`` as one transform (paper Eq. 5-6; ``Hsu1023/DuQuant:
    quantize/quantizer.py``, ``online_duquant_cali``): the ``i``-th ``b x b`` rotation applied to every contiguous
    block of ``b`` channels (Remark 2), then the ``i``-th channel permutation, ..., ending with a block rotation.

    ``r``: ``[n, b, b]`` rotations; ``perm``: ``[n - 1, C]`` permutations (``permutation_times = n - 1``)."""

    def __init__(self, r: torch.Tensor, perm: torch.Tensor):
        super().__init__()
        if r.dim() != 3 or r.shape[1] != r.shape[2] or perm.dim() != 2 or perm.shape[0] != r.shape[0] - 1:
            raise ConfigError(f"DuQuantRotation needs [n, b, b] rotations and [n-1, C] permutations, got "
                              f"{tuple(r.shape)} and {tuple(perm.shape)}")
        for p in perm:
            if not torch.equal(torch.sort(p).values, torch.arange(p.numel())):
                raise ConfigError("DuQuantRotation needs permutations of 0..C-1")
        self.register_buffer("r", r.detach().clone())
        self.register_buffer("perm", perm.detach().clone().long())

    @property
    def block(self) -> int:
        return self.r.shape[1]

    def forward(self, x):
        b = self.block
        if x.shape[-1] % b:
            raise ConfigError(f"block rotation of size {b} cannot transform a dimension of {x.shape[-1]}")
        for i in range(self.r.shape[0]):
            x = (x.reshape(*x.shape[:-1], -1, b) @ self.r[i].to(x.dtype)).reshape(x.shape)
            if i < self.perm.shape[0]:
                x = x.index_select(-1, self.perm[i])
        return x

    fold = forward  # orthogonal: W -> W G, the same map on the weight's rows

    def split_last(self) -> tuple[list[OnlineTransform], DuQuantRotation]:
        """``(head, tail)`` with ``tail`` the last ``R · P · R`` (or the single rotation) and ``head`` the parts
        before it as :class:`BlockRotation` / :class:`Permute` (empty for ``permutation_times <= 1``), so that
        ``G(x) = tail(head(x))``: for a backend that fuses only one ``R · P · R``."""
        n = self.r.shape[0]
        if n <= 2:
            return [], self
        head: list[OnlineTransform] = []
        for i in range(n - 2):
            head += [BlockRotation(self.r[i]), Permute(self.perm[i])]
        return head, DuQuantRotation(self.r[n - 2:], self.perm[n - 2:])

    def extra_repr(self):
        return f"block={self.block}, permutations={self.perm.shape[0]}"
