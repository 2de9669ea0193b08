"""Hadamard matrices and fast Hadamard transforms for every size QuaRot supports (``n = K * 2^m``).

QuaRot (``spcl/QuaRot:fake_quant/hadamard_utils.py::get_hadK``) factors a size as ``K * 2^m`` with
``K in {172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12}`` (tried in that order) or ``K = 1``, and applies
``(H_K ⊗ H_2^m) / sqrt(n)``: a fast Walsh-Hadamard transform over the ``2^m`` axis, then a dense ``K x K``
multiply. QuaRot ships the ``H_K`` as tables from N. J. A. Sloane's library; any Hadamard matrix of order ``K``
gives an exactly orthogonal transform, so here they are *constructed* and checked (``H Hᵀ = K I``):

- Paley I (prime ``q ≡ 3 mod 4``, order ``q + 1``): 12, 20, 60, 108, 140;
- Paley II (prime ``q ≡ 1 mod 4``, order ``2(q + 1)``): 28, 36;
- Sylvester doubling: 40 = 2 x 20;
- Williamson (four symmetric circulants of odd order ``w``, order ``4w``): 52, 156, 172, from the published
  Williamson sequences of orders 13, 39 (Holzmann-Kharaghani-Orrick / Lončarić 2013) and 43 (Hall,
  *Combinatorial Theory*, 1983), as tabulated in SageMath ``sage.combinat.matrices.hadamard_matrix``.

Sizes used by real models: 11008 = 172·64 (LLaMA-2-7B FFN), 13824 = 108·128, 14336 = 28·512, 28672 = 28·1024,
5120 = 40·128, and the offline default SmolLM2-135M's 576 = 36·16 and 1536 = 12·128.
"""
from __future__ import annotations

import functools
import math

import torch

from quantbench.errors import ConfigError

K_ORDER = (172, 156, 140, 108, 60, 52, 36, 28, 40, 20, 12)  # QuaRot get_hadK's order of trial

_WILLIAMSON = {  # first rows (+ = 1, - = -1) of the symmetric circulants A, B, C, D
    13: ("++++-+--+-+++", "+---+-++-+---", "++---+--+---+", "++---+--+---+"),
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _legendre(a: int, q: int) -> int:
    a %= q
    return 0 if a == 0 else (1 if pow(a, (q - 1) // 2, q) == 1 else -1)


def _jacobsthal(q: int) -> torch.Tensor:
    return torch.tensor([[_legendre(j - i, q) for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Order q+1 for a prime q ≡ 3 (mod 4): H = I + [[0, 1ᵀ], [-1, Q]] (Q antisymmetric)."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q+1) for a prime q ≡ 1 (mod 4): C ⊗ [[1,-1],[-1,-1]] + I ⊗ [[1,1],[1,-1]], C = [[0,1ᵀ],[1,Q]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _williamson(w: int) -> torch.Tensor:
    """Order 4w from Williamson matrices: [[A,B,C,D],[-B,A,-D,C],[-C,D,A,-B],[-D,-C,B,A]]."""
    a, b, c, d = (torch.stack([torch.roll(torch.tensor([1.0 if ch == "+" else -1.0 for ch in row],
                                                       dtype=torch.float64), i) for i in range(w)])
                  for row in _WILLIAMSON[w])
    return torch.cat([torch.cat(r, 1) for r in ([a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a])])


def sylvester(n: int) -> torch.Tensor:
    """The ±1 Walsh-Hadamard matrix of a power-of-two order (float64)."""
    if not is_pow2(n):
        raise ConfigError(f"Sylvester Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


_BUILD = {12: lambda: _paley1(11), 20: lambda: _paley1(19), 60: lambda: _paley1(59), 108: lambda: _paley1(107),
          140: lambda: _paley1(139), 28: lambda: _paley2(13), 36: lambda: _paley2(17),
          40: lambda: torch.kron(sylvester(2), _paley1(19)), 52: lambda: _williamson(13),
          156: lambda: _williamson(39), 172: lambda: _williamson(43)}


@functools.lru_cache(maxsize=None)
def had_k(k: int) -> torch.Tensor:
    """The ±1 Hadamard matrix ``H_K`` of one of QuaRot's special orders (float64, ``H Hᵀ = K I``)."""
    return _BUILD[k]()


def factor(n: int) -> tuple[int, int]:
    """``(K, 2^m)`` with ``n = K * 2^m`` as QuaRot's ``get_hadK`` picks it; a clear error when none exists."""
    for k in K_ORDER:
        if n % k == 0 and is_pow2(n // k):
            return k, n // k
    if is_pow2(n):
        return 1, n
    raise ConfigError(
        f"no Hadamard transform of size {n}: it must be a power of two times one of {sorted(K_ORDER)} "
        f"(e.g. 11008 = 172*64, 14336 = 28*512); {n} is not"
    )


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim (a power of two): ``x Hₚ``."""
    p = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(*lead, p)
        h *= 2
    return x


def hadamard_transform(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """``x (H_K ⊗ H_2^m) / sqrt(n)`` over the last dim, computed in float32 (or float64 for float64 input).

    Row index ``i = a * 2^m + b``: FWHT over ``b`` then ``H_K`` over ``a``. Orthogonal, so its inverse is the
    same product with ``H_Kᵀ`` (see :func:`hadamard_matrix` for the dense form).
    """
    n = n or x.shape[-1]
    if x.shape[-1] != n:
        raise ConfigError(f"Hadamard of size {n} applied to a dimension of {x.shape[-1]}")
    k, p = factor(n)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = fwht(x.to(dt).reshape(*x.shape[:-1], k, p))
    if k > 1:
        y = torch.einsum("...ab,ac->...cb", y, had_k(k).to(device=x.device, dtype=dt))
    return (y.reshape(x.shape) / math.sqrt(n)).to(x.dtype)


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Dense orthogonal ``M`` with ``x M == hadamard_transform(x)`` (float64 by default)."""
    return hadamard_transform(torch.eye(n, dtype=torch.float64)).to(dtype)


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """QuaRot's randomized Hadamard ``diag(±1) · H / sqrt(n)`` (``hadamard_utils.random_hadamard_matrix``), float64."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return hadamard_transform(torch.diag(signs))


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (QuaRot ``--rotate_mode random``: QR of a Gaussian, signs fixed), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
