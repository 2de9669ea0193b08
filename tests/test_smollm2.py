"""The real offline model: geometry, provenance caveat, and RTN W4A4 hurting perplexity (short run)."""
import pytest

from quantbench import models
from quantbench.results import ResultStore
from quantbench.runner import RunConfig, run
from quantbench.tasks import make_task

pytestmark = pytest.mark.slow


def test_smollm2_geometry():
    lm = models.load("smollm2-135m")
    a = lm.adapter
    assert (a.hidden_size, a.intermediate_size, a.num_heads, a.num_kv_heads, a.head_dim) == (576, 1536, 9, 3, 64)
    assert len(a.blocks) == 30 and a.tied_embeddings
    assert "Q4_1" in lm.info["notes"] and lm.info["revision"].startswith("sha256:")
    assert lm.info["source_revision"].startswith("gguf-sha256:")
    g = models.geometry_of("smollm2-135m")  # read from the GGUF header alone: the same as transformers' full parse
    geo = lambda x: (x.hidden_size, x.intermediate_size, x.num_heads, x.num_kv_heads, x.head_dim, x.context,  # noqa: E731
                     x.config.num_hidden_layers, x.config.vocab_size)
    assert geo(g) == geo(a) == (576, 1536, 9, 3, 64, 8192, 30, 49152)


def test_rtn_w4a4_ppl_above_fp16(tmp_path):
    task = [make_task("ppl-austen", seqlen=512, max_windows=1)]
    store = ResultStore(tmp_path)
    fp = run(RunConfig("fp16", "smollm2-135m"), task, store).records[0]
    q = run(RunConfig("rtn", "smollm2-135m", "w4a4"), task, store).records[0]
    assert 5 < fp["value"] < 100  # a real pretrained LM on English prose
    assert q["value"] > 1.5 * fp["value"]  # massive down_proj activations break per-token 4-bit RTN
    assert "Q4_1" in q["model_notes"] and q["model_id"].startswith("HuggingFaceTB/SmolLM2-135M")


def test_w4a4_ranking_fp16_quarot_gptq_quarot_rtn(tmp_path):
    """Issue 3's ranking on real massive activations: rotation rescues W4A4, GPTQ on top of it helps further.
    CI-sized: 8 x 512 calibration tokens, 4 x 512 evaluation tokens (the bench uses the full protocol)."""
    task = [make_task("ppl-austen", seqlen=512, max_windows=4)]
    store = ResultStore(tmp_path)
    calib = {"corpus": "austen", "nsamples": 8, "seqlen": 512, "seed": 0}
    ppl = {m: run(RunConfig(m, "smollm2-135m", "w16a16" if m == "fp16" else "w4a4", calibration=calib), task,
                  store).records[0]["value"] for m in ("fp16", "quarot-gptq", "quarot", "rtn")}
    assert ppl["fp16"] < ppl["quarot-gptq"] < ppl["quarot"] < ppl["rtn"], ppl
    rec = {r["method"]: r for r in store.records()}
    assert rec["quarot-gptq"]["method_info"]["o_proj_online"].startswith("full Hadamard 576")
    assert rec["quarot-gptq"]["method_options"]["rotate_mode"] == "hadamard"
    assert rec["quarot-gptq"]["calibration"]["nsamples"] == 8


