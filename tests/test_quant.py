"""Quantizer grids against hand-computed values, STE, groups, scheme parsing and its errors."""
import pytest
import torch

from quantbench.errors import ConfigError
from quantbench.quant import GRIDS, LearnableClip, QTensor, QuantSpec, fake_quant, parse_scheme, quantize

X = torch.tensor([[-1.0, -0.45, 0.2, 0.9]])  # no .5 ties: fp32 scales like 1/7 are inexact
POS = torch.tensor([[0.2, 0.55, 1.0, 0.6]])


@pytest.mark.parametrize("grid,x,codes,scale,zero", [
    # QuaRot sym: s = 1/7, x/s = [-7, -3.15, 1.4, 6.3]
    ("sym", X, [-7, -3, 1, 6], 1 / 7, None),
    ("sym_pm", X, [-7, -3, 1, 6], 1 / 7, None),
    # QuaRot asym: s = 1.9/15, z = round(7.894) = 8
    ("asym", X, [0, 4, 10, 15], 1.9 / 15, 8),
    # asym forces 0 into range: min 0 -> s = 1/15, z = 0, x/s = [3, 8.25, 15, 9]
    ("asym", POS, [3, 8, 15, 9], 1 / 15, 0),
    # DuQuant/OmniQuant minmax: raw min 0.2 -> s = 0.8/15, z = round(-3.75) = -4, x/s = [3.75, 10.31, 18.75, 11.25]
    ("minmax", POS, [0, 6, 15, 7], 0.8 / 15, -4),
    # DuQuant --symmetric: s = 1/7, z = 7, codes = round(x/s) + 7
    ("minmax_sym", X, [0, 4, 8, 13], 1 / 7, 7),
    # compressed-tensors symmetric: s = 7.5 / 7.5 = 1 (exact), so x/s has exact .5 ties, rounded half to even
    ("sym_ct", torch.tensor([[-7.5, -2.5, 1.5, 6.7]]), [-8, -2, 2, 7], 1.0, None),
])
def test_grid_hand_computed(grid, x, codes, scale, zero):
    spec = QuantSpec(4, grid, "channel")
    qt = quantize(x, spec)
    assert qt.codes.tolist() == [codes]
    assert qt.scale.item() == pytest.approx(scale, rel=1e-6)
    assert (qt.zero is None) if zero is None else qt.zero.item() == zero
    expected = (torch.tensor(codes, dtype=torch.float32) - (zero or 0)) * scale
    torch.testing.assert_close(qt.dequantize()[0], expected, rtol=1e-6, atol=1e-7)


def test_code_ranges_and_dtypes():
    w = torch.randn(64, 128) * 3
    for grid in GRIDS:
        for bits in (2, 3, 4, 8, 12):
            spec = QuantSpec(bits, grid, "channel")
            qt = quantize(w, spec)
            lo, hi = spec.qrange
            assert qt.codes.dtype == spec.code_dtype
            assert lo <= int(qt.codes.min()) and int(qt.codes.max()) <= hi
    assert QuantSpec(4, "sym").qrange == (-8, 7)
    assert QuantSpec(4, "sym_pm").qrange == (-7, 7)
    assert QuantSpec(8, "minmax").qrange == (0, 255) and QuantSpec(8, "minmax").code_dtype == torch.uint8


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("gran,group", [("tensor", 0), ("channel", 0), ("token", 0), ("group", 32)])
def test_quantize_dequantize_equals_fake_quant(grid, gran, group):
    x = torch.randn(3, 16, 128) * torch.linspace(0.1, 10, 128)
    spec = QuantSpec(4, grid, gran, group)
    assert torch.equal(quantize(x, spec).dequantize(), fake_quant(x, spec))


def test_error_shrinks_with_bits_and_groups():
    w = torch.randn(256, 512)
    err = lambda spec: (fake_quant(w, spec) - w).pow(2).mean().item()  # noqa: E731
    e = [err(QuantSpec(b, "sym")) for b in (2, 3, 4, 8, 15)]
    assert all(a > b for a, b in zip(e, e[1:]))
    assert e[-1] < 1e-8  # 15-bit grid: within float noise of FP
    assert err(QuantSpec(4, "sym", "group", 64)) < err(QuantSpec(4, "sym", "channel"))


