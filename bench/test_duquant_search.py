"""Speed of DuQuant's greedy rotation search (pytest-benchmark), fast vs the reference loop, on a LLaMA-7B-shaped
down_proj input: 2048 tokens x 11008 channels with massive activations (100-1500) at a few tokens.

    pytest bench/test_duquant_search.py --speed --benchmark-columns=min,mean,rounds

Both implementations must return the same rotation; the fast one is expected to be >= 10x faster.
"""
import pytest
import torch

from quantbench import duquant as dq

STEPS, BLOCK = 256, 128
pytestmark = pytest.mark.speed


@pytest.fixture(scope="module")
def down_proj_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 11008, generator=g) * 0.15
    for t, c, v in ((0, 7, 1500.0), (0, 2533, -1100.0), (1, 7, 420.0), (17, 8101, 100.0), (250, 2533, -640.0)):
        x[t, c] = v
    return x


@pytest.fixture(scope="module")
def results():
    return {}


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_rotation_search_speed(benchmark, down_proj_input, results, impl):
    fn = dq.greedy_rotation if impl == "fast" else dq.greedy_rotation_reference
    out = benchmark.pedantic(lambda: fn(down_proj_input, BLOCK, STEPS, "repo", torch.Generator().manual_seed(0)),
                             rounds=1, iterations=1)
    results[impl] = out
    if len(results) == 2:
        assert results["fast"].steps == results["reference"].steps
        assert torch.equal(results["fast"].rotation, results["reference"].rotation)