def test_smoothing_and_let_fusions_are_exact_on_smollm2():
    import torch

    from quantbench.backends.fake_quant import realize
    from quantbench.methods.omniquant import OmniQuant
    from quantbench.quant import parse_scheme
    from quantbench.pipeline import resolve

    lm = models.load("smollm2-135m")
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model(ids).logits

    class Calib:
        windows = ids

    qm = resolve("smoothquant")().quantize(lm, parse_scheme("w16a16"), Calib)
    with torch.no_grad():
        torch.testing.assert_close(realize(qm)(ids).logits, ref, rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(1)
    half = torch.rand(3, 32, generator=g) + 0.5
    p = torch.nn.ParameterDict({"qkv": torch.rand(576, generator=g) + 0.5, "fc1": torch.rand(576, generator=g) + 0.5,
                                "qkt": torch.cat([half, half], -1).reshape(-1)})  # RoPE pairs share a scale
    for block in lm.adapter.blocks:
        OmniQuant._fuse(lm.adapter, block, p)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_smoothquant_w8a8_and_w4a4_ranking_omniquant_smoothquant_rtn(tmp_path):
    """Issue 4 on real massive activations. CI-sized: 4 x 512 evaluation tokens; SmoothQuant statistics on
    32 x 512 tokens (the reference: 512 x 512); OmniQuant 2 epochs over 8 x 512 tokens (the reference: 20 x 128
    x 2048). The bench profile runs larger settings."""
    task = [make_task("ppl-austen", seqlen=512, max_windows=4)]
    store = ResultStore(tmp_path)
    sq = {"corpus": "austen", "nsamples": 32, "seqlen": 512}
    om = {"corpus": "austen", "nsamples": 8, "seqlen": 512}

    def ppl(method, scheme, calib=None, **options):
        cfg = RunConfig(method, "smollm2-135m", scheme, calibration=calib or {}, options=options)
        return run(cfg, task, store).records[0]["value"]

    fp = ppl("fp16", "w16a16")
    assert ppl("smoothquant", "w8a8", sq) < 1.02 * fp
    rtn, smooth, omni = ppl("rtn", "w4a4"), ppl("smoothquant", "w4a4", sq), ppl("omniquant", "w4a4", om, epochs=2)
    assert omni < smooth < rtn, (omni, smooth, rtn)


def test_duquant_is_fp_exact_on_smollm2_for_batch_1_and_3():
    import torch

    from quantbench.backends.fake_quant import realize
    from quantbench.data import Calibration
    from quantbench.quant import parse_scheme
    from quantbench.pipeline import resolve

    lm = models.load("smollm2-135m")
    ids = Calibration(lm.tokenizer, "austen", 3, 64, 9).windows
    with torch.no_grad():
        ref = lm.model(ids).logits

    class Calib:
        windows = Calibration(lm.tokenizer, "austen", 2, 128, 2).windows

    qm = resolve("duquant")(steps=32).quantize(lm, parse_scheme("w16a16"), Calib)
    assert qm.info["block_size_used"] == 64  # 576 = 9 x 64: 128 does not divide it
    model = realize(qm)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.cat([model(ids[i:i + 1]).logits for i in range(3)]), ref,
                                   rtol=1e-4, atol=1e-4)


def test_w4a4_ranking_duquant_lwc_duquant_quarot_rtn_and_smoothquant(tmp_path):
    """Issue 5 on real massive activations (down_proj inputs reach 2,000-3,000). CI-sized: statistics and the
    averaged sequence from 8 x 256 tokens; 4 x 512 evaluation tokens. LWC gets 2 epochs x 8 samples = 16 AdamW
    steps instead of the recipe's 20 x 128 = 2,560, so its lr is 0.1 instead of 1e-2: at 1e-2 the bounds cannot
    leave their init (sigmoid(4) = 0.98) in 16 steps, and the run measures α 0.5 without clipping (32.75 vs 29.04)."""
    task = [make_task("ppl-austen", seqlen=512, max_windows=4)]
    store = ResultStore(tmp_path)
    cal = {"corpus": "austen", "nsamples": 8, "seqlen": 256}

    def ppl(method, **options):
        return run(RunConfig(method, "smollm2-135m", "w4a4", calibration=cal, options=options), task,
                   store).records[0]["value"]

    p = {m: ppl(m) for m in ("duquant", "quarot", "rtn", "smoothquant")}
    p["duquant-lwc"] = ppl("duquant-lwc", epochs=2, lwc_lr=0.1)
    assert p["duquant-lwc"] <= p["duquant"] < p["quarot"] < p["rtn"], p
    assert p["smoothquant"] > p["duquant"], p


def test_gptq_normtweak_beats_gptq_at_w3(tmp_path):
    """Issue 6, CI-sized: 8 x 512 tokens generated by SmolLM2 itself (seed 1) calibrate both; 4 x 512 evaluation
    tokens. Not asserted at W2 (the bench reports that row): there both models sit past PPL 2e4 and which one is
    lower depends on the CPU's float32 summation order (measured: norm-tweaking 30922 vs GPTQ 24755 on an AVX-512
    machine, the reverse on the machines CI ran on before), i.e. the gap is noise."""
    task = [make_task("ppl-austen", seqlen=512, max_windows=4)]
    store = ResultStore(tmp_path)
    cal = {"corpus": "generated", "nsamples": 8, "seqlen": 512, "seed": 1}

    def ppl(method):
        return run(RunConfig(method, "smollm2-135m", "w3a16", calibration=cal), task, store).records[0]["value"]

    base, tweaked = ppl("gptq"), ppl("gptq+normtweak")
    assert tweaked < 0.95 * base, (tweaked, base)
