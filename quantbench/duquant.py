"""DuQuant's transform search (Lin et al., NeurIPS 2024; ``Hsu1023/DuQuant:quantize/quantizer.py``).

For one linear input ``X`` ``[T, C]`` it builds ``G = R1 · P · R2``: a greedy block rotation ``R1`` (one ``B x B``
matrix shared by all ``C/B`` blocks, paper Remark 2), a zigzag channel permutation ``P`` that balances the blocks'
outlier mass (paper §3.2, Thm. 2), and a second greedy rotation ``R2`` (``permutation_times = 1``).

Greedy rotation (``UniformAffineQuantizer.rotation``): view ``X`` as ``[T*K, B]`` rows; at each of ``N`` steps find
the extreme entry, swap its index with 0 in a fixed orthogonal ``R̃Q`` (``E_j R̃ Q E_j``: ``R̃`` a Givens product with
a uniform first row, ``Q = diag(1, Q')`` random orthogonal), and right-multiply; finally keep the prefix of steps
with the best score. Two modes, recorded with every result:

- ``repo`` (default, the code): score = range ``max - min``; swap index = the *row* index of the extreme entry
  in the ``[T*K, B]`` view, mod ``B``; one ``Q'`` per search;
- ``paper`` (Eq. 2-3, Alg. 1): score = ``max |X|``; swap index = the outlier *channel*; a fresh ``Q'`` per step.

:func:`greedy_rotation` is exact but avoids the full ``[T*K, B] x [B, B]`` product per step: an orthogonal block
rotation keeps every row's L2 norm, and no entry can exceed its row's norm, so only rows whose norm reaches the
current extreme can hold it. It tracks those rows (doubling the set whenever a row outside could still win) and
returns the same steps as :func:`greedy_rotation_reference`, the straightforward loop kept as the test oracle.
Both search in float64, so the two can only disagree on exact ties.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from quantbench.errors import ConfigError

MODES = ("repo", "paper")


@functools.lru_cache(maxsize=8)
def givens_init(n: int) -> torch.Tensor:
    """``R̃`` of ``get_rot.py``: Givens rotations in planes (i, i+1) with ``cos = 1/sqrt(i+2)``, then rows and
    columns 0 and n-1 swapped; orthogonal with first row ``1/sqrt(n)`` (spreads channel 0 uniformly)."""
    r = torch.eye(n, dtype=torch.float64)
    for i in range(n - 1):
        g = torch.eye(n, dtype=torch.float64)
        c, s = 1 / math.sqrt(i + 2), math.sqrt(i + 1) / math.sqrt(i + 2)
        g[i, i], g[i, i + 1], g[i + 1, i], g[i + 1, i + 1] = c, -s, s, c
        r = g @ r
    idx = list(range(n))
    idx[0], idx[-1] = idx[-1], idx[0]
    return r[idx][:, idx].clone()


def step_matrix(n: int, gen: torch.Generator) -> torch.Tensor:
    """``R̃ · diag(1, Q')`` with ``Q'`` from the QR of a Gaussian (no sign fix, as ``utils.py::get_rot``)."""
    q = torch.eye(n, dtype=torch.float64)
    if n > 1:
        q[1:, 1:] = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=gen, dtype=torch.float64))[0]
    return givens_init(n) @ q


def swapped(m: torch.Tensor, j: int) -> torch.Tensor:
    """``E_j M E_j``: rows then columns 0 and j exchanged (``utils.py::exchange_row_col``)."""
    m = m.clone()
    if j:
        m[[0, j]] = m[[j, 0]]
        m[:, [0, j]] = m[:, [j, 0]]
    return m


@dataclass
class Search:
    """Result of one greedy search: the chosen rotation and what the search saw."""

    rotation: torch.Tensor  # B x B float64
    steps: list[int]  # swap indices of the kept steps
    scores: list[float]  # score before each step, and after the last (length N + 1)
    kept: int  # number of steps kept (argmin of scores)


def _pick(vals: torch.Tensor, mode: str) -> tuple[float, float, int, int]:
    """(score, certify, row, col) of the step's extreme entry in ``vals`` ``[rows, B]`` (first on ties, in row-major
    order: the first row holding the extreme, then its first column; row reductions first, as a flat argmax over
    all entries is several times slower).

    ``certify``: a row whose L2 norm is below it cannot change the pick (repo: it must beat the max or the min;
    paper: the largest magnitude)."""
    if mode == "repo":
        rmax, rmin = int(vals.amax(1).argmax()), int(vals.amin(1).argmin())
        cmax, cmin = int(vals[rmax].argmax()), int(vals[rmin].argmin())
        vmax, vmin = vals[rmax, cmax].item(), vals[rmin, cmin].item()
        r, c = (rmax, cmax) if abs(vmax) > abs(vmin) else (rmin, cmin)
        return vmax - vmin, min(vmax, -vmin), r, c
    mag = vals.abs()
    r = int(mag.amax(1).argmax())
    c = int(mag[r].argmax())
    v = mag[r, c].item()
    return v, v, r, c


def _swap_index(row: int, col: int, mode: str, b: int) -> int:
    return row % b if mode == "repo" else col


def _finish(prods: list[torch.Tensor], steps: list[int], scores: list[float]) -> Search:
    """Keep the best prefix of steps; ``prods[k]`` is the product of the first ``k`` step matrices."""
    kept = int(torch.tensor(scores).argmin())
    return Search(prods[kept].to(torch.float64), steps[:kept], scores, kept)


def _products(mats: list[torch.Tensor], b: int) -> list[torch.Tensor]:
    r = [torch.eye(b, dtype=torch.float64)]
    for m in mats:
        r.append(r[-1] @ m)
    return r


def _matrices(b: int, steps: int, mode: str, gen: torch.Generator):
    """The per-step base matrices: one for the whole search (repo) or a fresh one per step (paper)."""
    if mode == "repo":
        m = step_matrix(b, gen)
        return lambda _s: m
    return lambda _s: step_matrix(b, gen)


def _check(x: torch.Tensor, b: int, mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown DuQuant mode {mode!r}; choose one of {', '.join(MODES)}")
    if x.shape[-1] % b:
        raise ConfigError(f"DuQuant block size {b} does not divide the dimension {x.shape[-1]}")


def greedy_rotation_reference(x: torch.Tensor, b: int, steps: int, mode: str, gen: torch.Generator) -> Search:
    """The reference loop as written: the full ``[T*K, B]`` product at every step (the test oracle)."""
    _check(x, b, mode)
    v = x.reshape(-1, b).to(torch.float64)
    base = _matrices(b, steps, mode, gen)
    mats, idx, scores = [], [], []
    for s in range(steps + 1):
        score, _, row, col = _pick(v, mode)
        scores.append(score)
        if s == steps:
            break
        j = _swap_index(row, col, mode, b)
        m = swapped(base(s), j)
        idx.append(j)
        mats.append(m)
        v = v @ m
    return _finish(_products(mats, b), idx, scores)


SEARCH_DTYPES = ("float64", "float32")
SCREEN_ROWS = 1024  # below this many candidate rows the float64 product itself is cheaper than a screen
_U32 = 2.0 ** -24  # unit roundoff of float32


def _screen_tolerance(b: int) -> float:
    """A bound, relative to the row's L2 norm, on ``|fl32(v · a) - v · a|`` for one entry of ``v @ acc`` computed in
    float32 from float64 ``v`` and orthonormal ``acc``: rounding both operands (2u) plus a length-``b`` dot product
    in any summation order (``γ_b``, Higham Thm. 3.5), times ``Σ|v_i||a_i| <= ‖v‖ ‖a‖ = ‖v‖``; 1 % of headroom for
    ``acc``'s own float64 drift from orthonormality."""
    g = (b + 2) * _U32
    return 1.01 * g / (1 - g)