def test_clip_ratio_shrinks_range():
    qt = quantize(X, QuantSpec(4, "sym", clip_ratio=0.5))
    assert qt.scale.item() == pytest.approx(0.5 / 7)
    assert qt.codes.tolist() == [[-8, -6, 3, 7]]  # x/s = [-14, -6.3, 2.8, 12.6], clamped at the grid ends


def test_group_layout():
    x = torch.tensor([[1.0, 2.0, 10.0, 20.0]])
    qt = quantize(x, QuantSpec(4, "sym", "group", 2))
    assert qt.scale.flatten().tolist() == pytest.approx([2 / 7, 20 / 7])
    with pytest.raises(ConfigError, match="group size 3 does not divide the dimension 4"):
        quantize(x, QuantSpec(4, "sym", "group", 3))


def test_zero_rows_and_nonfinite():
    assert torch.equal(fake_quant(torch.zeros(2, 8), QuantSpec(4, "sym")), torch.zeros(2, 8))
    assert torch.equal(fake_quant(torch.zeros(2, 8), QuantSpec(4, "asym")), torch.zeros(2, 8))
    with pytest.raises(ConfigError, match="NaN/inf"):
        quantize(torch.tensor([[1.0, float("nan")]]), QuantSpec(4))


def test_ste_and_learnable_clip_gradients():
    x = torch.randn(4, 64, requires_grad=True)
    fake_quant(x, QuantSpec(4, "minmax")).sum().backward()
    inner = (x != x.amin(1, keepdim=True)) & (x != x.amax(1, keepdim=True))  # row min/max also feed the scale
    torch.testing.assert_close(x.grad[inner], torch.ones(int(inner.sum())))  # straight-through round
    w = torch.randn(8, 64)
    lwc = LearnableClip(8)
    assert torch.sigmoid(torch.tensor(4.0)).item() == pytest.approx(lwc()[1][0].item())
    loss = (fake_quant(w, QuantSpec(4, "minmax"), *lwc()) - w).pow(2).sum()
    loss.backward()
    assert lwc.upbound.grad is not None and lwc.upbound.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=16), dict(bits=17), dict(bits=4, grid="nf4"),
                                 dict(bits=4, granularity="row"), dict(bits=4, granularity="group"),
                                 dict(bits=4, clip_ratio=1.5)])
def test_spec_errors(bad):
    with pytest.raises(ConfigError):
        QuantSpec(**bad)


@pytest.mark.parametrize("text,name,w,a,wg,kv", [
    ("w4a4", "w4a4", 4, 4, 0, None),
    ("W4A16g128", "w4a16g128", 4, None, 128, None),
    ("w4a4kv4", "w4a4kv4", 4, 4, 0, 4),
    ("w8a8", "w8a8", 8, 8, 0, None),
    ("w3a16", "w3a16", 3, None, 0, None),
    ("w2a16g64", "w2a16g64", 2, None, 64, None),
    ("w4g128a16", "w4a16g128", 4, None, 128, None),
    ("w16a16", "w16a16", None, None, 0, None),
    ("w4a8k4v4", "w4a8kv4", 4, 8, 0, 4),
    ("w4a4kv16", "w4a4", 4, 4, 0, None),
    ("w16a16g128", "w16a16", None, None, 0, None),
])
def test_parse_scheme(text, name, w, a, wg, kv):
    s = parse_scheme(text)
    assert s.name == name
    assert (s.w.bits if s.w else None) == w and (s.a.bits if s.a else None) == a
    assert (s.w.group_size if s.w else 0) == wg
    assert (s.w.granularity == "group") == bool(wg) if s.w else True
    assert (s.k.bits if s.k else None) == kv and (s.v.bits if s.v else None) == kv
    assert s.q is None
    if s.a:
        assert s.a.granularity == "token"


