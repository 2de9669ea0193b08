"""Offloading (quantbench.offload): a model dispatched by accelerate over a device map that leaves blocks off the
execution device computes the same logits, gives every weight back afterwards, and a whole offloaded bench run writes
the records of a resident one. Here the blocks go to disk (the CPU is the execution device); on a GPU machine they
wait in CPU memory, through the same dispatch."""
import json
import logging

import pytest
import torch

from quantbench import models, offload
from quantbench.backends.fake_quant import realize
from quantbench.errors import ConfigError
from quantbench.quant import parse_scheme
from quantbench.pipeline import resolve
from quantbench.results import ResultStore, without_timings
from quantbench.runner import RunConfig, run
from quantbench.tasks import make_task

SMALL = {"cpu": 1_300_000}  # bytes: the embeddings fit, the decoder blocks and lm_head do not (tiny-llama: 2.2 MB)


def test_dispatched_model_computes_the_same_and_gives_its_weights_back(ids, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    lm = models.load("tiny-llama")
    m = resolve("rtn")()
    model = realize(m.quantize(lm, parse_scheme("w4a4kv4", m.specs()), None))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with offload.dispatched(model, "cpu", SMALL) as d, torch.no_grad():
        assert set(d.hf_device_map.values()) == {"cpu", "disk"}
        assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # really off the device
        assert torch.equal(d(input_ids=ids).logits, ref)
    assert not any(hasattr(mod, "_hf_hook") for mod in model.modules()) and not hasattr(model, "hf_device_map")
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in state.items())
    assert not list((tmp_path / "offload").glob("*"))  # the disk copy is removed
    with pytest.raises(ConfigError, match="embeddings"), offload.dispatched(model, "cpu", {"cpu": 1000}):
        pass
    assert model.lm_head.weight.device.type == "cpu"  # given back after a failure too


def test_max_memory_from_env(monkeypatch):
    monkeypatch.setenv("QUANTBENCH_OFFLOAD_MAX_MEMORY", "0=70GiB, cpu=200GiB")
    assert offload.max_memory_from_env() == {0: "70GiB", "cpu": "200GiB"}
    monkeypatch.setenv("QUANTBENCH_OFFLOAD_MAX_MEMORY", "70GiB")
    with pytest.raises(ConfigError, match="DEVICE=SIZE"):
        offload.max_memory_from_env()


@pytest.mark.parametrize("method,calib,options", [
    ("duquant", {"nsamples": 2, "seqlen": 64}, {"steps": 4}),  # activation statistics: a whole-model pass
    ("rtn+normtweak", {"corpus": "generated", "nsamples": 2, "seqlen": 16}, {}),  # generation with a KV cache
])
def test_offloaded_run_writes_the_records_of_a_resident_run(method, calib, options, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="quantbench.offload")
    recs = []
    for off in (False, True):
        monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path / f"cache{off}"))  # nothing shared: both compute
        monkeypatch.setenv("QUANTBENCH_OFFLOAD_MAX_MEMORY", "cpu=2000000")  # blocks to disk
        store = ResultStore(tmp_path / f"r{off}")
        run(RunConfig(method, "tiny-llama", "w4a4", calibration=calib, options=options, offload=off),
            [make_task("ppl-austen", seqlen=64, max_windows=2)], store)
        (path,) = store.root.glob("*.json")
        recs.append(json.loads(path.read_text()))
    assert recs[1]["offload"] is True and recs[0]["offload"] is False
    passes = [r.getMessage() for r in caplog.records if r.name == "quantbench.offload"]
    assert len(passes) == 2 and all("'disk'" in p for p in passes)  # calibration's whole-model pass + evaluation
    a, b = (without_timings({k: v for k, v in r.items() if k != "offload"}) for r in recs)
    assert a == b
