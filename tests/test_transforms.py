"""Invariance: an online transform and its folded weight leave the FP output unchanged (to 1e-5)."""
import pytest
import torch
import torch.nn.functional as F

from quantbench.errors import ConfigError
from quantbench.transforms import BlockRotation, DuQuantRotation, OnlineTransform, Permute, Rotation, Scale


def orthogonal(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def transforms(c=256):
    g = torch.Generator().manual_seed(1)
    return {
        "scale": [Scale(torch.rand(c, generator=g, dtype=torch.float64) * 10 + 0.1)],
        "rotation": [Rotation(orthogonal(c))],
        "block": [BlockRotation(orthogonal(64))],
        "duquant-chain": [Scale(torch.rand(c, generator=g, dtype=torch.float64) + 0.5), BlockRotation(orthogonal(64, 1)),
                          Permute(torch.randperm(c, generator=g)), BlockRotation(orthogonal(64, 2))],
    }


@pytest.mark.parametrize("name", list(transforms()))
def test_fold_invariance(name):
    chain = transforms()[name]
    x, w = torch.randn(3, 5, 256, dtype=torch.float64), torch.randn(96, 256, dtype=torch.float64)
    xt, wt = x, w
    for t in chain:
        xt, wt = t(xt), t.fold(wt)
    # float64 so the check is about the algebra, not fp32 accumulation order
    torch.testing.assert_close(F.linear(xt, wt), F.linear(x, w), rtol=1e-6, atol=1e-6)


def test_permute_is_per_channel_not_per_token():
    x = torch.arange(2 * 3 * 4.0).view(2, 3, 4)
    y = Permute(torch.tensor([3, 2, 1, 0]))(x)
    assert torch.equal(y, x.flip(-1))  # tokens and batch rows stay where they are, for any batch size


def test_shape_errors():
    with pytest.raises(ConfigError, match="block rotation of size 64 cannot transform a dimension of 96"):
        BlockRotation(orthogonal(64))(torch.randn(2, 96))
    with pytest.raises(ConfigError, match="permutation"):
        Permute(torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("perms", [0, 1, 2])
def test_duquant_rotation_is_its_chain_bit_for_bit_and_round_trips(perms):
    """DuQuant's ``G = R1 · P1 · R2 ...`` as one typed transform computes exactly what the chain of its parts does
    (forward and fold), splits into a head and the fusable tail with the same composition, and survives state()."""
    g = torch.Generator().manual_seed(perms)
    rs = [orthogonal(64, i).float().contiguous() for i in range(perms + 1)]  # row-major, as the search makes them
    ps = [torch.randperm(256, generator=g) for _ in range(perms)]
    t = DuQuantRotation(torch.stack(rs), torch.stack(ps) if ps else torch.empty(0, 256, dtype=torch.long))
    chain = [BlockRotation(rs[0])]
    for r, p in zip(rs[1:], ps):
        chain += [Permute(p), BlockRotation(r)]
    x, w = torch.randn(3, 5, 256), torch.randn(96, 256, dtype=torch.float64)
    y, v = x, w
    for c in chain:
        y, v = c(y), c.fold(v)
    assert torch.equal(t(x), y) and torch.equal(t.fold(w), v)
    head, tail = t.split_last()
    assert len(head) == 2 * max(perms - 1, 0) and tail.perm.shape[0] == min(perms, 1)
    z = x
    for c in [*head, tail]:
        z = c(z)
    assert torch.equal(z, y)
    back = OnlineTransform.from_state(t.state())
    assert type(back) is DuQuantRotation and torch.equal(back(x), y)
    with pytest.raises(ConfigError, match="permutations of 0..C-1"):
        DuQuantRotation(torch.stack(rs), torch.zeros(perms, 256, dtype=torch.long)) if perms else (_ for _ in ()).throw(
            ConfigError("permutations of 0..C-1"))
