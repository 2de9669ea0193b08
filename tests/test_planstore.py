"""Calibrated plans cached on disk (quantbench.planstore): a restored plan is the calibrated one, tensor for tensor,
for every calibrating method; a damaged or foreign entry is rebuilt; a code change is a new key."""
import hashlib
import json

import pytest
import torch

from quantbench import cache, models, planstore
from quantbench.backends.fake_quant import realize
from quantbench.data import Calibration
from quantbench.plan import plain_plan
from quantbench.quant import override_specs, parse_scheme
from quantbench.pipeline import resolve
from quantbench.results import ResultStore, without_timings
from quantbench.runner import RunConfig, calibration_config, run
from quantbench.tasks import make_task

from helpers import tiny_lm

CAL = {"corpus": "austen", "nsamples": 2, "seqlen": 64}


@pytest.fixture
def plans_on(monkeypatch, tmp_path):
    monkeypatch.setenv("QUANTBENCH_PLAN_CACHE", "1")
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))


def _digests(model):
    """Content digest of every state-dict tensor: the test's oracle of what a method changed."""
    out = {}
    for k, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
        out[k] = h.hexdigest()
    return out


def _quantize(name, method, scheme, options):
    m = resolve(method)(**options)
    lm = models.load(name)
    sch = parse_scheme(scheme, override_specs(m.specs(), {}))
    calib = Calibration(lm.tokenizer, **calibration_config(m, CAL), lm=lm)
    return m, lm, sch, calib


@pytest.mark.parametrize("name,method,scheme,options", [
    ("tiny-llama", "gptq", "w4a16", {}),
    ("tiny-mistral", "quarot-gptq", "w4a4kv4", {}),  # rotation: every tensor changes, lm_head untied
    ("tiny-llama", "smoothquant", "w8a8q8kv8", {}),
    ("tiny-mistral", "omniquant", "w4a4q4kv4", {"epochs": 1}),  # LET folded, LWC clips, GQA
    ("tiny-mistral", "duquant", "w4a4", {"steps": 4}),  # online Scale under GQA, rotations, permutations
    ("tiny-llama", "duquant-lwc", "w4a4", {"steps": 4, "epochs": 1}),
    ("tiny-llama", "gptq+normtweak", "w3a16", {}),
    ("tiny-opt", "quarot-gptq", "w4a4kv4", {}),  # LayerNorm -> RMSNorm, lm_head gains a bias (Method.restructure)
    ("tiny-opt", "omniquant", "w4a4", {"epochs": 1}),  # LET with shifts into LayerNorm and linear biases
    ("tiny-bloom", "duquant", "w4a4", {"steps": 4}),  # fused qkv, out and down smoothed online
    ("tiny-bloom", "gptq+normtweak", "w3a16", {}),  # LayerNorm weight and bias tweaked
])
def test_restored_plan_is_the_calibrated_one(name, method, scheme, options, ids):
    m, lm, sch, calib = _quantize(name, method, scheme, options)
    before = _digests(lm.model)
    qm = m.quantize(lm, sch, calib)
    changed = {k for k, d in _digests(qm.model).items() if d != before.get(k)}
    assert changed, "every calibrating method changes the model"
    declared = set(lm.adapter.tensor_names(m.modifies))
    assert changed <= declared, f"{method} changed tensors it does not declare: {sorted(changed - declared)[:4]}"
    state = planstore.to_state(qm, m.modifies)
    assert set(state["tensors"]) | set(state["from_codes"]) == declared
    fresh = models.load(name)
    m.restructure(fresh)  # as planstore.quantize does before restoring
    back = planstore.restore(plain_plan(fresh, sch), state)
    a, b = qm.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # a weight with codes is restored as the codes dequantized (all any backend reads)
        ref = qm.linears[k[:-7]].weight.dequantize(a[k].dtype) if k in state["from_codes"] else a[k]
        assert torch.equal(b[k], ref), k
    assert back.info == qm.info and qm.linears.keys() == back.linears.keys()
    for n, p in qm.linears.items():
        r = back.linears[n]
        assert (p.weight is None) == (r.weight is None) and p.act == r.act
        if p.weight is not None:
            assert torch.equal(p.weight.codes, r.weight.codes) and torch.equal(p.weight.scale, r.weight.scale)
            assert p.weight.spec == r.weight.spec
        x = torch.randn(3, a[n + ".weight"].shape[1])  # the linear's input
        assert [type(t) for t in p.pre] == [type(t) for t in r.pre]
        for t, u in zip(p.pre, r.pre):
            assert torch.equal(t(x), u(x))
            x = t(x)
    for i, att in qm.attention.items():
        assert (att.q, att.k, att.v) == (back.attention[i].q, back.attention[i].k, back.attention[i].v)
    with torch.no_grad():
        assert torch.equal(realize(qm)(input_ids=ids).logits, realize(back)(input_ids=ids).logits)


