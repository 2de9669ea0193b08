"""OPT and BLOOM (LayerNorm with bias): adapters, every fold and transform exact in float64, every method at W16A16
equal to FP, GPTQ vs RTN on a biased layer, norm-tweaking on LayerNorms, refusals that name what is supported, and
the bench on a tiny OPT / BLOOM directory."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import quantbench
from helpers import logits, randomize_norms
from quantbench import models
from quantbench.adapters import BloomAdapter, OptAdapter, adapter_for
from quantbench.errors import ConfigError
from quantbench.models import LoadedModel

FAMILIES = ("tiny-opt", "tiny-bloom")


def _lm(name, dtype=torch.float64, seed=0):
    """A seeded tiny model with random norm weights *and biases* and random linear biases (random init leaves
    LayerNorm biases at 0 and would leave bias folds untested)."""
    model = randomize_norms(models.tiny_model(name, seed=seed, dtype=dtype), seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return LoadedModel(model, models.tiny_tokenizer(), adapter_for(model),
                       {"name": name, "id": f"test/{name}", "revision": f"biased-seed{seed}"})


@pytest.fixture
def ids():
    return torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(3))


# adapters ------------------------------------------------------------------------------------------------------

def test_opt_adapter_parts():
    lm = _lm("tiny-opt")
    a, block = lm.adapter, lm.adapter.blocks[0]
    assert isinstance(a, OptAdapter) and (a.num_heads, a.num_kv_heads, a.head_dim) == (4, 4, 32)
    lin = a.linears(block)
    assert list(lin) == ["q", "k", "v", "o", "up", "down"]
    assert lin["o"] is block.self_attn.out_proj and lin["up"] is block.fc1 and lin["down"] is block.fc2
    assert all(m.bias is not None for m in lin.values())
    assert a.norms(block) == (block.self_attn_layer_norm, block.final_layer_norm)
    assert a.embeddings == [lm.model.model.decoder.embed_tokens, lm.model.model.decoder.embed_positions]
    assert a.final_norm is lm.model.model.decoder.final_layer_norm
    assert a.linear_name(1, "down") == "model.decoder.layers.1.fc2"
    assert a.linear_inputs() == {"q": 128, "k": 128, "v": 128, "o": 128, "up": 128, "down": 256}
    assert "model.decoder.embed_positions.weight" in a.tensor_names(["embed"])


def test_bloom_adapter_parts():
    lm = _lm("tiny-bloom")
    a, block = lm.adapter, lm.adapter.blocks[0]
    assert isinstance(a, BloomAdapter) and a.intermediate_size == 512 and a.context is None
    lin = a.linears(block)
    assert list(lin) == ["qkv", "o", "up", "down"] and lin["qkv"].out_features == 3 * 128
    assert a.norm_inputs(block)[0] == (block.input_layernorm, [lin["qkv"]])
    assert a.linear_name(0, "qkv") == "transformer.h.0.self_attention.query_key_value"
    assert a.leader("qkv") == "qkv" and not a.ROUTES_ATTENTION


@pytest.mark.parametrize("mtype, change, supported", [
    ("opt", dict(do_layer_norm_before=False), "pre-LN OPT"),
    ("opt", dict(word_embed_proj_dim=64), "OPT-125m, 1.3b"),
    ("bloom", dict(apply_residual_connection_post_layernorm=True), "bloom-560m ... bloom-176b"),
])
def test_unsupported_variant_is_refused_naming_what_is(mtype, change, supported):
    cfg = AutoConfig.for_model(mtype, hidden_size=128, num_attention_heads=4, num_hidden_layers=1, vocab_size=64,
                               **({"ffn_dim": 256} if mtype == "opt" else {}), **change)
    with pytest.raises(ConfigError, match=f"unsupported {mtype.upper()} variant.*supported:.*{supported}"):
        adapter_for(AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"))


def test_bloom_refuses_qkv_quantization_before_any_work():
    from quantbench.validate import check_attention

    geo = models.geometry_of("tiny-bloom")
    with pytest.raises(ConfigError, match="ALiBi.*K/V cannot be quantized"):
        check_attention(geo, quantbench.quant.parse_scheme("w4a4kv4"), "tiny-bloom")
    check_attention(geo, quantbench.quant.parse_scheme("w4a4"), "tiny-bloom")
    check_attention(models.geometry_of("tiny-opt"), quantbench.quant.parse_scheme("w4a4kv4"), "tiny-opt")


def test_quarot_refuses_bloom_with_the_reason():
    with pytest.raises(ConfigError, match="quarot cannot rotate BLOOM: its word_embeddings_layernorm"):
        quantbench.quantize("tiny-bloom", "quarot", "w4a4")


# folds and transforms: FP logits unchanged (float64) ---------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_smoothing_with_layernorm_bias_is_exact(name, ids):
    from quantbench.smoothing import fuse_into_norm

    lm = _lm(name)
    ref = logits(lm.model, ids)
    g = torch.Generator().manual_seed(5)
    biases = []
    for block in lm.adapter.blocks:
        for norm, fcs in lm.adapter.norm_inputs(block):
            biases.append(norm.bias.detach().clone())
            fuse_into_norm(norm, fcs, 0.2 + 3 * torch.rand(128, generator=g, dtype=torch.float64))
    assert not torch.equal(biases[0], lm.adapter.norms(lm.adapter.blocks[0])[0].bias)  # the bias was divided too
    torch.testing.assert_close(logits(lm.model, ids), ref, rtol=1e-6, atol=1e-6)


def test_smoothing_that_forgets_the_bias_breaks_the_model(ids):
    """The realistic mistake (RMSNorm habits: divide the weight only) must show."""
    lm = _lm("tiny-opt")
    ref = logits(lm.model, ids)
    block = lm.adapter.blocks[0]
    norm, fcs = lm.adapter.norm_inputs(block)[0]
    s = torch.full((128,), 2.0, dtype=torch.float64)
    with torch.no_grad():
        norm.weight /= s
        for f in fcs:
            f.weight *= s
    assert (logits(lm.model, ids) - ref).abs().max() > 1e-3


def test_omniquant_let_with_shifts_is_exact_in_view_and_fused(ids):
    """OPT's LET: scales and shifts on qkv, fc1 and out (v -> out_proj), qkt; the training view and the fusion both
    equal the FP model."""
    from quantbench.blocktrain import QLinearView
    from quantbench.pipeline import resolve
    from quantbench.simulate import swap_modules

    OmniQuant = resolve("omniquant")
    lm = _lm("tiny-opt")
    ad = lm.adapter
    ref = logits(lm.model, ids)
    block = ad.blocks[1]
    lin = ad.linears(block)
    g = torch.Generator().manual_seed(7)
    r = lambda lo=0.3, hi=3.0: lo + (hi - lo) * torch.rand(128, generator=g, dtype=torch.float64)  # noqa: E731
    p = {"qkv": r(), "fc1": r(), "out": r(), "qkt": r(0.5, 2.0),
         "qkv_shift": torch.randn(128, generator=g, dtype=torch.float64),
         "fc1_shift": torch.randn(128, generator=g, dtype=torch.float64),
         "out_shift": torch.randn(128, generator=g, dtype=torch.float64)}
    f = lambda k: (lambda: p[k])  # noqa: E731
    spec = {r_: dict(in_div=f("qkv"), col=f("qkv"), in_shift=f("qkv_shift"), shift=f("qkv_shift")) for r_ in "qkv"}
    spec["up"] = dict(in_div=f("fc1"), col=f("fc1"), in_shift=f("fc1_shift"), shift=f("fc1_shift"))
    spec["q"]["row"], spec["k"]["row"] = (lambda: 1 / p["qkt"]), f("qkt")
    spec["v"].update(row=lambda: 1 / p["out"], row_shift=f("out_shift"))
    spec["o"] = dict(col=f("out"), shift=f("out_shift"))
    restore = swap_modules(block, {ad.LINEARS[k]: QLinearView(lin[k], None, None, None, **spec.get(k, {}))
                                   for k in lin})
    torch.testing.assert_close(logits(lm.model, ids), ref, rtol=1e-6, atol=1e-6)
    restore()
    OmniQuant._fuse(ad, block, {k: torch.nn.Parameter(v) for k, v in p.items()})
    assert block.self_attn_layer_norm.bias.abs().sum() > 0
    torch.testing.assert_close(logits(lm.model, ids), ref, rtol=1e-6, atol=1e-6)


def test_omniquant_lets_per_family():
    from quantbench.pipeline import resolve

    OmniQuant = resolve("omniquant")
    assert OmniQuant.lets(_lm("tiny-opt").adapter) == (["qkv", "fc1", "out", "qkt"], [])
    assert OmniQuant.lets(_lm("tiny-bloom").adapter) == (["qkv", "fc1"], ["out (v fused in qkv)",
                                                                          "qkt (q, k fused in qkv)"])


def test_quarot_layernorm_to_rmsnorm_and_rotation_is_exact(ids):
    """QuaRot's OPT path: LayerNorm biases folded, the residual stream centred, RMSNorms, the rotation and the online
    Hadamards: the online view equals the original model."""
    from quantbench.rotation import fuse_norms, layernorms_to_rms, rotate
    from quantbench.plan import LinearPlan, QuantizedModel
    from quantbench.quant import parse_scheme
    from quantbench.simulate import online_view

    lm = _lm("tiny-opt")
    ad = lm.adapter
    ref = logits(lm.model, ids)
    info = fuse_norms(ad)
    assert info["embed_mean_subtracted"] and info["untied_lm_head"] is False
    layernorms_to_rms(ad)
    assert isinstance(ad.final_norm, torch.nn.RMSNorm) and ad.lm_head.bias is not None
    torch.testing.assert_close(logits(lm.model, ids), ref, rtol=1e-6, atol=1e-6)  # centred + RMSNorm == LayerNorm
    online, _ = rotate(ad, "hadamard", seed=0)
    qm = QuantizedModel(lm.model, ad, parse_scheme("w16a16"))
    for name, *_ in ad.named_linears():
        qm.linears[name] = LinearPlan(weight=None, pre=online.get(name, []))
    with online_view(qm):
        torch.testing.assert_close(logits(lm.model, ids), ref, rtol=1e-6, atol=1e-6)


def test_rmsnorm_without_centring_is_not_layernorm(ids):
    """Swapping the norms without centring the residual stream (the step QuaRot adds for OPT) changes the model."""
    from quantbench.rotation import layernorms_to_rms

    lm = _lm("tiny-opt")
    ref = logits(lm.model, ids)
    layernorms_to_rms(lm.adapter)
    assert (logits(lm.model, ids) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_duquant_smoothing_is_exact(name, ids):
    """DuQuant's smoothing on LayerNorm models: qkv/fc1 into the norms (weight and bias), down into fc1's rows on OPT
    (ReLU commutes with a positive scale) and online on BLOOM (GELU does not), out online on BLOOM (fused qkv)."""
    from quantbench.data import Calibration
    from quantbench.pipeline import resolve
    from quantbench.transforms import Scale

    lm = _lm(name)
    ref = logits(lm.model, ids)
    windows = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    calib = Calibration(lm.tokenizer)
    calib._windows = windows
    online = resolve("duquant")()._smooth(lm, calib)
    if name == "tiny-opt":
        assert online == {}
        torch.testing.assert_close(logits(lm.model, ids), ref, rtol=1e-6, atol=1e-6)
        return
    assert set(online[0]) == {"o", "down"}
    from quantbench.simulate import swapped, PreLinear

    ad = lm.adapter
    views = {}
    for i, roles in online.items():
        for role, s in roles.items():
            lin = ad.linears(ad.blocks[i])[role]
            t = Scale(s)
            lin.weight.data = t.fold(lin.weight.detach().double())
            views[ad.linear_name(i, role)] = PreLinear([t], lin)
    with swapped(lm.model, views):
        torch.testing.assert_close(logits(lm.model, ids), ref, rtol=1e-6, atol=1e-6)


# every method -----------------------------------------------------------------------------------------------------

METHODS = ("rtn", "gptq", "smoothquant", "omniquant", "quarot", "quarot-gptq", "duquant", "duquant-lwc",
           "gptq+normtweak")
SHORT = {"omniquant": dict(epochs=1), "duquant": dict(steps=4), "duquant-lwc": dict(steps=4, epochs=1),
         "gptq+normtweak": dict(nt_epochs=1)}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_w16a16_through_every_method_equals_fp(name, method, ids):
    if name == "tiny-bloom" and method.startswith("quarot"):
        pytest.skip("QuaRot refuses BLOOM (test_quarot_refuses_bloom_with_the_reason)")
    lm = _lm(name)
    ref = logits(lm.model, ids)
    qm = quantbench.quantize(lm.model, method, "w16a16", tokenizer=lm.tokenizer, dtype="float64",
                             calibration={"corpus": "austen", "nsamples": 2, "seqlen": 32}, **SHORT.get(method, {}))
    torch.testing.assert_close(logits(qm.realize(), ids), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_gptq_beats_rtn_on_a_biased_layer_with_correlated_inputs(name):
    from quantbench.quant import QuantSpec, quantize
    from quantbench.weights import gptq_quantize

    lm = _lm(name, dtype=torch.float32)
    lin = lm.adapter.linears(lm.adapter.blocks[0])["up"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(2048, 128,
                                                                                                     generator=g)
    h = 2 * x.T @ x / 2048
    spec = QuantSpec(3, "sym", "channel")
    out = lambda q: torch.nn.functional.linear(x, q.dequantize(torch.float32), lin.bias)  # noqa: E731
    fp = lin(x).detach()
    err = lambda q: (out(q) - fp).pow(2).mean()  # noqa: E731
    assert err(gptq_quantize(lin.weight, h, spec)) < 0.5 * err(quantize(lin.weight.detach(), spec))


def test_normtweak_moves_weight_and_bias_and_zero_epochs_is_its_base():
    calib = {"corpus": "austen", "nsamples": 2, "seqlen": 32, "seed": 0}  # one calibration set for both
    base = quantbench.quantize(_lm("tiny-opt", dtype=torch.float32).model, "gptq", "w3a16",
                               tokenizer=models.tiny_tokenizer(), calibration=calib)
    none = quantbench.quantize(_lm("tiny-opt", dtype=torch.float32).model, "gptq+normtweak", "w3a16",
                               tokenizer=models.tiny_tokenizer(), calibration=calib, nt_epochs=0)
    tweaked = quantbench.quantize(_lm("tiny-opt", dtype=torch.float32).model, "gptq+normtweak", "w3a16",
                                  tokenizer=models.tiny_tokenizer(), calibration=calib, nt_lr=1e-2)
    base, none, tweaked = base.plan, none.plan, tweaked.plan
    for n, p in base.model.state_dict().items():
        assert torch.equal(p, none.model.state_dict()[n]), n
    for n, p in base.linears.items():
        assert torch.equal(p.weight.codes, none.linears[n].weight.codes), n
    ln, ln0 = tweaked.adapter.norms(tweaked.adapter.blocks[1])[0], base.adapter.norms(base.adapter.blocks[1])[0]
    assert not torch.equal(ln.weight, ln0.weight) and not torch.equal(ln.bias, ln0.bias)


# the bench on a model directory -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_bench_on_a_tiny_model_directory(name, tmp_path):
    """``quantbench run --model DIR`` (the path ``pytest bench/ --model DIR`` takes) writes finite records."""
    import json

    from quantbench import cli

    lm = _lm(name, dtype=torch.float32)
    src = tmp_path / name
    lm.model.save_pretrained(src)
    lm.tokenizer.save_pretrained(src)
    out = tmp_path / "results"
    rc = cli.main(["run", "--model", str(src), "--method", "rtn,gptq,smoothquant", "--scheme", "w4a4,w4a16",
                   "--tasks", "ppl-austen", "--seqlen", "128", "--ppl-windows", "2", "--calib", "austen",
                   "--nsamples", "2", "--calib-seqlen", "64", "--results-dir", str(out)])
    assert rc == 0
    records = [json.loads(f.read_text()) for f in out.glob("*.json")]
    assert len(records) == 6 and all(r["value"] == r["value"] and r["value"] < 1e6 for r in records)


@pytest.mark.parametrize("name", FAMILIES)
def test_export_round_trip_is_exact(name, tmp_path, ids):
    """A W4A16 plan of an OPT/BLOOM model exported as compressed-tensors loads in plain transformers (biases and
    all) with the fake-quant model's logits, and back through ``--method load``."""
    lm = _lm(name, dtype=torch.float32)
    qm = quantbench.quantize(lm.model, "rtn", "w4a16", tokenizer=lm.tokenizer)
    ref = logits(qm.realize(), ids)
    qm.save_pretrained(tmp_path / "ct")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ct",
                                                 attn_implementation="eager" if "bloom" in name else "sdpa")
    assert torch.equal(logits(plain, ids), ref)
    assert torch.equal(logits(quantbench.quantize(str(tmp_path / "ct"), "load", "headline").realize(), ids), ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_triton_backend_runs_layernorm_models_like_fake_quant(name, ids):
    """The INT4 kernels (interpreter on CPU) on OPT/BLOOM linears, biases included, DuQuant's online smoothing on
    BLOOM fused into the kernels' first stage: the same logits as the fake-quant backend."""
    pytest.importorskip("triton")
    out = {}
    for backend in ("fake_quant", "triton"):
        lm = _lm(name, dtype=torch.float32)
        qm = quantbench.quantize(lm.model, "duquant", "w4a4", tokenizer=lm.tokenizer, steps=4,
                                 calibration={"corpus": "austen", "nsamples": 2, "seqlen": 64})
        out[backend] = logits(qm.realize(backend), ids)
    assert ((out["triton"] - out["fake_quant"]).abs().max() / out["fake_quant"].abs().max()).item() < 1e-5
