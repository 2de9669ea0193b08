"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""
import torch

from quantbench import models
from quantbench.adapters import adapter_for
from quantbench.models import LoadedModel


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_norms(model, seed=0):
    """Random-init models have all-ones norm weights, which would leave norm fusions untested."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 0.5 + torch.rand(p.shape, generator=g)
    return model


def tiny_lm(name="tiny-llama", **dims):
    """A seeded tiny model (optionally with other widths/heads) with random norm weights."""
    model = randomize_norms(models.tiny_model(name, **dims))
    return LoadedModel(model, models.tiny_tokenizer(), adapter_for(model),
                       {"name": name, "id": f"test/{name}", "revision": str(sorted(dims.items()))})
