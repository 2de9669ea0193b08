"""Per-block resume of the layer-wise methods: a run killed in block 1 resumes after block 0 from its checkpoint,
does not calibrate block 0 again, and ends with the plan of an uninterrupted run, bit for bit."""
import pytest
import torch

from quantbench import models, planstore
from quantbench.backends.fake_quant import realize
from quantbench.data import Calibration
from quantbench.layerwise import BlockCheckpoint
from quantbench.quant import parse_scheme
from quantbench.pipeline import resolve
from quantbench.runner import calibration_config

CAL = {"corpus": "austen", "nsamples": 2, "seqlen": 64}


def _quantize(method, scheme, options, key=None):
    m = resolve(method)(**options)
    lm = models.load("tiny-mistral")
    return m.quantize(lm, parse_scheme(scheme, m.specs()), Calibration(lm.tokenizer, **calibration_config(m, CAL)),
                      key=key)


@pytest.mark.parametrize("method,scheme,options,tag", [
    ("gptq", "w4a16", {}, "gptq"),
    ("quarot-gptq", "w4a4", {}, "gptq"),  # GPTQ on the rotated model's online view
    ("duquant", "w4a4", {"steps": 6}, "duquant"),  # searches draw from a generator: its state is checkpointed
    ("duquant-lwc", "w4a4", {"steps": 6, "epochs": 2}, "duquant-lwc"),  # trained clips, two streams
    ("omniquant", "w4a4", {"epochs": 1}, "omniquant"),
    ("gptq+normtweak", "w3a16", {}, "normtweak"),  # GPTQ codes + tweaked norms per block
    ("rtn+normtweak", "w4a4", {}, "normtweak"),
])
def test_killed_run_resumes_after_its_last_finished_block(method, scheme, options, tag, tmp_path, monkeypatch, ids):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    full = _quantize(method, scheme, options)
    real_save, saved = BlockCheckpoint.save, []

    def save(self, i, state):  # a kill at the end of block 1, before its checkpoint is written
        saved.append(i)
        if i == 1 and kill:
            raise KeyboardInterrupt("killed in block 1")
        real_save(self, i, state)

    kill = True
    monkeypatch.setattr(BlockCheckpoint, "save", save)
    with pytest.raises(KeyboardInterrupt):
        _quantize(method, scheme, options, key="k1")
    assert saved == [0, 1] and list(BlockCheckpoint(tag, "k1").blocks) == [0]
    kill, saved[:] = False, []
    resumed = _quantize(method, scheme, options, key="k1")
    assert saved == [1]  # block 0 restored from the checkpoint, not calibrated again
    assert not list((tmp_path / "checkpoints").glob("*"))  # removed once the method finished
    info = resumed.info
    assert [0] in (info.get("resumed_blocks"), info.get("gptq_resumed_blocks"), info.get("normtweak", {}).get(
        "resumed_blocks"))
    a = planstore.to_state(full, resolve(method).modifies)
    b = planstore.to_state(resumed, resolve(method).modifies)
    for n, d in a["linears"].items():
        e = b["linears"][n]
        assert all(torch.equal(d["weight"][k], e["weight"][k]) for k in ("codes", "scale")), n
        assert [x.keys() for x in d["pre"]] == [y.keys() for y in e["pre"]], n
        assert all(torch.equal(x[k], y[k]) for x, y in zip(d["pre"], e["pre"]) for k in x if torch.is_tensor(x[k]))
    with torch.no_grad():
        assert torch.equal(realize(full)(input_ids=ids).logits, realize(resumed)(input_ids=ids).logits)


def test_block_checkpoint_resumes_only_an_unbroken_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    ck = BlockCheckpoint("t", "k")
    for i in range(4):
        ck.save(i, {"x": torch.full((2,), float(i)), "n": i, "none": None})
    assert sorted(BlockCheckpoint("t", "k").blocks) == [0, 1, 2, 3]
    (tmp_path / "checkpoints" / "t-k" / "2.pt").write_bytes(b"truncated")  # damaged: 2 and 3 are redone
    back = BlockCheckpoint("t", "k")
    assert sorted(back.blocks) == [0, 1] and torch.equal(back.blocks[1]["x"], torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "t-k").iterdir()) == ["0.pt", "0.sha256", "1.pt",
                                                                                    "1.sha256"]
    back.done()
    assert not (tmp_path / "checkpoints" / "t-k").exists() and not BlockCheckpoint("t", "k").blocks
    mem = BlockCheckpoint("t", None)
    mem.save(0, {"x": torch.ones(1)})
    assert mem.dir is None and not mem.blocks  # no key: nothing written, nothing held
