"""Calibration at real scale on a GPU (``pytest bench/test_calibration_scale.py --speed``): the whole-model
calibrations of a LLaMA-2-7B-shaped model, beside the papers' times.

The GPU machines reach no hub, and shapes, not values, set the cost: the model is built from LLaMA-2-7B's config
(hidden 4096, MLP 11008, 32 heads, vocab 32000) with seeded random fp16 weights, and massive down_proj inputs are
planted (a few MLP channels scaled by 1000 through their up_proj rows, as LLaMA's massive activations). Every
block has the same shapes, so ``QB_SCALE_BLOCKS`` of the 32 blocks (default 4) are built and timed and the whole
model's time is projected as ``32 / blocks`` times the measured one: each row says which it is. Calibration windows
are random token ids (``nsamples`` x 2048); each method runs its reference recipe's sample count unless
``QB_SCALE_NSAMPLES`` says otherwise, and OmniQuant / DuQuant+LWC their epochs unless ``QB_SCALE_EPOCHS`` does
(the row names every setting). The papers' times are DuQuant's Table 12 (one A100): DuQuant 50 s, OmniQuant 2.0 h,
QuaRot-GPTQ 20 min for LLaMA-2-7B. The table goes to ``reports/calibration-scale-<device>.md``.

Without a GPU the cases skip; ``tests/test_bench_code.py`` runs this file's code on a small shape on the CPU.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                 num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
PAPER_S = {"duquant": 50.0, "omniquant": 2.0 * 3600, "quarot-gptq": 20 * 60}  # DuQuant Table 12, one A100
METHODS = [("duquant", "w4a4q4kv4", {}), ("duquant-lwc", "w4a4q4kv4", {}), ("quarot-gptq", "w4a4kv4", {}),
           ("omniquant", "w4a4q4kv4", {}), ("gptq", "w4a16", {})]
ROWS: list[dict] = []
pytestmark = pytest.mark.speed


def shaped_model(config: dict, blocks: int, device, seed: int = 0):
    """A seeded random LLaMA-shaped model of ``blocks`` blocks with planted massive down_proj inputs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantbench.models import LoadedModel
    from quantbench.adapters import adapter_for

    cfg = AutoConfig.for_model(**{**config, "num_hidden_layers": blocks})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.model.layers:
            ch = torch.randperm(cfg.intermediate_size, generator=g)[:3].to(device)
            block.mlp.up_proj.weight[ch] *= 1000.0  # massive activations on 3 channels of every down_proj input
    ad = adapter_for(model)
    return LoadedModel(model, None, ad, {"name": "llama-2-7b-shaped", "id": f"random/llama-2-7b-shape-{blocks}of32",
                                         "revision": f"seed{seed}"})


def calibration(nsamples: int, seqlen: int, vocab: int, device):
    """Random token windows as a :class:`quantbench.data.Calibration` (shapes set the cost, not the text)."""
    from quantbench.data import Calibration

    c = Calibration(None, "austen", nsamples, seqlen, 0)
    c._windows = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    return c


def run_one(method: str, scheme: str, opts: dict, config: dict, blocks: int, device, seqlen: int = 2048) -> dict:
    """Calibrate ``method`` on the shaped model; the row with the measured and projected seconds."""
    from quantbench.pipeline import resolve
    from quantbench.quant import parse_scheme

    cls = resolve(method)
    if "epochs" in cls.options and os.environ.get("QB_SCALE_EPOCHS"):
        opts = {**opts, "epochs": int(os.environ["QB_SCALE_EPOCHS"])}
    m = cls(device=str(device), **opts)
    n = int(os.environ.get("QB_SCALE_NSAMPLES", m.calib_defaults.get("nsamples", 128)))
    lm = shaped_model(config, blocks, device)
    calib = calibration(n, seqlen, config["vocab_size"], device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    m.quantize(lm, parse_scheme(scheme, m.specs()), calib)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    total = config.get("num_hidden_layers", blocks)
    proj = wall * total / blocks
    paper = PAPER_S.get(method)
    settings = f"{n} x {seqlen}" + (f", {m.opts['epochs']} epochs" if "epochs" in m.opts else "")
    return {"method": method, "scheme": scheme, "settings": settings, "blocks timed": f"{blocks} of {total}",
            "measured_s": round(wall, 1), "projected whole model s": round(proj, 1),
            "paper (A100) s": paper if paper else "", "vs paper": f"{paper / proj:.2f}x" if paper else ""}


@pytest.mark.parametrize("method,scheme,opts", METHODS, ids=[m for m, _, _ in METHODS])
def test_calibration_at_7b_scale(method, scheme, opts):
    if not torch.cuda.is_available():
        pytest.skip("calibration at scale needs a GPU")
    blocks = int(os.environ.get("QB_SCALE_BLOCKS", "4"))
    ROWS.append(run_one(method, scheme, opts, LLAMA2_7B, blocks, torch.device("cuda")))


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    if ROWS:
        from quantbench.reports.speed import write_table

        write_table("calibration-scale", "Calibration at LLaMA-2-7B scale",
                    "`pytest bench/test_calibration_scale.py --speed`: seeded random LLaMA-2-7B-shaped fp16 model with "
                    "planted massive down_proj inputs, random token windows; one round each; the whole model projected "
                    "from the blocks timed (every block has the same shapes). Paper: DuQuant Table 12, one A100.", ROWS)
