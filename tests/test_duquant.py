"""DuQuant: the fast rotation search equals the reference loop, the zigzag order is exact, the transformed model is
FP-exact for any batch size, and the method's plan has the structure of the reference."""
import pytest
import torch

from quantbench import duquant as dq
from quantbench import models
from quantbench.backends.fake_quant import realize
from quantbench.data import Calibration
from quantbench.errors import ConfigError
from quantbench.quant import parse_scheme
from quantbench.registry import METHODS

from helpers import logits, tiny_lm


def planted(seed, tokens=256, channels=1024):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=g) * 0.2
    x[0, 7], x[0, 900], x[3, 33] = 1400.0, -900.0, 300.0  # massive activations at a few tokens
    x[:, 100:116] *= 25  # a band of normal outlier channels
    return x


def test_step_matrix_is_orthogonal_with_uniform_first_row():
    r = dq.givens_init(16)
    torch.testing.assert_close(r @ r.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(r[0], torch.full((16,), 16 ** -0.5, dtype=torch.float64), rtol=0, atol=1e-12)
    m = dq.step_matrix(16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(m @ m.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-12)
    s = dq.swapped(m, 5)
    assert torch.equal(s[0, 0], m[5, 5]) and torch.equal(s[5, 0], m[0, 5]) and torch.equal(s[1, 1], m[1, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", dq.MODES)
def test_fast_search_equals_reference_loop(seed, mode):
    x = planted(seed)
    ref = dq.greedy_rotation_reference(x, 128, 48, mode, torch.Generator().manual_seed(seed))
    fast = dq.greedy_rotation(x, 128, 48, mode, torch.Generator().manual_seed(seed))
    assert fast.steps == ref.steps and fast.kept == ref.kept and fast.scores == ref.scores
    assert torch.equal(fast.rotation, ref.rotation)
    assert 0 < ref.kept and ref.scores[ref.kept] < ref.scores[0] / 3  # the rotation really flattens outliers


def test_repo_and_paper_modes_differ_as_documented():
    x = planted(0)
    repo = dq.greedy_rotation(x, 128, 8, "repo", torch.Generator().manual_seed(0))
    paper = dq.greedy_rotation(x, 128, 8, "paper", torch.Generator().manual_seed(0))
    assert repo.steps[0] == 0 % 128 and paper.steps[0] == 7  # repo: row index of the [T*K, B] view; paper: channel
    assert repo.scores[0] == pytest.approx(1400 + 900) and paper.scores[0] == pytest.approx(1400)


def test_zigzag_order_on_a_hand_made_example():
    m = torch.tensor([[5.0, 1.0, 8.0, 3.0, 7.0, 2.0, 6.0, 4.0]])  # channel maxima
    # sorted: 2(8) 4(7) 6(6) 0(5) 7(4) 3(3) 5(2) 1(1); dealt to 2 blocks 0,1,1,0,0,1,1,0
    assert dq.zigzag(m, 4).tolist() == [2, 0, 7, 1, 4, 6, 3, 5]
    x = planted(1)
    rot = dq.block_rotate(x.double(), dq.greedy_rotation(x, 128, 32, "repo", torch.Generator()).rotation)
    p = dq.zigzag(rot, 128)
    var = lambda t: t.abs().amax(0).reshape(-1, 128).amax(1).var()  # noqa: E731  block max-of-max spread
    assert var(rot[:, p]) < var(rot)


@pytest.mark.parametrize("times", [0, 1, 2])
def test_calibrate_builds_rotation_permutation_rotation_and_is_orthogonal(times):
    x = planted(3)
    t = dq.calibrate(x, 128, steps=24, permutation_times=times, mode="paper", gen=torch.Generator().manual_seed(0))
    assert len(t.rotations) == times + 1 and len(t.perms) == times
    y = x.double()
    for r, p in zip(t.rotations, t.perms + [None]):
        y = dq.block_rotate(y, r)
        y = y[:, p] if p is not None else y
    torch.testing.assert_close(y.norm(dim=1), x.double().norm(dim=1), rtol=1e-12, atol=0)  # G is orthogonal
    assert y.abs().max() < x.abs().max() / 4  # and it spreads the massive activations


def test_block_size_must_divide():
    with pytest.raises(ConfigError, match="block size 128 does not divide the dimension 576"):
        dq.calibrate(torch.randn(4, 576), 128)


def _calib(n=4, seqlen=96):
    class C:
        windows = Calibration(models.tiny_tokenizer(), "austen", n, seqlen, 2).windows
    return C


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_duquant_transforms_are_fp_exact_for_batch_1_and_3(kv_heads):
    lm = tiny_lm(num_key_value_heads=kv_heads)
    ids = Calibration(models.tiny_tokenizer(), "austen", 3, 80, 9).windows
    ref = logits(lm.model, ids)
    qm = METHODS.get("duquant")(steps=16).quantize(lm, parse_scheme("w16a16"), _calib())
    model = realize(qm)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([logits(model, ids[i:i + 1]) for i in range(3)]), ref, rtol=1e-4, atol=1e-4)
    pre = [type(t).__name__ for t in qm.linears["model.layers.0.self_attn.o_proj"].pre]
    assert pre == (["BlockRotation", "Permute", "BlockRotation"] if kv_heads == 4
                   else ["Scale", "BlockRotation", "Permute", "BlockRotation"])  # GQA: online o_proj smoothing
    q, k = qm.linears["model.layers.0.self_attn.q_proj"].pre, qm.linears["model.layers.0.self_attn.k_proj"].pre
    assert q is not k and all(a is b for a, b in zip(q, k))  # k/v reuse q's transform


def test_duquant_plan_follows_the_reference():
    m = METHODS.get("duquant")(steps=16)
    scheme = parse_scheme("w4a4q4kv4", m.specs())
    assert (scheme.w.grid, scheme.w.clip_ratio, scheme.a.clip_ratio) == ("minmax", 0.8, 0.9)
    assert scheme.q.clip_ratio == scheme.k.clip_ratio == 0.9 and scheme.v.clip_ratio == 1.0
    qm = m.quantize(tiny_lm(), scheme, _calib())
    assert qm.info["block_size_used"] == 128 and qm.info["mode"] == "repo" and qm.info["qk_hadamard"] == 32
    assert all(p.weight is not None and p.act == scheme.a for p in qm.linears.values())
    assert type(qm.attention[0].qk_pre).__name__ == "Hadamard" and qm.attention[0].qk_pre.n == 32
    lwc = METHODS.get("duquant-lwc")(steps=16, epochs=1)
    assert lwc.opts["alpha"] == 0.5 and lwc.specs()["w"].clip_ratio == 1.0
    qm = lwc.quantize(tiny_lm(), parse_scheme("w4a4", lwc.specs()), _calib())
    assert qm.info["weights"] == "duquant (LWC)" and set(qm.info["final_loss"]) == {0, 1}


def test_duquant_picks_a_block_size_that_divides():
    lm = tiny_lm(hidden_size=192, intermediate_size=384, num_attention_heads=3, num_key_value_heads=1)
    qm = METHODS.get("duquant")(steps=4).quantize(lm, parse_scheme("w4a4"), _calib())
    assert qm.info["block_size_used"] == 64


@pytest.mark.parametrize("method", ["duquant", "duquant-lwc"])
def test_calibration_pass_equals_the_realized_plan(method):
    """The averaged sequence the method propagates (quantized on the fly, as the reference) is what the realized
    W4A4 plan computes: with one calibration window the mean *is* that window, so the last block's outputs agree."""
    lm = tiny_lm()
    calib = _calib(n=1)
    last = lm.adapter.blocks[-1]
    seen = []
    hook = last.register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        lm.model(calib.windows)
    m = METHODS.get(method)(steps=16, **({"epochs": 1} if method == "duquant-lwc" else {}))
    qm = m.quantize(lm, parse_scheme("w4a4q4kv4", m.specs()), calib)
    with torch.no_grad():
        realize(qm)(calib.windows)
    hook.remove()
    fp, calibrated, realized = seen[0], seen[-2], seen[-1]  # -2: the last pass during quantize()
    assert (realized - fp).abs().max() > 1e-2  # quantization is really on
    torch.testing.assert_close(realized, calibrated, rtol=1e-4, atol=1e-4)