def test_tied_embedding_kept_tied_and_broken_tie_kept_broken():
    _, lm, sch, calib = _quantize("tiny-llama", "quarot-gptq", "w4a16", {})
    lm.model.lm_head.weight = lm.model.model.embed_tokens.weight  # tie, as SmolLM2 is
    qm = resolve("quarot-gptq")().quantize(lm, sch, calib)  # untie + rotate both differently
    fresh = models.load("tiny-llama")
    fresh.model.lm_head.weight = fresh.model.model.embed_tokens.weight
    back = planstore.restore(plain_plan(fresh, sch), planstore.to_state(qm, resolve("quarot-gptq").modifies))
    assert back.model.lm_head.weight is not back.model.model.embed_tokens.weight
    assert torch.equal(back.model.lm_head.weight, qm.model.lm_head.weight)
    assert torch.equal(back.model.model.embed_tokens.weight, qm.model.model.embed_tokens.weight)


def _run(tmp, d="r"):
    store = ResultStore(tmp / d)
    run(RunConfig("duquant", "tiny-llama", "w4a4", calibration=CAL, options={"steps": 4}),
        [make_task("ppl-austen", seqlen=64, max_windows=2)], store)
    (path,) = store.root.glob("*.json")
    return json.loads(path.read_text())


def test_second_run_reads_the_plan_and_writes_the_same_record(plans_on, tmp_path, caplog, monkeypatch):
    first = _run(tmp_path, "a")
    assert first["plan_source"] == "calibrated" and len(cache.entries("plans")) == 1
    second = _run(tmp_path, "b")
    assert second["plan_source"].startswith("cache:")
    assert without_timings(first) == without_timings(second)
    (entry,) = cache.entries("plans")
    entry.write_bytes(entry.read_bytes()[:-100])  # truncated: detected by its checksum, rebuilt
    third = _run(tmp_path, "c")
    assert third["plan_source"] == "calibrated" and "damaged" in caplog.text
    assert without_timings(third) == without_timings(first)
    monkeypatch.setattr(planstore, "code_digest", lambda: "other-code")  # a code change: a new key
    assert _run(tmp_path, "d")["plan_source"] == "calibrated" and len(cache.entries("plans")) == 2
    monkeypatch.setenv("QUANTBENCH_NO_CACHE", "1")
    assert _run(tmp_path, "e")["plan_source"] == "calibrated"


def test_a_plan_for_another_scheme_or_model_is_refused_before_touching_the_model(plans_on):
    m, lm, sch, calib = _quantize("tiny-llama", "gptq", "w4a16", {})
    state = planstore.to_state(m.quantize(lm, sch, calib), m.modifies)
    other = tiny_lm("tiny-llama", intermediate_size=384)  # same layers, other shapes
    ref = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError):
        planstore.restore(plain_plan(other, sch), state)
    with pytest.raises(ValueError, match="scheme"):
        planstore.restore(plain_plan(other, parse_scheme("w3a16")), state)
    assert all(torch.equal(v, other.model.state_dict()[k]) for k, v in ref.items())


def test_a_restructured_plan_is_read_back_and_a_misfit_is_undone(plans_on, ids):
    """QuaRot on OPT changes the module structure (RMSNorms, an lm_head bias): the second run restructures a fresh
    model, loads the cached tensors and gives the same logits; a cached plan that does not fit leaves the fresh
    model's LayerNorms as they were before recalibrating."""
    m, lm, sch, calib = _quantize("tiny-opt", "quarot-gptq", "w4a4kv4", {})
    key = "opt-restructure-test"
    first, source = planstore.quantize(m, lm, sch, calib, key)
    assert source == "calibrated"
    ref = realize(first)(ids).logits
    fresh = models.load("tiny-opt")
    second, source = planstore.quantize(m, fresh, sch, Calibration(fresh.tokenizer, **calibration_config(m, CAL),
                                                                   lm=fresh), key)
    assert source.startswith("cache:") and isinstance(fresh.adapter.final_norm, torch.nn.RMSNorm)
    assert torch.equal(realize(second)(ids).logits, ref)
    other = models.load("tiny-opt")
    undo = m.restructure(other)
    assert isinstance(other.adapter.final_norm, torch.nn.RMSNorm) and other.adapter.lm_head.bias is not None
    undo()
    assert isinstance(other.adapter.final_norm, torch.nn.LayerNorm) and other.adapter.lm_head.bias is None
    assert torch.equal(realize(plain_plan(other, sch))(ids).logits, realize(plain_plan(models.load("tiny-opt"),
                                                                                       sch))(ids).logits)
