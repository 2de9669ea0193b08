"""Fake-quant backend: 16 bits == FP exactly, the plan's math per layer, attention hooks, batch independence."""
import torch
import torch.nn.functional as F

from quantbench import models
from quantbench.backends.fake_quant import realize
from quantbench.simulate import FakeQuantLinear
from quantbench.plan import AttentionPlan, LinearPlan, QuantizedModel
from quantbench.quant import QuantSpec, fake_quant, parse_scheme, quantize
from quantbench.pipeline import resolve
from quantbench.transforms import BlockRotation


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantized(name, scheme, method="rtn"):
    lm = models.load(name)
    qm = resolve(method)().quantize(lm, parse_scheme(scheme), None)
    return realize(qm), lm


def test_16_bits_is_fp_exactly(tiny, ids):
    ref = logits(tiny.model, ids)
    model, _ = quantized(tiny.info["name"], "w16a16")
    assert any(isinstance(m, FakeQuantLinear) for m in model.modules())
    assert torch.equal(logits(model, ids), ref)


def test_rtn_moves_output_by_bits(ids):
    ref = logits(models.load("tiny-llama").model, ids)
    err = {s: (logits(quantized("tiny-llama", s)[0], ids) - ref).abs().mean().item()
           for s in ("w8a8", "w4a16", "w4a4", "w2a16")}
    assert 0 < err["w8a8"] < err["w4a16"] < err["w2a16"]
    assert err["w4a16"] < err["w4a4"]


def test_linear_plan_math():
    lin = torch.nn.Linear(128, 64, bias=True)
    w_spec, a_spec = QuantSpec(4, "sym", "channel"), QuantSpec(4, "minmax", "token")
    rot = BlockRotation(torch.linalg.qr(torch.randn(64, 64))[0])
    plan = LinearPlan(weight=quantize(rot.fold(lin.weight.detach()), w_spec), pre=[rot], act=a_spec)
    x = torch.randn(2, 7, 128)
    expected = F.linear(fake_quant(rot(x), a_spec), fake_quant(rot.fold(lin.weight.detach()), w_spec), lin.bias)
    assert torch.equal(FakeQuantLinear(lin, plan)(x), expected)


def test_plan_with_folded_rotation_only_is_invariant(ids):
    """An online rotation whose inverse is folded into the weight, with no quantization: same logits."""
    lm = models.load("tiny-llama")
    ref = logits(lm.model, ids)
    qm = QuantizedModel(lm.model, lm.adapter, parse_scheme("w16a16"))
    rot = BlockRotation(torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0].float())
    for name, _, _, lin in lm.adapter.named_linears():
        lin.weight.data = rot.fold(lin.weight.data)
        qm.linears[name] = LinearPlan(weight=None, pre=[rot])
    torch.testing.assert_close(logits(realize(qm), ids), ref, rtol=1e-4, atol=1e-4)


def test_attention_plan_is_applied(ids, monkeypatch):
    lm = models.load("tiny-llama")
    ref = logits(lm.model, ids)
    seen = []
    orig = AttentionPlan.apply
    monkeypatch.setattr(AttentionPlan, "apply", lambda self, q, k, v: seen.append(k.shape) or orig(self, q, k, v))
    qm = QuantizedModel(lm.model, lm.adapter, parse_scheme("w16a16kv4"),
                        attention={i: AttentionPlan(k=QuantSpec(4, "sym", "token"), v=QuantSpec(4, "sym", "token"))
                                   for i in range(2)})
    out = logits(realize(qm), ids)
    assert len(seen) == 2 and seen[0] == (2, 2, ids.shape[1], 32)  # [B, kv heads, T, head_dim] after RoPE
    assert not torch.allclose(out, ref)


def test_per_token_activation_quant_is_batch_independent(ids):
    model, _ = quantized("tiny-llama", "w4a4kv4")
    together = logits(model, ids)
    apart = torch.cat([logits(model, ids[:1]), logits(model, ids[1:])])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def test_nan_weight_is_a_clear_error_naming_the_layer():
    import pytest

    from quantbench.errors import ConfigError

    lm = models.load("tiny-llama")
    lm.model.model.layers[1].mlp.up_proj.weight.data[3, 5] = float("nan")
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj: .*NaN/inf.*\(256, 128\)"):
        resolve("rtn")().quantize(lm, parse_scheme("w4a4"), None)