def _pick_screened(v64: torch.Tensor, rows: torch.Tensor, cur: torch.Tensor, slack: float, acc: torch.Tensor,
                   mode: str) -> tuple[float, float, int, int]:
    """:func:`_pick` of the float64 product ``v64[rows] @ acc``, found from its float32 screen ``cur`` (``slack``: a
    bound on any entry's screening error): only rows whose screened extreme is within ``2 slack`` of the screened
    winner can hold the exact one; those few are computed in float64 and picked from, in ascending row order (first
    on ties)."""
    if mode == "repo":
        hi, lo = cur.amax(1), cur.amin(1)
        cand = (hi >= hi.max() - 2 * slack) | (lo <= lo.min() + 2 * slack)
    else:
        mag = cur.abs().amax(1)
        cand = mag >= mag.max() - 2 * slack
    idx = cand.nonzero().flatten()
    score, need, r, col = _pick(v64[rows[idx]] @ acc, mode)
    return score, need, int(idx[r]), col


def greedy_rotation(x: torch.Tensor, b: int, steps: int, mode: str, gen: torch.Generator,
                    dtype: str = "float64") -> Search:
    """Same result as :func:`greedy_rotation_reference` (``dtype`` float64), computing only what can hold the extreme.

    Rows: an orthogonal block rotation keeps every row's L2 norm and no entry exceeds its row's norm, so only the
    rows whose norm reaches the current extreme take part (the set doubles whenever a row outside could still win).
    Entries: each step screens those rows in float32 (``v @ acc``, from scratch, so no error accumulates) and
    computes in float64 only the rows the screen's error bound cannot rule out (:func:`_pick_screened`); with at most
    :data:`SCREEN_ROWS` rows left it computes them in float64 directly. The step product ``acc`` is kept in float64
    and is the returned rotation. ``dtype="float32"`` is the whole search in float32 (screen values picked directly,
    ``acc`` in float32): faster, not exact."""
    _check(x, b, mode)
    if dtype not in SEARCH_DTYPES:
        raise ConfigError(f"unknown DuQuant search dtype {dtype!r}; choose one of {', '.join(SEARCH_DTYPES)}")
    exact = dtype == "float64"
    v = x.reshape(-1, b).to(torch.float64)
    v32 = v.float()
    n = v.shape[0]
    norms = v.norm(dim=1)
    order = torch.argsort(norms, descending=True)
    sorted_norms = norms[order]
    rel = _screen_tolerance(b)
    base = _matrices(b, steps, mode, gen)
    ascending = -sorted_norms

    def at_least(t: float) -> int:  # how many rows have a norm >= t
        return int(torch.searchsorted(ascending, torch.tensor([-t], dtype=ascending.dtype), right=True))

    prods = [torch.eye(b, dtype=torch.float64 if exact else torch.float32)]  # prods[s]: product of the first s steps

    def take(k):  # the k largest-norm rows, in ascending row order (so "first on ties" matches the full search)
        rows = torch.sort(order[:k]).values
        return rows, (v if exact and k <= SCREEN_ROWS else v32)[rows], rel * sorted_norms[0].item()

    k = min(n, 64)
    rows, sub, slack = take(k)
    idx, scores, mats = [], [], {}
    for s in range(steps + 1):
        acc = prods[-1]
        while True:
            if exact and k > SCREEN_ROWS:
                score, need, r, col = _pick_screened(v, rows, sub @ acc.float(), slack, acc, mode)
            else:  # few rows (float64 is as cheap as a screen) or the float32 search: pick from the product
                score, need, r, col = _pick(sub @ acc, mode)
            if k == n or sorted_norms[k].item() < need:  # no row outside can hold the pick
                break
            k = min(n, max(2 * k, at_least(need)))
            rows, sub, slack = take(k)
        scores.append(score)
        if s == steps:
            break
        j = _swap_index(int(rows[r]), col, mode, b)
        m = mats.get(j)
        if m is None:
            m = swapped(base(s), j)
            m = m if exact else m.float()
            if mode == "repo":  # one base matrix per search, so one E_j M E_j per index (paper: a new one per step)
                mats[j] = m
        idx.append(j)
        prods.append(acc @ m)
        shrink = min(n, max(64, at_least(need / 2)))  # rows likely to matter next step
        if shrink < k // 2:
            k = shrink
            rows, sub, slack = take(k)
    return _finish(prods, idx, scores)


