"""Norm-tweaking and method pipelines: losses on hand-made tensors, the lr schedule, only norms change, the
language filter, seeded generation, composition rules, and a pipeline equals its parts run by hand."""
import math

import pytest
import torch

from quantbench import generate, models
from quantbench import normtweak as nt
from quantbench.data import Calibration
from quantbench.errors import ConfigError
from quantbench.quant import parse_scheme
from quantbench.pipeline import resolve

from helpers import tiny_lm


def _calib(n=4, seqlen=64):
    class C:
        windows = Calibration(models.tiny_tokenizer(), "austen", n, seqlen, 2).windows
    return C


def test_channel_losses_on_hand_made_tensors():
    q = torch.tensor([[0.0, 0.0], [2.0, 4.0]])  # tokens x channels: mean (1, 2), unbiased var (2, 8)
    f = torch.ones(2, 2)  # mean (1, 1), var (0, 0)
    s = math.sqrt(1e-6)
    authors = (0 + 1) + (math.sqrt(2 + 1e-6) - s) ** 2 + (math.sqrt(8 + 1e-6) - s) ** 2
    assert nt.channel_loss(q, f, "authors").item() == pytest.approx(authors, rel=1e-6)
    assert nt.channel_loss(q, f, "paper").item() == pytest.approx(((0 + 2) + (1 + 8)) / 2)
    assert nt.channel_loss(q, f, "mse").item() == pytest.approx((1 + 1 + 1 + 9) / 4)
    assert nt.channel_loss(f, f, "authors").item() == 0
    with pytest.raises(ValueError, match="unknown norm-tweak loss"):
        nt.channel_loss(q, f, "kl")


def test_lr_grows_linearly_with_depth_and_options_win():
    assert nt.lr_for(0, 30, 1e-5, 5) == 1e-5
    assert nt.lr_for(15, 30, 1e-5, 5) == pytest.approx(3.5e-5)
    assert nt.lr_settings("x", "llama", -1, -1)[:2] == nt.LR_TABLE["llama"][:2]
    assert nt.lr_settings("x", "llama", 1e-6, 0)[:2] == (1e-6, 0) and nt.lr_settings("x", "llama", 1e-6, 0)[2] == "option"


@pytest.mark.parametrize("text,ok", [("the", True), (" porque", True), ("中国", True), (" obrigado", True),
                                     ("Привет", False), ("1234", False), (" ", False), ("Straße", False)])
def test_language_filter(text, ok):
    assert generate.accepts(text) is ok


def test_ascii_filter_and_unknown_filter():
    assert generate.accepts("Hello", "ascii") and not generate.accepts(" 12", "ascii")
    assert not generate.accepts("中国", "ascii")
    with pytest.raises(ConfigError, match="unknown first-token filter"):
        generate.accepts("the", "fasttext")


