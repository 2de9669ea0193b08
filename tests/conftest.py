"""Unit/integration tests: offline, CPU, seconds each (the SmolLM2 ones are marked slow and kept short)."""
import os

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ[var] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from quantbench import models  # noqa: E402
from quantbench.cache import keep_benchmarks_out_of_the_checkout  # noqa: E402
from quantbench.plugins import load_plugins  # noqa: E402

load_plugins()


def pytest_configure(config):
    keep_benchmarks_out_of_the_checkout(config)


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))


@pytest.fixture(scope="session")
def tokenizer():
    return models.tiny_tokenizer()


@pytest.fixture(params=["tiny-llama", "tiny-mistral", "tiny-qwen2"])
def tiny(request):
    return models.load(request.param)


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, models.TINY_DIMS["vocab_size"], (2, 48), generator=g)


# No test reuses a calibrated plan stored by another (or by a bench run): tests/test_planstore.py switches it on.
os.environ["QUANTBENCH_PLAN_CACHE"] = "0"
