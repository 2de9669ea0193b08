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
from quantbench.pipeline import resolve

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


def _oracle_givens(n):
    """``R̃`` of DuQuant's ``get_rot.py``, written out independently: the Givens rotations G_i in planes (i, i+1)
    with cos 1/sqrt(i+2), applied as ``G_{n-2} ... G_0``, then basis vectors 0 and n-1 exchanged."""
    r = torch.eye(n, dtype=torch.float64)
    for i in range(n - 1):
        c, s = (1 / (i + 2)) ** 0.5, ((i + 1) / (i + 2)) ** 0.5
        g = torch.eye(n, dtype=torch.float64)
        g[i:i + 2, i:i + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        r = g @ r
    e = torch.eye(n, dtype=torch.float64)[[n - 1, *range(1, n - 1), 0]]
    return e @ r @ e


def _oracle_search(x, b, steps, mode, gen):
    """The greedy rotation as the reference code states it, sharing nothing with quantbench.duquant: the whole
    ``[T*K, B]`` product every step, the extreme entry, ``E_j (R̃ diag(1, Q')) E_j`` with an explicit exchange
    matrix, and the best prefix of steps."""
    v = x.reshape(-1, b).double()
    base = None
    acc, mats, scores, js = torch.eye(b, dtype=torch.float64), [], [], []
    for s in range(steps + 1):
        flat = v.flatten()
        if mode == "repo":  # range as the score; the row of the larger-magnitude extreme, mod B
            hi, lo = flat.argmax().item(), flat.argmin().item()
            scores.append((flat[hi] - flat[lo]).item())
            j = ((hi if flat[hi].abs() > flat[lo].abs() else lo) // b) % b
        else:  # the largest magnitude as the score; its channel
            k = flat.abs().argmax().item()
            scores.append(flat[k].abs().item())
            j = k % b
        if s == steps:
            break
        if base is None or mode == "paper":  # one Q' per search (repo) or per step (paper), from the generator
            q = torch.eye(b, dtype=torch.float64)
            q[1:, 1:] = torch.linalg.qr(torch.randn(b - 1, b - 1, generator=gen, dtype=torch.float64))[0]
            base = _oracle_givens(b) @ q
        e = torch.eye(b, dtype=torch.float64)[[j if i == 0 else 0 if i == j else i for i in range(b)]]
        m = e @ base @ e
        mats.append(m)
        js.append(j)
        v = v @ m
    kept = min(range(len(scores)), key=lambda i: (scores[i], i))
    for m in mats[:kept]:
        acc = acc @ m
    return js[:kept], scores, kept, acc


def flat(seed, tokens=256, channels=1024):
    """Rows of nearly equal norm (SmolLM2's smoothed, averaged inputs look like this): no row can be ruled out by
    its norm, so every step rests on the float32 screen."""
    return torch.randn(tokens, channels, generator=torch.Generator().manual_seed(seed)) * 0.3 + 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", dq.MODES)
@pytest.mark.parametrize("make", [planted, flat])
def test_fast_search_equals_an_independent_oracle(seed, mode, make):
    x = make(seed)
    steps, scores, kept, rot = _oracle_search(x, 128, 48, mode, torch.Generator().manual_seed(seed))
    fast = dq.greedy_rotation(x, 128, 48, mode, torch.Generator().manual_seed(seed))
    assert fast.steps == steps and fast.kept == kept
    torch.testing.assert_close(torch.tensor(fast.scores), torch.tensor(scores), rtol=1e-12, atol=0)
    torch.testing.assert_close(fast.rotation, rot, rtol=0, atol=1e-12)
    if make is planted:
        assert 0 < kept and scores[kept] < scores[0] / 3  # the rotation really flattens outliers
    ref = dq.greedy_rotation_reference(x, 128, 48, mode, torch.Generator().manual_seed(seed))
    assert ref.steps == steps and torch.equal(ref.rotation, fast.rotation)  # the module's own slow loop agrees


@pytest.mark.parametrize("mode", dq.MODES)
def test_the_screen_defers_a_float32_tie_to_float64(mode, monkeypatch):
    """Two extremes 1e-9 apart are one float32 value: a pick from the float32 screen alone takes the first (row 0);
    the exact search must take the larger (row 6), as the float64 oracle does, and so swap another index. 2048 rows
    of similar norm, so the screen (not the direct float64 product of a few rows) decides."""
    x = torch.randn(1024, 128, generator=torch.Generator().manual_seed(0)).double() * 0.05
    x[0, 5], x[3, 7] = 1.0, 1.0 + 1e-9  # rows 0 and 6 of the [T*K, B] view (B = 64: row = 2 token + block)
    b = 64
    steps, *_ = _oracle_search(x, b, 4, mode, torch.Generator().manual_seed(0))
    screened = []
    real = dq._pick_screened
    monkeypatch.setattr(dq, "_pick_screened", lambda *a: screened.append(a[2].shape[0]) or real(*a))
    exact = dq.greedy_rotation(x, b, 4, mode, torch.Generator().manual_seed(0))
    assert screened and screened[0] > dq.SCREEN_ROWS  # the screen ran, on more rows than the direct path takes
    loose = dq.greedy_rotation(x, b, 4, mode, torch.Generator().manual_seed(0), dtype="float32")
    want = (3 * 2) % b if mode == "repo" else 7  # repo: the row of the [T*K, B] view; paper: the channel
    assert steps[0] == want and exact.steps == steps
    assert loose.steps[0] != want  # what the float32 screen alone would have done


def test_float32_search_is_orthogonal_and_close_to_float64():
    x = planted(0)
    hi = dq.greedy_rotation(x, 128, 64, "repo", torch.Generator().manual_seed(0))
    lo = dq.greedy_rotation(x, 128, 64, "repo", torch.Generator().manual_seed(0), dtype="float32")
    torch.testing.assert_close(lo.rotation @ lo.rotation.T, torch.eye(128, dtype=torch.float64), rtol=0, atol=1e-5)
    assert lo.scores[lo.kept] == pytest.approx(hi.scores[hi.kept], rel=1e-3)
    with pytest.raises(ConfigError, match="float64, float32"):
        dq.greedy_rotation(x, 128, 4, "repo", torch.Generator(), dtype="float16")


def test_a_late_option_at_its_neutral_value_keeps_the_config_hash():
    from quantbench.registry import METHODS
    cls = METHODS.get("duquant")
    assert "search_dtype" not in cls().identity_options() and cls().opts["search_dtype"] == "float64"
    assert cls(search_dtype="float32").identity_options()["search_dtype"] == "float32"
    with pytest.raises(ConfigError, match="float64, float32"):
        cls(search_dtype="float16")


def _oracle_zigzag(x, b):
    """Zigzag written as a formula: the channel at rank p (by decreasing max |x|, stable) goes to block
    ``p mod 2K`` folded back (0..K-1, K-1..0), each block then in decreasing order."""
    m = x.reshape(-1, x.shape[-1]).abs().amax(0).tolist()
    k = len(m) // b
    ranked = sorted(range(len(m)), key=lambda c: -m[c])
    blocks = [[] for _ in range(k)]
    for p, c in enumerate(ranked):
        r = p % (2 * k)
        blocks[r if r < k else 2 * k - 1 - r].append(c)
    return [c for blk in blocks for c in sorted(blk, key=lambda c: -m[c])]


def test_calibrate_permutes_by_the_zigzag_of_the_rotated_input():
    x = planted(3)
    t = dq.calibrate(x, 128, steps=24, permutation_times=1, mode="repo", gen=torch.Generator().manual_seed(0))
    rotated = (x.double().reshape(-1, 128) @ t.rotations[0]).reshape(x.shape)
    assert t.perms[0].tolist() == _oracle_zigzag(rotated, 128)
    assert t.perms[0].tolist() != list(range(x.shape[1]))  # an identity where the permutation belongs fails
    assert t.searches[1].kept > 0  # the second rotation is not the identity on an input with outliers
    assert not torch.allclose(t.rotations[1], torch.eye(128, dtype=torch.float64))


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
    qm = resolve("duquant")(steps=16).quantize(lm, parse_scheme("w16a16"), _calib())
    model = realize(qm)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([logits(model, ids[i:i + 1]) for i in range(3)]), ref, rtol=1e-4, atol=1e-4)
    pre = [type(t).__name__ for t in qm.linears["model.layers.0.self_attn.o_proj"].pre]
    assert pre == (["DuQuantRotation"] if kv_heads == 4 else ["Scale", "DuQuantRotation"])  # GQA: online smoothing
    q, k = qm.linears["model.layers.0.self_attn.q_proj"].pre, qm.linears["model.layers.0.self_attn.k_proj"].pre
    assert q is not k and all(a is b for a, b in zip(q, k))  # k/v reuse q's transform


def test_duquant_plan_follows_the_reference():
    m = resolve("duquant")(steps=16)
    scheme = parse_scheme("w4a4q4kv4", m.specs())
    assert (scheme.w.grid, scheme.w.clip_ratio, scheme.a.clip_ratio) == ("minmax", 0.8, 0.9)
    assert scheme.q.clip_ratio == scheme.k.clip_ratio == 0.9 and scheme.v.clip_ratio == 1.0
    qm = m.quantize(tiny_lm(), scheme, _calib())
    assert qm.info["block_size_used"] == 128 and qm.info["mode"] == "repo" and qm.info["qk_hadamard"] == 32
    assert all(p.weight is not None and p.act == scheme.a for p in qm.linears.values())
    assert type(qm.attention[0].qk_pre).__name__ == "Hadamard" and qm.attention[0].qk_pre.n == 32
    lwc = resolve("duquant-lwc")(steps=16, epochs=1)
    assert lwc.opts["alpha"] == 0.5 and lwc.specs()["w"].clip_ratio == 1.0
    qm = lwc.quantize(tiny_lm(), parse_scheme("w4a4", lwc.specs()), _calib())
    assert qm.info["weights"] == "duquant (LWC)" and set(qm.info["final_loss"]) == {0, 1}


def test_duquant_picks_a_block_size_that_divides():
    lm = tiny_lm(hidden_size=192, intermediate_size=384, num_attention_heads=3, num_key_value_heads=1)
    qm = resolve("duquant")(steps=4).quantize(lm, parse_scheme("w4a4"), _calib())
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
    m = resolve(method)(steps=16, **({"epochs": 1} if method == "duquant-lwc" else {}))
    qm = m.quantize(lm, parse_scheme("w4a4q4kv4", m.specs()), calib)
    with torch.no_grad():
        realize(qm)(calib.windows)
    hook.remove()
    fp, calibrated, realized = seen[0], seen[-2], seen[-1]  # -2: the last pass during quantize()
    assert (realized - fp).abs().max() > 1e-2  # quantization is really on
    torch.testing.assert_close(realized, calibrated, rtol=1e-4, atol=1e-4)
