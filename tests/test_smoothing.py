"""SmoothQuant and OmniQuant: smoothing/LET fusions are exact with quantization off, the training view computes
what the fused plan computes, LWC learns, the NaN guard restores, statistics are cached safely, runs resume."""
import pytest
import torch

from quantbench import models
from quantbench.backends.fake_quant import realize
from quantbench.blocktrain import QLinearView, train
from quantbench.data import Calibration
from quantbench.layerwise import BlockCheckpoint, run_blocks
from quantbench.plan import plain_plan
from quantbench.simulate import swap_modules
from quantbench.quant import LearnableClip, QuantSpec, fake_quant, parse_scheme
from quantbench.pipeline import resolve
from quantbench.stats import activation_stats

from helpers import logits, randomize_norms, tiny_lm


@pytest.fixture(scope="module")
def windows():
    return Calibration(models.tiny_tokenizer(), "austen", 4, 96, 2).windows


def test_smoothquant_fusion_is_exact(tiny, windows):
    randomize_norms(tiny.model)
    ref = logits(tiny.model, windows)
    qm = resolve("smoothquant")(alpha=0.7).quantize(tiny, parse_scheme("w16a16"), _calib(windows))
    torch.testing.assert_close(logits(realize(qm), windows), ref, rtol=1e-4, atol=1e-4)
    ln1 = tiny.adapter.norms(tiny.adapter.blocks[0])[0]
    assert not torch.allclose(ln1.weight, torch.ones_like(ln1.weight))  # smoothing really happened
    assert qm.info["alpha"] == 0.7 and qm.info["not_smoothed"] == ["o_proj", "down_proj"]


class _calib:
    def __init__(self, w):
        self.windows = w


def test_smoothquant_alpha_table():
    from quantbench.methods.smoothquant import alpha_for

    assert alpha_for("meta-llama/Llama-2-70b-hf", -1) == (0.9, "reference table")
    assert alpha_for("mistralai/Mistral-7B-v0.1", -1)[0] == 0.8
    assert alpha_for("someone/else", -1) == (0.5, "code default (model not in the reference table)")
    assert alpha_for("mistralai/Mistral-7B-v0.1", 0.3) == (0.3, "option")


