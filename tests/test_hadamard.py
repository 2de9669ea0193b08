"""Hadamard library: every special order is a true Hadamard matrix, every supported size is orthogonal and fast,
impossible sizes are clear errors."""
import pytest
import torch

from quantbench import hadamard
from quantbench.errors import ConfigError
from quantbench.transforms import Hadamard, HeadHadamard

MODEL_SIZES = {11008: (172, 64), 13824: (108, 128), 14336: (28, 512), 28672: (28, 1024), 5120: (40, 128),
               576: (36, 16), 1536: (12, 128), 4096: (1, 4096), 64: (1, 64)}


@pytest.mark.parametrize("k", hadamard.K_ORDER)
def test_special_orders_are_hadamard(k):
    h = hadamard.had_k(k)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("k", hadamard.K_ORDER)
def test_every_k_times_pow2_dense_matrix_is_orthogonal(k):
    for p in (1, 2, 8):
        m = hadamard.hadamard_matrix(k * p)
        torch.testing.assert_close(m @ m.T, torch.eye(k * p, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", sorted(MODEL_SIZES))
def test_model_sizes_factor_and_transform_is_orthogonal(n):
    assert hadamard.factor(n) == MODEL_SIZES[n]
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = hadamard.hadamard_transform(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    # the inverse is xMᵀ: recover x from y without forming the n x n matrix
    k, p = hadamard.factor(n)
    back = torch.einsum("...cb,ac->...ab", hadamard.fwht(y.reshape(4, k, p)), hadamard.had_k(k) if k > 1
                        else torch.ones(1, 1, dtype=torch.float64)).reshape(4, n) / n ** 0.5
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)


def test_fast_transform_equals_dense_kronecker():
    n = 36 * 8
    dense = torch.kron(hadamard.had_k(36), hadamard.sylvester(8)) / n ** 0.5
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(hadamard.hadamard_transform(x), x @ dense, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [9, 1000, 2880, 44])
def test_impossible_size_is_a_clear_error_naming_it(n):
    with pytest.raises(ConfigError, match=rf"no Hadamard transform of size {n}\b"):
        hadamard.factor(n)
    with pytest.raises(ConfigError, match=str(n)):
        Hadamard(n)


def test_online_and_fused_hadamards_cancel():
    lin = torch.nn.Linear(1536, 64).double()
    x = torch.randn(5, 1536, dtype=torch.float64)
    for t in (Hadamard(1536), HeadHadamard(12, 128)):
        w = t.fold(lin.weight)
        torch.testing.assert_close(torch.nn.functional.linear(t(x), w, lin.bias), lin(x), rtol=0, atol=1e-10)


def test_head_hadamard_is_kronecker_across_heads():
    heads, hd = 12, 4
    x = torch.randn(2, heads * hd, dtype=torch.float64)
    dense = torch.kron(hadamard.had_k(12), torch.eye(hd, dtype=torch.float64)) / 12 ** 0.5
    torch.testing.assert_close(HeadHadamard(heads, hd)(x), x @ dense, rtol=0, atol=1e-12)


def test_random_rotations_are_orthogonal_and_seeded():
    for fn in (hadamard.random_hadamard, hadamard.random_orthogonal):
        q = fn(576, torch.Generator().manual_seed(1))
        torch.testing.assert_close(q @ q.T, torch.eye(576, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(q, fn(576, torch.Generator().manual_seed(1)))
        assert not torch.equal(q, fn(576, torch.Generator().manual_seed(2)))