def test_generation_is_seeded_reproducible_and_filtered():
    lm = tiny_lm()
    a = generate.generated_windows(lm, 3, 24, seed=1, use_cache=False)
    b = generate.generated_windows(lm, 3, 24, seed=1, use_cache=False)
    c = generate.generated_windows(lm, 3, 24, seed=2, use_cache=False)
    assert a.shape == (3, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(generate.accepts(lm.tokenizer.decode([int(t)])) for t in a[:, 0])
    assert lm.tokenizer.eos_token_id is None or not (a == lm.tokenizer.eos_token_id).any()
    with torch.no_grad():  # tokens 1..4 are greedy continuations
        for t in range(1, generate.GREEDY_TO):
            assert torch.equal(lm.model(a[:, :t]).logits[:, -1].argmax(-1), a[:, t])


def test_only_norm_parameters_change_while_tweaking(monkeypatch):
    from quantbench.methods.normtweak import NormTweak

    seen = []
    orig = NormTweak._tweak

    def spy(self, qm, ctx, targets, lr):
        block = ctx.block
        before = {n: p.detach().clone() for n, p in block.named_parameters()}
        plan = {n: qm.linears[n].weight.codes.clone() for n in qm.linears if n.startswith(ctx.prefix)}
        out = orig(self, qm, ctx, targets, lr)
        changed = {n for n, p in block.named_parameters() if not torch.equal(p, before[n])}
        same_plan = all(torch.equal(qm.linears[n].weight.codes, c) for n, c in plan.items())
        seen.append((changed, same_plan))
        return out

    monkeypatch.setattr(NormTweak, "_tweak", spy)
    resolve("gptq+normtweak")(nt_lr=1e-3).quantize(tiny_lm(), parse_scheme("w3a16"), _calib())
    assert len(seen) == 2
    for changed, same_plan in seen:
        assert changed == {"input_layernorm.weight", "post_attention_layernorm.weight"} and same_plan


@pytest.mark.parametrize("name,msg", [
    ("gptq+rtn", "two weight quantizers"), ("normtweak+gptq", "transforms first"),
    ("duquant+normtweak", "cannot be part of a pipeline"), ("gptq+", "malformed"),
    ("quarot+smoothquant+gptq", "two transforms"), ("nope+gptq", "unknown method 'nope'")])
def test_invalid_pipelines_are_clear_errors(name, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve(name)


def test_a_plugin_alone_is_a_clear_error():
    with pytest.raises(ConfigError, match="plug-in: put a base method before it"):
        resolve("normtweak")()


def _weights(qm):
    return {n: p.weight.dequantize() for n, p in qm.linears.items()}


def test_quarot_gptq_is_the_pipeline_quarot_plus_gptq():
    calib = _calib()
    named = resolve("quarot-gptq")().quantize(tiny_lm(), parse_scheme("w4a4"), calib)
    piped = resolve("quarot+gptq")().quantize(tiny_lm(), parse_scheme("w4a4"), calib)
    assert named.info["pipeline"] == ["quarot", "gptq"] and named.info["weights"] == "gptq"
    assert all(torch.equal(a, b) for a, b in zip(_weights(named).values(), _weights(piped).values()))


def test_pipeline_equals_running_its_parts_by_hand():
    from quantbench.methods.gptq import GPTQ
    from quantbench.methods.normtweak import NormTweak

    calib, scheme = _calib(), parse_scheme("w3a16")
    lm_a, lm_b = tiny_lm(), tiny_lm()
    piped = resolve("gptq+normtweak")(nt_lr=1e-3).quantize(lm_a, scheme, calib)
    base = GPTQ()
    by_hand = base.prepare(lm_b, scheme, calib)
    NormTweak(nt_lr=1e-3, _in_pipeline=True).run(lm_b, by_hand, base, calib)
    assert all(torch.equal(a, b) for a, b in zip(_weights(piped).values(), _weights(by_hand).values()))
    norms = lambda lm: [p for n, p in lm.model.named_parameters() if "norm" in n]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(norms(lm_a), norms(lm_b)))
    assert any(not torch.equal(p, torch.ones_like(p)) for p in norms(lm_a)[:-1])  # the tweak did something


def test_normtweak_with_no_steps_is_exactly_its_base():
    calib, scheme = _calib(), parse_scheme("w3a16")
    plain = resolve("gptq")().quantize(tiny_lm(), scheme, calib)
    piped = resolve("gptq+normtweak")(nt_epochs=0).quantize(tiny_lm(), scheme, calib)
    assert all(torch.equal(a, b) for a, b in zip(_weights(plain).values(), _weights(piped).values()))


@pytest.mark.parametrize("name,scheme", [("rtn+normtweak", "w4a8"), ("smoothquant+normtweak", "w8a8q8kv8")])
def test_plugin_on_weight_and_activation_methods(name, scheme):
    """On W+A bases the tweak trains through the fake-quantized block (activations and Q/K/V quantized)."""
    lm = tiny_lm()
    m = resolve(name)(nt_lr=1e-3)
    qm = m.quantize(lm, parse_scheme(scheme, m.specs()), _calib())
    assert qm.info["pipeline"] == name.split("+") and qm.info["normtweak"]["loss"] == "authors"
    assert all(v is not None and math.isfinite(v) for v in qm.info["normtweak"]["mean_loss"].values())
    assert all(p.weight is not None and p.act is not None for p in qm.linears.values())


def test_half_precision_models_are_tweaked_in_fp32_and_cast_back():
    lm = tiny_lm()
    lm.model.to(torch.bfloat16)
    qm = resolve("rtn+normtweak")(nt_lr=1e-2).quantize(lm, parse_scheme("w4a16"), _calib())
    norms = [p for n, p in lm.model.named_parameters() if "layernorm" in n]
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    assert any(not torch.equal(p, torch.ones_like(p)) for p in norms)
    assert all(math.isfinite(v) for v in qm.info["normtweak"]["mean_loss"].values())
