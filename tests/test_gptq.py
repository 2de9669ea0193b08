"""GPTQ and the layer-wise runner: GPTQ beats RTN on a layer's output, its options do what they say, the
runner's captured and propagated inputs are exactly the model's hidden states, the method fills every plan."""
import pytest
import torch

from quantbench import models
from quantbench.backends.fake_quant import realize
from quantbench.data import Calibration
from quantbench.errors import ConfigError
from quantbench.layerwise import run_blocks
from quantbench.plan import plain_plan
from quantbench.quant import QuantSpec, _grouped, parse_scheme, qparams, quantize
from quantbench.pipeline import resolve
from quantbench.weights import GPTQConfig, Hessian, gptq_quantize

from helpers import tiny_lm


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(256, 256, generator=g) / 16
    x = torch.randn(2048, 256, generator=g) @ mix + 0.1 * torch.randn(2048, 256, generator=g)
    x[:, :4] *= 20  # a few outlier channels, as in LLM activations
    w = torch.randn(128, 256, generator=g)
    h = Hessian(256, "cpu")
    for chunk in x.split(256):
        h.add(chunk[None])
    return x, w, h.h


def out_err(x, w, wq):
    return ((x @ (w - wq).T) ** 2).mean().item()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("spec_kw", [dict(granularity="channel"), dict(granularity="group", group_size=64)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_is_below_rtn(layer, bits, spec_kw, act_order):
    x, w, h = layer
    spec = QuantSpec(bits, "sym", **spec_kw)
    qt = gptq_quantize(w, h, spec, GPTQConfig(act_order=act_order))
    assert qt.codes.min() >= spec.qrange[0] and qt.codes.max() <= spec.qrange[1]
    assert out_err(x, w, qt.dequantize()) < 0.5 * out_err(x, w, quantize(w, spec).dequantize())


def test_act_order_with_groups_uses_static_groups_from_the_unquantized_weight(layer):
    x, w, h = layer
    spec = QuantSpec(4, "asym", "group", group_size=64)
    qt = gptq_quantize(w, h, spec, GPTQConfig(act_order=True))
    scale, zero = qparams(_grouped(w, spec), spec)
    assert torch.equal(qt.scale, scale) and torch.equal(qt.zero, zero)
    dynamic = gptq_quantize(w, h, spec, GPTQConfig())
    assert not torch.equal(dynamic.scale, scale)  # groups after the first see the error-updated weight


def test_mse_clip_and_dead_columns(layer):
    x, w, h = layer
    spec = QuantSpec(3, "sym")
    clipped = gptq_quantize(w, h, spec, GPTQConfig(w_clip=True))
    plain = gptq_quantize(w, h, spec, GPTQConfig())
    assert (clipped.scale <= plain.scale + 1e-7).all() and (clipped.scale < plain.scale).any()
    h2 = h.clone()
    h2[5, :], h2[:, 5] = 0, 0
    assert (gptq_quantize(w, h2, spec).dequantize()[:, 5] == 0).all()


def test_gptq_config_validation():
    with pytest.raises(ConfigError, match="percdamp"):
        GPTQConfig(percdamp=-1)
    with pytest.raises(ConfigError, match="group size 48 does not divide"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), QuantSpec(4, "sym", "group", 48))


def test_layerwise_runner_inputs_are_the_models_hidden_states():
    lm = models.load("tiny-mistral")
    ids = torch.randint(0, 1024, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = lm.model(ids, output_hidden_states=True).hidden_states
    calls, last = [], []

    def step(ctx):
        torch.testing.assert_close(torch.cat(ctx.inputs), hidden[ctx.index], rtol=1e-5, atol=1e-5)
        lin = lm.adapter.linears(ctx.block)
        ctx.feed({lin["o"]: lambda x: calls.append(x.shape), lin["q"]: lambda x: None})
        if ctx.index == len(lm.adapter.blocks) - 1:
            last[:] = ctx.forward()

    done = run_blocks(plain_plan(lm, parse_scheme("w4a16")), ids, step)
    assert calls == [(1, 40, 128)] * 3 * 2  # once per window and block, each pass stopped early
    assert done.resumed == [] and done.wall_s > 0
    final = lm.adapter.final_norm(torch.cat(last))
    torch.testing.assert_close(final, hidden[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["gptq", "quarot-gptq"])
def test_gptq_methods_quantize_every_linear_and_beat_rtn(tokenizer, method):
    calib = Calibration(tokenizer, corpus="austen", nsamples=8, seqlen=128, seed=0)
    ids = Calibration(tokenizer, corpus="austen", nsamples=2, seqlen=128, seed=1).windows  # held-out text
    ref = models.load("tiny-llama").model(ids).logits.detach()
    err, info = {}, {}
    for name in (method, "rtn" if method == "gptq" else "quarot"):
        lm = models.load("tiny-llama")
        qm = resolve(name)().quantize(lm, parse_scheme("w3a16"), calib)
        assert set(qm.linears) == {n for n, *_ in lm.adapter.named_linears()}
        assert all(p.weight is not None for p in qm.linears.values())
        info[name] = qm.info

        with torch.no_grad():
            err[name] = (realize(qm)(ids).logits - ref).pow(2).mean().item()
    assert info[method]["gptq"]["percdamp"] == 0.01 and info[method]["gptq_wall_s"] > 0
    assert err[method] < err["rtn" if method == "gptq" else "quarot"]


def test_gptq_rounds_exact_ties_half_to_even():
    """With ``H = I`` GPTQ spreads no error (the damped inverse is diagonal), so its codes are the quantizer's."""
    w = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
    q = gptq_quantize(w, torch.eye(8), QuantSpec(4, "sym", "channel"))
    assert q.codes.tolist() == [[7, 0, 2, 2, 0, -2, -2, 4]]


def test_gptq_damping_solves_a_rank_deficient_hessian():
    """Duplicated input columns make ``H`` singular with no dead column: only the ``percdamp · mean(diag H)``
    damping (GPTQ ``fasterquant``) makes its Cholesky factor exist. The result equals GPTQ on the explicitly
    damped ``H`` without damping of its own, and still beats RTN on the layer's output."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 16, generator=g)
    x = torch.cat([base, base, 2 * base[:, :8]], dim=1)  # 40 columns, rank 16
    h = Hessian(40, "cpu")
    for chunk in x.split(64):
        h.add(chunk)
    assert torch.linalg.matrix_rank(h.h.double()).item() == 16 and (h.h.diagonal() > 0).all()
    w = torch.randn(24, 40, generator=g)
    spec = QuantSpec(3, "sym", "channel")
    got = gptq_quantize(w, h.h, spec, GPTQConfig(percdamp=0.01))
    damped = h.h.clone()
    damped.diagonal().add_(0.01 * damped.diagonal().mean())
    assert torch.equal(got.codes, gptq_quantize(w, damped, spec, GPTQConfig(percdamp=0.0)).codes)
    out = lambda q: x @ q.dequantize().T  # noqa: E731
    assert (out(got) - x @ w.T).pow(2).mean() < (out(quantize(w, spec)) - x @ w.T).pow(2).mean()


def _gptq_by_full_passes(qm, ctx, spec, cfg):
    """GPTQ's block step as the reference runs it: every group's Hessians from a full pass of the block, each
    Hessian fed on its own, the outputs from one more full pass (no replay, no shared products)."""
    from quantbench.weights import _set_weight
    from quantbench.simulate import unwrap
    lins = {r: unwrap(m) for r, m in qm.adapter.linears(ctx.block).items()}
    for roles in (("k", "v", "q"), ("o",), ("up", "gate"), ("down",)):  # QuaRot gptq_fwrd ``sequential``
        hs = {r: Hessian(lins[r].in_features, "cpu") for r in roles}
        for x in ctx.inputs:
            seen = {}
            hooks = [lins[r].register_forward_hook(lambda m, a, o, r=r: seen.__setitem__(r, a[0].clone()))
                     for r in roles]
            with torch.no_grad():
                ctx.block(x, **ctx.kwargs)
            for h in hooks:
                h.remove()
            for r in roles:
                hs[r].add(seen[r])
        for r in roles:
            _set_weight(qm, qm.adapter.linear_name(ctx.index, r), lins[r], gptq_quantize(lins[r].weight, hs[r].h, spec, cfg))
    with torch.no_grad():
        ctx.outputs = [ctx.block(x, **ctx.kwargs) for x in ctx.inputs]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_gptq_replay_gives_the_codes_and_outputs_of_full_passes(name):
    """The runner's attention replay and the shared q/k/v Hessian products change no bit: codes and every block's
    outputs equal those of full passes; and the replay really runs attention and the MLP in only 2 of the 5 passes."""
    from quantbench.weights import gptq_block
    ids = torch.randint(0, 1024, (3, 48), generator=torch.Generator().manual_seed(2))
    spec, cfg = QuantSpec(3, "sym", "channel"), GPTQConfig()
    got, calls, mlp = {}, {}, {}
    for how in ("replay", "full"):
        lm = tiny_lm(name)
        qm = plain_plan(lm, parse_scheme("w3a16"))
        outs, n = [], [0, 0]
        for block in lm.adapter.blocks:
            lm.adapter.attention(block).register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
            block.mlp.register_forward_pre_hook(lambda *_: n.__setitem__(1, n[1] + 1))

        def step(ctx):
            if how == "replay":
                gptq_block(qm, ctx, spec, cfg, outputs=True)
            else:
                _gptq_by_full_passes(qm, ctx, spec, cfg)
            outs.append([y.clone() for y in ctx.outputs])

        run_blocks(qm, ids, step)
        got[how] = ({k: p.weight.codes for k, p in qm.linears.items()}, outs)
        calls[how], mlp[how] = n
    (codes_r, outs_r), (codes_f, outs_f) = got["replay"], got["full"]
    assert all(torch.equal(codes_r[k], codes_f[k]) for k in codes_f)
    assert all(torch.equal(a, b) for ra, rb in zip(outs_r, outs_f) for a, b in zip(ra, rb))
    blocks = len(outs_f)
    assert calls["full"] == 5 * 3 * blocks and calls["replay"] == 2 * 3 * blocks and (mlp["full"], mlp["replay"]) == (5 * 3 * blocks, 2 * 3 * blocks)


def test_shared_hessians_equal_their_own_products_and_only_for_the_same_tensor():
    x = torch.randn(2, 40, 24, generator=torch.Generator().manual_seed(3))
    shared: list = []
    a, b, own = Hessian(24, "cpu", shared), Hessian(24, "cpu", shared), Hessian(24, "cpu")
    for w in x:
        a.add(w)
        b.add(w)
        own.add(w)
    assert torch.equal(a.h, own.h) and torch.equal(b.h, own.h)
    memo: list = []
    d, e, alone = Hessian(24, "cpu", memo), Hessian(24, "cpu", memo), Hessian(24, "cpu")
    d.add(x[0])
    e.add(x[1])  # same shape and count, another tensor: its own product, not d's
    alone.add(x[1])
    assert torch.equal(e.h, alone.h) and not torch.equal(e.h, d.h)
