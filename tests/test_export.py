"""compressed-tensors export and import (quantbench/export.py, methods/load.py).

The oracle is the other side's code: transformers' ``from_pretrained`` with compressed-tensors decompresses the
checkpoint and runs its own activation quantization, so equal logits mean the checkpoint *is* the model measured.
Tolerance: exact. The loaded model dequantizes ``(q - z) * s`` from the stored fp32 scales in fp32, as the
fake-quant backend does, and compressed-tensors' dynamic per-token quantization performs the same fp32 operations
as the ``sym_ct`` grid (``test_sym_ct_is_compressed_tensors_dynamic_quantization``), so no rounding differs.
"""
import json
import shutil

import pytest
import torch
from helpers import logits, tiny_lm

import quantbench
from quantbench import export
from quantbench.cli import main
from quantbench.errors import ConfigError, UnavailableError
from quantbench.quant import QuantSpec, fake_quant

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import compute_dynamic_scales_and_zp, fake_quantize  # noqa
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

IDS = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
CALIB = {"nsamples": 2, "seqlen": 64}


def _quantized(method, scheme, quantizers=None, **opts):
    lm = tiny_lm()
    return quantbench.quantize(lm.model, method, scheme, tokenizer=lm.tokenizer, quantizers=quantizers,
                               calibration=CALIB if method not in ("rtn",) else None, **opts)


def _load(path, **kw):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


@pytest.mark.parametrize("bits", [4, 8])
def test_sym_ct_is_compressed_tensors_dynamic_quantization(bits):
    x = torch.randn(3, 7, 128) * torch.linspace(0.1, 20, 128)
    x[0, 0] = 0.0  # an all-zero token: eps scale on both sides
    x[1, 1, :4] = torch.tensor([-7.5, -2.5, 1.5, 0.5])  # exact .5 ties once the row's scale is 1
    x[1, 1, 4:] = 0.1
    args = QuantizationArgs(num_bits=bits, symmetric=True, strategy="token", dynamic=True)
    scale, zp = compute_dynamic_scales_and_zp(value=x, args=args, module=torch.nn.Linear(1, 1))
    theirs = fake_quantize(x, scale, zp, args)
    ours = fake_quant(x, QuantSpec(bits, "sym_ct", "token"))
    assert torch.equal(ours, theirs)
    assert not torch.equal(fake_quant(x, QuantSpec(bits, "sym", "token")), theirs)  # absmax/7 is another grid


CASES = [  # (method, scheme, quantizers, options): the round trips that transformers loads as they are
    ("rtn", "w4a16", None, {}),
    ("rtn", "w4a16g64", None, {}),
    ("rtn", "w3a16", None, {}),
    ("gptq", "w4a16", None, {}),
    ("smoothquant", "w8a8", {"a": {"grid": "sym_ct"}}, {}),
    ("rtn", "w4a4", {"a": {"grid": "sym_ct"}}, {}),
]