def zigzag(x: torch.Tensor, b: int) -> torch.Tensor:
    """Zigzag permutation (``permutation_zigzag``): channels by decreasing ``max_t |x|`` dealt to the ``C/B`` blocks
    back and forth (0, 1, .., K-1, K-1, .., 0, 0, 1, ..), each block then sorted by decreasing max."""
    c = x.shape[-1]
    if c % b:
        raise ConfigError(f"DuQuant block size {b} does not divide the dimension {c}")
    m = x.reshape(-1, c).abs().amax(0).tolist()
    order = sorted(range(c), key=lambda i: m[i], reverse=True)  # stable, as the reference's list.sort
    k = c // b
    blocks: list[list[int]] = [[] for _ in range(k)]
    cur, up = 0, True
    for ch in order:
        blocks[cur].append(ch)
        if up:
            cur += 1
            if cur == k:
                cur, up = k - 1, False
        else:
            cur -= 1
            if cur == -1:
                cur, up = 0, True
    return torch.tensor([ch for blk in blocks for ch in sorted(blk, key=lambda i: m[i], reverse=True)])


def block_rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    b = r.shape[0]
    return (x.reshape(-1, b) @ r.to(x.dtype)).reshape(x.shape)


@dataclass
class Transform:
    """``G = R1 · P · R2`` for one input (``rotations`` has permutation_times + 1 entries)."""

    rotations: list[torch.Tensor]
    perms: list[torch.Tensor]
    searches: list[Search]


def calibrate(x: torch.Tensor, b: int, steps: int = 256, permutation_times: int = 1, mode: str = "repo",
              gen: torch.Generator | None = None, fast: bool = True, dtype: str = "float64") -> Transform:
    """``online_duquant_cali``: (rotation, zigzag) x ``permutation_times``, then a final rotation, from ``x`` ``[T, C]``
    (``fast``: :func:`greedy_rotation` with its search ``dtype``; otherwise the reference loop)."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)

    def search(x, b, steps, mode, gen):
        return greedy_rotation(x, b, steps, mode, gen, dtype) if fast else greedy_rotation_reference(x, b, steps, mode, gen)

    x = x.reshape(-1, x.shape[-1]).to(torch.float64)
    rots, perms, found = [], [], []
    for _ in range(permutation_times):
        s = search(x, b, steps, mode, gen)
        x = block_rotate(x, s.rotation)
        p = zigzag(x, b)
        x = x[:, p]
        rots.append(s.rotation)
        perms.append(p)
        found.append(s)
    s = search(x, b, steps, mode, gen)
    return Transform(rots + [s.rotation], perms, found + [s])
