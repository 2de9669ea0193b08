"""Invariance: an online transform and its folded weight leave the FP output unchanged (to 1e-5)."""
import pytest
import torch
import torch.nn.functional as F

from quantbench.errors import ConfigError
from quantbench.transforms import BlockRotation, Permute, Rotation, Scale


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