def _rope_paired(n_kv_rows, head_dim, g):
    half = torch.rand(n_kv_rows // head_dim, head_dim // 2, generator=g) + 0.5
    return torch.cat([half, half], -1).reshape(-1)  # RoPE rotates channel i with i + head_dim/2


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA (v->o LET possible) and GQA (skipped)
def test_let_fusion_and_training_view_are_exact(windows, kv_heads):
    from quantbench.methods.omniquant import OmniQuant

    lm = tiny_lm(num_key_value_heads=kv_heads)
    ad = lm.adapter
    ref = logits(lm.model, windows)
    g = torch.Generator().manual_seed(0)
    p = torch.nn.ParameterDict({"qkv": torch.rand(128, generator=g) + 0.5, "fc1": torch.rand(128, generator=g) + 0.5,
                                "qkt": _rope_paired(kv_heads * 32, 32, g)})
    if kv_heads == 4:
        p["out"] = torch.rand(128, generator=g) + 0.5
    block = ad.blocks[0]
    lin = ad.linears(block)
    from quantbench.smoothing import expand_kv

    get = lambda k: (lambda: p[k]) if k in p else None  # noqa: E731
    inv = lambda k: (lambda: 1 / p[k]) if k in p else None  # noqa: E731
    spec = dict(q=(get("qkv"), get("qkv"), lambda: 1 / expand_kv(p["qkt"], 4 // kv_heads, 32)),
                k=(get("qkv"), get("qkv"), get("qkt")), v=(get("qkv"), get("qkv"), inv("out")),
                o=(None, get("out"), None), gate=(get("fc1"), get("fc1"), None), up=(get("fc1"), get("fc1"), None),
                down=(None, None, None))
    restore = swap_modules(block, {ad.LINEARS[r]: QLinearView(lin[r], None, None, None, *spec[r]) for r in lin})
    torch.testing.assert_close(logits(lm.model, windows), ref, rtol=1e-4, atol=1e-4)  # the view, quant off
    restore()
    OmniQuant._fuse(ad, block, p)
    torch.testing.assert_close(logits(lm.model, windows), ref, rtol=1e-4, atol=1e-4)  # fused in place


def test_lwc_learns_and_nan_guard_restores():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    lin.weight.data = torch.randn(32, 64, generator=g)  # Gaussian rows: a clip below 1 pays off at 3 bits
    x = torch.randn(256, 64, generator=g)
    target = lin(x).detach()
    clip = LearnableClip(32)
    view = QLinearView(lin, QuantSpec(3, "minmax"), None, clip)
    lin.requires_grad_(False)
    loss_at = lambda j: torch.nn.functional.mse_loss(view(x), target)  # noqa: E731
    first = loss_at(0).item()
    info = train([{"params": list(clip.parameters()), "lr": 5e-2}], loss_at, 4, 30, "test")
    assert info["epochs_run"] == 30 and info["loss"][-1] < 0.95 * first, (first, info["loss"])
    assert torch.sigmoid(clip.upbound).mean() < 0.9  # it learned to clip
    start = {k: v.clone() for k, v in clip.state_dict().items()}
    calls = {"n": 0}

    def poisoned(j):
        calls["n"] += 1
        return loss_at(j) * (float("nan") if calls["n"] == 7 else 1.0)  # NaN in the second epoch

    info = train([{"params": list(clip.parameters()), "lr": 1e-2}], poisoned, 4, 5, "test")
    assert info["nan_restored"] and info["epochs_run"] == 1
    after_first_epoch = clip.upbound.detach().clone()
    assert torch.isfinite(clip.upbound).all() and not torch.equal(after_first_epoch, start["upbound"])
    # restored to the start of epoch 2, i.e. the state after epoch 1 (not NaN, not mid-epoch)


def test_activation_stats_are_exact_and_cache_detects_damage(windows, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    lm = models.load("tiny-llama")
    seen = []
    h = lm.adapter.linears(lm.adapter.blocks[1])["down"].register_forward_hook(lambda m, a, o: seen.append(a[0]))
    stats = activation_stats(lm, windows)
    h.remove()
    manual = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).abs().amax(0)
    assert torch.equal(stats["model.layers.1.mlp.down_proj"]["absmax"], manual)
    files = list((tmp_path / "act-stats").glob("*.pt"))
    assert len(files) == 1
    again = activation_stats(lm, windows)
    assert torch.equal(again["model.layers.1.mlp.down_proj"]["absmax"], manual)
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncate: must be detected and rebuilt
    rebuilt = activation_stats(lm, windows)
    assert "damaged" in caplog.text
    assert torch.equal(rebuilt["model.layers.1.mlp.down_proj"]["absmax"], manual)
    other = activation_stats(lm, windows[:2])  # other windows: another key, never the cached entry
    assert len(list((tmp_path / "act-stats").glob("*.pt"))) == 2 and other is not None


def test_layerwise_fp_stream_is_the_fp_model():
    lm = models.load("tiny-llama")
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    seen = []

    def step(ctx):
        out = torch.cat(ctx.fp_targets)
        if ctx.index + 1 == len(lm.adapter.blocks):  # HF's last hidden state has the final norm applied
            out = lm.adapter.final_norm(out)
        torch.testing.assert_close(out, hidden[ctx.index + 1], rtol=1e-5, atol=1e-5)
        if ctx.index:
            assert all((x == 0).all() for x in ctx.inputs)  # what the previous step set as its outputs
        seen.append(ctx.index)
        ctx.outputs = [x * 0 for x in ctx.inputs]  # the quantized stream may diverge freely

    run_blocks(plain_plan(lm, parse_scheme("w4a16")), ids, step, fp_stream=True)
    assert seen == [0, 1]


def _omni(lm, windows, run_key=None, **opts):
    m = resolve("omniquant")(**{"epochs": 2, **opts})
    return m.quantize(lm, parse_scheme("w4a4q4kv4", m.specs()), _calib(windows), key=run_key)


def test_omniquant_training_helps_and_records_what_it_did(windows):
    held_out = Calibration(models.tiny_tokenizer(), "austen", 4, 96, 7).windows
    ref = logits(models.load("tiny-llama").model, held_out)
    err = {}
    for epochs in (0, 4):
        qm = _omni(models.load("tiny-llama"), windows, epochs=epochs)
        err[epochs] = (logits(realize(qm), held_out) - ref).pow(2).mean().item()
    assert err[4] < 0.9 * err[0]  # block-wise LET + LWC training reduces the error of its own initialisation
    assert qm.info["let"] == ["fc1", "qkt", "qkv"] and qm.info["let_skipped"] == ["out (GQA)"]
    assert all(p.weight is not None and p.weight.spec.grid == "minmax" for p in qm.linears.values())
    assert qm.attention[0].k.granularity == "head" and qm.attention[0].q.bits == 4
    assert all(loss is not None for loss in qm.info["final_loss"].values())
    m = resolve("omniquant")(epochs=1)
    wo = m.quantize(models.load("tiny-llama"), parse_scheme("w4a16", m.specs()), _calib(windows))
    assert wo.info["let"] == [] and wo.info["weights"] == "omniquant (LWC)"  # weight-only: LWC alone


def test_omniquant_resumes_from_its_block_checkpoint(windows, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTBENCH_CACHE", str(tmp_path))
    full = _omni(models.load("tiny-llama"), windows)
    import quantbench.methods.omniquant as om

    real_train = om.train
    calls = []

    def dying(groups, loss_at, n, epochs, desc, before_step=None):
        calls.append(desc)
        if desc.endswith("block 1"):
            raise KeyboardInterrupt("killed")
        return real_train(groups, loss_at, n, epochs, desc, before_step)

    monkeypatch.setattr(om, "train", dying)
    with pytest.raises(KeyboardInterrupt):
        _omni(models.load("tiny-llama"), windows, run_key="abc")
    ckpt = tmp_path / "checkpoints" / "omniquant-abc"
    assert ckpt.exists() and list(BlockCheckpoint("omniquant", "abc").blocks) == [0]
    monkeypatch.setattr(om, "train", real_train)
    resumed = _omni(models.load("tiny-llama"), windows, run_key="abc")
    assert resumed.info["resumed_blocks"] == [0] and not ckpt.exists()
    for name, plan in full.linears.items():
        assert torch.equal(plan.weight.codes, resumed.linears[name].weight.codes), name


def test_fake_quant_head_granularity_is_per_token_and_head():
    x = torch.randn(1, 2, 3, 4)
    x[:, 0] *= 50
    from quantbench.plan import AttentionPlan

    out = AttentionPlan(k=QuantSpec(4, "minmax", "head")).apply(x, x, x)[1]
    torch.testing.assert_close(out, fake_quant(x, QuantSpec(4, "minmax", "token")))
