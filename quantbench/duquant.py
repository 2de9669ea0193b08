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
    """(score, certify, row, col) of the step's extreme entry in ``vals`` ``[rows, B]`` (first on ties).

    ``certify``: a row whose L2 norm is below it cannot change the pick (repo: it must beat the max or the min;
    paper: the largest magnitude)."""
    b = vals.shape[1]
    flat = vals.reshape(-1)
    if mode == "repo":
        imax, imin = int(flat.argmax()), int(flat.argmin())
        vmax, vmin = flat[imax].item(), flat[imin].item()
        i = imax if abs(vmax) > abs(vmin) else imin
        return vmax - vmin, min(vmax, -vmin), *divmod(i, b)
    i = int(flat.abs().argmax())
    v = abs(flat[i].item())
    return v, v, *divmod(i, b)


def _swap_index(row: int, col: int, mode: str, b: int) -> int:
    return row % b if mode == "repo" else col


def _finish(mats: list[torch.Tensor], steps: list[int], scores: list[float], b: int) -> Search:
    kept = int(torch.tensor(scores).argmin())
    r = torch.eye(b, dtype=torch.float64)
    for m in mats[:kept]:
        r = r @ m
    return Search(r, steps[:kept], scores, kept)


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
    return _finish(mats, idx, scores, b)


def greedy_rotation(x: torch.Tensor, b: int, steps: int, mode: str, gen: torch.Generator) -> Search:
    """Same result as :func:`greedy_rotation_reference`, computing only the rows that can hold the extreme."""
    _check(x, b, mode)
    v = x.reshape(-1, b).to(torch.float64)
    n = v.shape[0]
    norms = v.norm(dim=1)
    order = torch.argsort(norms, descending=True)
    sorted_norms = norms[order]
    base = _matrices(b, steps, mode, gen)
    acc = torch.eye(b, dtype=torch.float64)  # product of the steps so far

    def take(k):  # the k largest-norm rows, in ascending row order (so "first on ties" matches the full search)
        rows = torch.sort(order[:k]).values
        return rows, v[rows] @ acc

    k = min(n, 64)
    rows, cur = take(k)
    mats, idx, scores = [], [], []
    for s in range(steps + 1):
        while True:
            score, need, r, col = _pick(cur, mode)
            if k == n or sorted_norms[k].item() < need:  # no row outside can hold the pick
                break
            k = min(n, max(2 * k, int((sorted_norms >= need).sum())))
            rows, cur = take(k)
        scores.append(score)
        if s == steps:
            break
        j = _swap_index(int(rows[r]), col, mode, b)
        m = swapped(base(s), j)
        idx.append(j)
        mats.append(m)
        acc = acc @ m
        shrink = min(n, max(64, int((sorted_norms >= need / 2).sum())))  # rows likely to matter next step
        if shrink < k // 2:
            k = shrink
            rows, cur = take(k)
        else:
            cur = cur @ m
    return _finish(mats, idx, scores, b)


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
              gen: torch.Generator | None = None, fast: bool = True) -> Transform:
    """``online_duquant_cali``: (rotation, zigzag) x ``permutation_times``, then a final rotation, from ``x`` ``[T, C]``."""
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    search = greedy_rotation if fast else greedy_rotation_reference
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