@pytest.mark.parametrize("method,scheme,quantizers,opts", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_round_trip_through_transformers_is_exact(tmp_path, method, scheme, quantizers, opts):
    qm = _quantized(method, scheme, quantizers, **opts)
    out = qm.save_pretrained(tmp_path / "ckpt")
    ref = logits(qm.realize(), IDS)
    got = logits(_load(out), IDS)
    assert torch.equal(got, ref)
    # the stored tensors are the plan's codes and scales, bit for bit
    from safetensors import safe_open

    cfg = json.loads((out / "config.json").read_text())
    with safe_open(out / "model.safetensors", "pt") as f:
        for name, lp in qm.plan.linears.items():
            codes, _ = export._signed_codes(lp.weight)
            if f"{name}.weight_packed" in f.keys():
                stored = unpack_from_int32(f.get_tensor(f"{name}.weight_packed"), lp.weight.spec.bits,
                                           torch.Size(codes.shape))
            else:
                stored = f.get_tensor(f"{name}.weight")
            assert torch.equal(stored, codes), name
            assert torch.equal(f.get_tensor(f"{name}.weight_scale"), export._scale(lp.weight).float()), name
    prov = cfg["quantbench"]
    assert prov["run_id"] == qm.info["config_hash"] and prov["method"] == method and prov["scheme"] == scheme
    assert prov["versions"]["quantbench"] and cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    groups = cfg["quantization_config"]["config_groups"].values()
    if qm.plan.scheme.a is not None:
        assert all(g["input_activations"]["dynamic"] and g["input_activations"]["strategy"] == "token"
                   for g in groups)
    assert export.verify(out)["run_id"] == qm.info["config_hash"]


def test_asymmetric_export_round_trips_dense_and_through_load(tmp_path):
    """GPTQ on its asymmetric grid: zero points packed as the format packs them. transformers 5.23 with
    compressed-tensors 0.19 cannot build asymmetric pack-quantized modules (a zero-point shape mismatch; upstream
    llm-compressor#1618), so the oracle loads it dense (``dequantize=True``) — exact for a weight-only scheme."""
    qm = _quantized("gptq", "w4a16g64", {"w": {"grid": "asym"}})
    out = qm.save_pretrained(tmp_path / "asym")
    ref = logits(qm.realize(), IDS)
    assert torch.equal(logits(_load(out, quantization_config=CompressedTensorsConfig(dequantize=True)), IDS), ref)
    back = quantbench.quantize(str(out), "load")
    assert back.info["scheme"] == "w4a16g64"
    assert torch.equal(logits(back.realize(), IDS), ref)


@pytest.mark.parametrize("method,scheme,quantizers,match", [
    ("quarot", "w4a4", {"a": {"grid": "sym_ct"}}, r"online transform Hadamard on the input of model\.layers\.0\."
                                                  r"mlp\.down_proj.*transform_config"),
    ("duquant", "w4a4", {"a": {"grid": "sym_ct"}}, r"online transform DuQuantRotation on the input of "
                                                   r"model\.layers\.0\.self_attn\.q_proj"),
    ("rtn", "w4a4kv4", {"a": {"grid": "sym_ct"}}, r"K, V quantization in layer 0.*kv_cache_scheme"),
    ("rtn", "w4a4", None, r"activations measured on grid 'sym'.*--agrid sym_ct"),
])
def test_what_the_format_cannot_express_is_refused_and_nothing_written(tmp_path, method, scheme, quantizers, match):
    qm = _quantized(method, scheme, quantizers, **({"steps": 8} if method == "duquant" else {}))
    with pytest.raises(ConfigError, match=match):
        qm.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_activation_grid_can_be_exported_when_asked_and_says_so(tmp_path):
    qm = _quantized("rtn", "w4a8")
    out = qm.save_pretrained(tmp_path / "x", allow_activation_grid=True)
    grid = json.loads((out / "config.json").read_text())["quantbench"]["activation_grid"]
    assert grid == {"measured": ["sym"], "checkpoint": "sym_ct"}
    assert not torch.equal(logits(_load(out), IDS), logits(qm.realize(), IDS))  # a different model, as it says


def test_existing_folder_is_not_overwritten_unless_asked(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    qm = _quantized("rtn", "w4a16")
    with pytest.raises(ConfigError, match="exists and is not empty"):
        qm.save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    qm.save_pretrained(tmp_path, overwrite=True)
    assert not (tmp_path / "keep.txt").exists() and (tmp_path / "model.safetensors").exists()


def _ct_checkpoint(path, weights: dict, acts: dict | None = None):
    """A checkpoint written by compressed-tensors itself (as llm-compressor does: apply the config, set min/max
    scales with its own ``calculate_qparams``, compress, save): a checkpoint quantbench did not make."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    lm = tiny_lm()
    group = {"targets": ["Linear"], "weights": weights, **({"input_activations": acts} if acts else {})}
    apply_quantization_config(lm.model, QuantizationConfig(config_groups={"group_0": group}, ignore=["lm_head"]))
    for _, m in lm.model.named_modules():
        if hasattr(m, "weight_scale"):
            args = m.quantization_scheme.weights
            w = m.weight.data
            g = w.reshape(w.shape[0], -1, args.group_size) if args.group_size else w.reshape(w.shape[0], 1, -1)
            s, z = calculate_qparams(g.amin(-1), g.amax(-1), args)
            m.weight_scale.data.copy_(s.reshape(m.weight_scale.shape))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(z.reshape(m.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(lm.model)
    comp.compress_model(lm.model)
    lm.model.save_pretrained(path)
    comp.update_config(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("weights,acts", [
    ({"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 64}, None),
    ({"num_bits": 8, "symmetric": True, "strategy": "channel"},
     {"num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True}),
], ids=["w4a16g64", "w8a8"])
def test_load_evaluates_a_checkpoint_another_tool_wrote(tmp_path, weights, acts):
    path = _ct_checkpoint(tmp_path / "ct", weights, acts)
    ref = logits(_load(path), IDS)  # compressed-tensors' own forward
    qm = quantbench.quantize(str(path), "load")
    assert qm.info["scheme"] == ("w4a16g64" if acts is None else "w8a8")
    assert torch.equal(logits(qm.realize(), IDS), ref)
    res = quantbench.evaluate(qm, "ppl-austen", seqlen=64, ppl_windows=2)
    assert res["ppl-austen"]["ppl"] > 1


def test_load_refuses_what_it_cannot_read(tmp_path):
    lm = tiny_lm()
    lm.model.save_pretrained(tmp_path / "fp")
    lm.tokenizer.save_pretrained(tmp_path / "fp")
    with pytest.raises(ConfigError, match="not a compressed-tensors checkpoint"):
        quantbench.quantize(str(tmp_path / "fp"), "load")
    out = _quantized("rtn", "w4a16g64").save_pretrained(tmp_path / "q")
    with pytest.raises(ConfigError, match="is a w4a16g64 checkpoint: pass --scheme w4a16g64"):
        quantbench.quantize(str(out), "load", "w4a16")
    with pytest.raises(ConfigError, match="checkpoint folder"):
        quantbench.quantize("tiny-llama", "load")


def test_a_damaged_export_is_refused_naming_the_file(tmp_path):
    out = _quantized("rtn", "w4a16").save_pretrained(tmp_path / "q")
    cfg = out / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_bits": 4', '"num_bits": 4 ', 1))
    with pytest.raises(UnavailableError, match=r"config\.json is missing or does not match its sha256"):
        quantbench.quantize(str(out), "load")


def test_cli_exports_a_record_and_load_reproduces_its_number(tmp_path, capsys):
    res = tmp_path / "res"
    common = ["--model", "tiny-llama", "--tasks", "ppl-austen", "--seqlen", "64", "--ppl-windows", "2", "-q"]
    assert main(["run", "--method", "rtn", "--scheme", "w4a16g64", "--results-dir", str(res), *common]) == 0
    rec = next(res.glob("*.json"))
    value = json.loads(rec.read_text())["value"]
    assert main(["export", str(rec), "-o", str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert main(["export", str(rec), "-o", str(tmp_path / "ckpt")]) == 4  # exists: one line, nothing lost
    assert "exists and is not empty" in capsys.readouterr().err
    res2 = tmp_path / "res2"
    common[1] = str(tmp_path / "ckpt")
    assert main(["run", "--method", "load", "--scheme", "headline", "--results-dir", str(res2), *common]) == 0
    loaded = json.loads(next(res2.glob("*.json")).read_text())
    assert loaded["value"] == value and loaded["scheme"] == "w4a16g64"
    assert loaded["method_info"]["exported_from"]["method"] == "rtn"


def test_cli_refuses_before_any_work(tmp_path, capsys):
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps({"method": "smoothquant", "model": "tiny-llama", "scheme": "w8a8", "run_id": "x",
                               "scheme_spec": {"w": {"bits": 8, "grid": "sym_pm", "granularity": "channel",
                                                     "group_size": 0, "clip_ratio": 1.0},
                                               "a": {"bits": 8, "grid": "sym_pm", "granularity": "token",
                                                     "group_size": 0, "clip_ratio": 1.0}}}))
    assert main(["export", str(rec), "-o", str(tmp_path / "o")]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grid 'sym_pm'" in err[0] and not (tmp_path / "o").exists()
    assert main(["export", str(tmp_path / "nope.json"), "-o", str(tmp_path / "o")]) == 4


@pytest.mark.slow
@pytest.mark.parametrize("method,scheme,quantizers", [("rtn", "w4a16g64", None),
                                                       ("smoothquant", "w8a8", {"a": {"grid": "sym_ct"}})])
def test_smollm2_round_trip_is_exact(tmp_path, method, scheme, quantizers):
    calib = {"corpus": "austen", "nsamples": 2, "seqlen": 256, "seed": 0}
    qm = quantbench.quantize("smollm2-135m", method, scheme, calibration=calib if method != "rtn" else None,
                             quantizers=quantizers)
    ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(1))
    ref = logits(qm.realize(), ids)
    out = qm.save_pretrained(tmp_path / "smol")
    assert torch.equal(logits(_load(out), ids), ref)
    shutil.rmtree(out)


@pytest.mark.slow
def test_smollm2_gptq_export_reloaded_by_transformers_gives_the_records_ppl(tmp_path):
    """The issue's acceptance check: SmolLM2 GPTQ W4A16 exported, reloaded by plain transformers, ppl-austen on 2
    windows equal to the suite's own number to 1e-4 relative."""
    calib = {"corpus": "austen", "nsamples": 2, "seqlen": 512, "seed": 0}
    qm = quantbench.quantize("smollm2-135m", "gptq", "w4a16", calibration=calib)
    ours = quantbench.evaluate(qm, "ppl-austen", ppl_windows=2)["ppl-austen"]["ppl"]
    out = qm.save_pretrained(tmp_path / "smol")
    model = _load(out)
    from quantbench.models import load

    tok = load("smollm2-135m").tokenizer
    theirs = quantbench.evaluate(model, "ppl-austen", tokenizer=tok, ppl_windows=2)["ppl-austen"]["ppl"]
    assert theirs == pytest.approx(ours, rel=1e-4)
    shutil.rmtree(out)


def test_an_imported_checkpoint_is_its_own_row_with_its_weights_as_stored():
    from quantbench.reports import leaderboard

    spec = {"bits": 4, "grid": "sym", "granularity": "channel", "group_size": 0, "clip_ratio": 1.0}
    rec = {"method": "load", "method_options": {"label": "llm-compressor:gptq", "base": "smollm2-135m"},
           "scheme_spec": {"w": spec, "a": None}}
    assert leaderboard.row_name(rec) == leaderboard._method(rec) == "llm-compressor:gptq"
    assert leaderboard._desc(rec) == "W4 stored/channel"
    ours = {**rec, "method": "gptq", "method_options": {}}
    assert leaderboard.row_name(ours) == "gptq" and leaderboard._desc(ours) == "W4 sym/channel"