def test_parse_scheme_with_method_defaults():
    s = parse_scheme("w4a4", {"w": QuantSpec(4, "minmax", "channel"), "a": QuantSpec(4, "minmax", "token")})
    assert s.w.grid == "minmax" and s.a.grid == "minmax"


@pytest.mark.parametrize("bad,msg", [("w4", "both weight and activation"), ("w1a4", "impossible"),
                                     ("w17a4", "impossible"), ("w4a4w4", "twice"), ("x4a4", "cannot parse"),
                                     ("", "cannot parse"), ("w4a4kv1", "impossible")])
def test_parse_scheme_errors(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_scheme(bad)


def test_override_specs():
    from quantbench.quant import DEFAULT_SPECS, override_specs

    specs = override_specs(DEFAULT_SPECS, {"w": {"grid": "minmax"}, "a": {"grid": "minmax", "clip_ratio": 0.9}})
    s = parse_scheme("w4a4", specs)
    assert (s.w.grid, s.a.grid, s.a.clip_ratio, s.w.clip_ratio) == ("minmax", "minmax", 0.9, 1.0)
    with pytest.raises(ConfigError, match="unknown grid"):
        override_specs(DEFAULT_SPECS, {"w": {"grid": "nf4"}})
    with pytest.raises(ConfigError, match="cannot override"):
        override_specs(DEFAULT_SPECS, {"w": {"bits": 3}})
    with pytest.raises(ConfigError, match="clip_ratio"):
        override_specs(DEFAULT_SPECS, {"a": {"clip_ratio": 0.0}})


@pytest.mark.parametrize("spec", [QuantSpec(4, "sym", "channel"), QuantSpec(3, "minmax", "channel"),
                                  QuantSpec(2, "sym_pm", "group", group_size=7), QuantSpec(4, "asym", "tensor"),
                                  QuantSpec(8, "sym", "channel"), QuantSpec(6, "minmax", "channel")])
def test_qtensor_state_round_trip_packs_low_bit_codes(spec):
    """Cached plans and checkpoints: codes back exactly, dtype included; <= 4 bits stored two per byte."""
    q = quantize(torch.randn(5, 21) * 3, spec)  # 105 codes: an odd count, the last byte half used
    d = q.state()
    back = QTensor.from_state(d)
    assert torch.equal(back.codes, q.codes) and back.codes.dtype == q.codes.dtype and back.spec == q.spec
    assert torch.equal(back.scale, q.scale) and d["codes"].numel() == (53 if spec.bits <= 4 else 105)


# exact .5 ties: absmax 7 gives the sym grid scale exactly 1 (and minmax over [-1, 14] scale 1, zero 1), so
# x / scale lands on k + 0.5; torch.round (half to even, as every reference repo) and half-up disagree there
TIES = torch.tensor([[7.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
TIES_MINMAX = torch.tensor([[-1.0, 14.0, 0.5, 1.5, 2.5, -0.5, 4.5, 5.5]])


def test_exact_ties_round_half_to_even_in_quantize_and_fake_quant():
    q = quantize(TIES, QuantSpec(4, "sym", "channel"))
    assert q.scale.item() == 1.0
    assert q.codes.tolist() == [[7, 0, 2, 2, 0, -2, -2, 4]]  # half up would give 1, 2, 3, 0, -1, -2, 4
    assert fake_quant(TIES, QuantSpec(4, "sym", "channel")).tolist() == [[7, 0, 2, 2, 0, -2, -2, 4]]
    m = quantize(TIES_MINMAX, QuantSpec(4, "minmax", "channel"))
    assert (m.scale.item(), m.zero.item()) == (1.0, 1.0)
    assert m.codes.tolist() == [[0, 15, 1, 3, 3, 1, 5, 7]]  # round(x) + 1 with round(.5) = 0, round(2.5) = 2 ...
    assert fake_quant(TIES_MINMAX, QuantSpec(4, "minmax", "channel")).tolist() == [[-1, 14, 0, 2, 2, 0, 4, 6]]
