"""Quantizer methods and TensorQuantizer against independent NumPy computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.ptq.quantizers import Log2Quantizer, LogSqrt2Quantizer, TwinUniformQuantizer, UniformQuantizer, build_quantizer
from models.ptq.tensor_quantizer import QuantMode, QuantState, TensorQuantizer
from quant_config import BitTypeConfig, QuantizerSpec

INT8 = BitTypeConfig(8, True, "int8")
UINT8 = BitTypeConfig(8, False, "uint8")


def np_uniform_qparams(lo: float, hi: float, bt: BitTypeConfig) -> tuple[float, float]:
    if bt.symmetric:
        return max(abs(lo), abs(hi)) / bt.qmax, 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (bt.qmax - bt.qmin)
    return scale, float(np.clip(bt.qmin - np.round(lo / scale), bt.qmin, bt.qmax))


def np_fake_quant(x: np.ndarray, scale, zp, bt: BitTypeConfig) -> np.ndarray:
    q = np.clip(np.round(x / np.float32(scale)) + zp, bt.qmin, bt.qmax)
    return ((q - zp) * np.float32(scale)).astype(np.float32)


@pytest.mark.parametrize("bt", [INT8, UINT8, BitTypeConfig(4, False, "uint4"), BitTypeConfig(6, True, "int6")])
def test_uniform_matches_numpy_reference(bt):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(10_000) * 3 + 0.5).astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    method = UniformQuantizer()
    scale, zp = method.qparams(torch.tensor(lo), torch.tensor(hi), bt)
    ref_scale, ref_zp = np_uniform_qparams(lo, hi, bt)
    assert scale.item() == pytest.approx(ref_scale, rel=1e-6)
    assert zp.item() == ref_zp
    out = method.fake_quant(torch.from_numpy(x), scale, zp, bt).numpy()
    np.testing.assert_allclose(out, np_fake_quant(x, scale.item(), ref_zp, bt), rtol=0, atol=1e-6)
    # Every value inside the range is reproduced to half a step.
    assert np.abs(out - x).max() <= scale.item() / 2 + 1e-6
    if bt.symmetric:
        assert zp.item() == 0


def test_uniform_clips_outside_range_and_keeps_zero_exact():
    bt = UINT8
    method = UniformQuantizer()
    scale, zp = method.qparams(torch.tensor(-1.0), torch.tensor(3.0), bt)
    x = torch.tensor([0.0, -5.0, 10.0])
    out = method.fake_quant(x, scale, zp, bt)
    assert out[0].item() == 0.0
    assert out[1].item() == pytest.approx(-zp.item() * scale.item())
    assert out[2].item() == pytest.approx((255 - zp.item()) * scale.item())


def test_log2_maps_powers_of_two_exactly():
    bt = BitTypeConfig(4, False, "uint4")
    method = Log2Quantizer()
    scale, zp = method.qparams(torch.tensor(0.0), torch.tensor(1.0), bt)
    assert scale.item() == 1.0 and zp.item() == 0.0
    max_code = Log2Quantizer.max_code(bt)
    assert max_code == 14  # 16 codes: 2^0 .. 2^-14 and zero
    powers = torch.exp2(-torch.arange(0, max_code + 1, dtype=torch.float32))
    assert torch.equal(method.fake_quant(powers, scale, zp, bt), powers)
    # Zero and values far below the smallest power map to zero; rounding happens in the log domain.
    out = method.fake_quant(torch.tensor([0.0, 2.0**-20, 0.7, 0.72, 0.3]), scale, zp, bt)
    assert out.tolist() == [0.0, 0.0, 0.5, 1.0, 0.25]


def test_log2_scale_is_power_of_two_and_signed_grid_keeps_sign():
    bt = BitTypeConfig(5, True, "int5")
    method = Log2Quantizer()
    scale, _ = method.qparams(torch.tensor(-3.0), torch.tensor(2.5), bt)
    assert scale.item() == 4.0
    x = torch.tensor([-2.0, 1.0, -0.5, 0.0])
    assert method.fake_quant(x, scale, torch.zeros(()), bt).tolist() == [-2.0, 1.0, -0.5, 0.0]


def np_log_sqrt2(x: np.ndarray, scale: float, bits: int, symmetric: bool) -> np.ndarray:
    """Reference: nearest level s * sqrt(2)^-q in the log domain, q in 0 .. max_code, the top code is 0."""
    max_code = 2 ** (bits - 1 if symmetric else bits) - 2
    mag = np.abs(x) if symmetric else np.maximum(x, 0.0)
    with np.errstate(divide="ignore"):
        q = np.clip(np.round(-np.log(mag / scale) / np.log(np.sqrt(2.0))), 0, None)
    out = np.where(q > max_code, 0.0, scale * np.sqrt(2.0) ** -np.minimum(q, max_code))
    return out * np.sign(x) if symmetric else out


@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, False), (6, True)])
def test_log_sqrt2_round_trips_its_grid_and_matches_numpy(bits, symmetric):
    bt = BitTypeConfig(bits, symmetric, "g")
    method = LogSqrt2Quantizer()
    scale, zp = method.qparams(torch.tensor(0.0), torch.tensor(0.8), bt)
    assert scale.item() == pytest.approx(0.8) and zp.item() == 0.0  # the maximum itself, not a power of two
    max_code = Log2Quantizer.max_code(bt)
    grid = scale * torch.exp2(-torch.arange(0, max_code + 1, dtype=torch.float32) / 2)
    assert torch.equal(method.fake_quant(grid, scale, zp, bt), grid)
    # Twice as many levels per octave as log2: 1/sqrt(2) sits between 1 and 1/2.
    assert len(torch.unique(method.fake_quant(torch.linspace(0.4, 0.8, 500), scale, zp, bt))) == 3
    x = torch.randn(4000) * 0.3 if symmetric else torch.rand(4000) ** 4 * 0.8
    below_grid = 0.8 * 2.0 ** (-(max_code + 1) / 2) / 2  # closer to 0 than to the smallest level
    x[:3] = torch.tensor([0.0, below_grid, 0.8])
    out = method.fake_quant(x, scale, zp, bt)
    ref = np_log_sqrt2(x.double().numpy(), float(scale), bits, symmetric)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=0)
    assert out[0] == 0 and out[1] == 0


def test_log_sqrt2_attention_map_is_finer_than_log2_near_one():
    """On a softmax output the log-sqrt(2) grid has less error than log2 with the same bits."""
    probs = torch.randn(64, 50, 50).mul(3).softmax(-1)
    bt = BitTypeConfig(4, False, "uint4")
    errors = {}
    for method in (Log2Quantizer(), LogSqrt2Quantizer()):
        scale, zp = method.qparams(probs.min(), probs.max(), bt)
        errors[method.name] = (method.fake_quant(probs, scale, zp, bt) - probs).square().mean().item()
    assert errors["log_sqrt2"] < 0.7 * errors["log2"]


def np_twin(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """PTQ4ViT's twin uniform grid written out: positive step hi / (2^(b-1) - 1), negative step the
    largest power-of-two fraction of it whose 2^(b-1) levels still reach lo."""
    half = 2 ** (bits - 1)
    pos_step = np.float32(hi / (half - 1))
    m = 0
    while half * pos_step * 2.0 ** -(m + 1) >= -lo:
        m += 1
    while half * pos_step * 2.0**-m < -lo:
        m -= 1
    neg_step = np.float32(pos_step * 2.0**-m)
    out = np.where(x >= 0, np.clip(np.round(x / pos_step), 0, half - 1) * pos_step, np.clip(np.round(x / neg_step), -half, 0) * neg_step)
    return out.astype(np.float32), m


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_twin_uniform_matches_numpy_and_round_trips_both_grids(bits):
    rng = np.random.default_rng(bits)
    pre = rng.standard_normal(20_000).astype(np.float32) * 2
    x = torch.nn.functional.gelu(torch.from_numpy(pre)).numpy()  # GELU's outputs: min ~ -0.17
    lo, hi = float(x.min()), float(x.max())
    bt = BitTypeConfig(bits, True, f"int{bits}")
    method = TwinUniformQuantizer()
    scale, shift = method.qparams(torch.tensor(lo), torch.tensor(hi), bt)
    ref, ref_shift = np_twin(x, lo, hi, bits)
    assert shift.item() == ref_shift and ref_shift > 0  # the negative step is the finer one
    out = method.fake_quant(torch.from_numpy(x), scale, shift, bt)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-7)
    # Tensor parameters (per-channel broadcasting) give the same values as Python floats.
    assert torch.equal(method.fake_quant(torch.from_numpy(x), scale.item(), float(shift), bt), out)
    half, neg_step = 2 ** (bits - 1), scale.item() * 2.0 ** -shift.item()
    levels = torch.cat([torch.arange(-half, 0) * neg_step, torch.arange(0, half) * scale.item()]).float()
    assert torch.equal(method.fake_quant(levels, scale, shift, bt), levels)
    assert len(torch.unique(method.fake_quant(torch.from_numpy(x), scale, shift, bt))) <= 2**bits
    lo_bound, hi_bound = method.grid_bounds(scale, shift, bt)
    assert 2 * lo < lo_bound.item() <= lo  # covers GELU's minimum; one more halving of the step would not
    assert hi_bound.item() == pytest.approx(hi, rel=1e-6)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_twin_uniform_trades_positive_for_negative_resolution(bits):
    """On GELU outputs the twin grid makes the negative values' error two to three orders of magnitude
    smaller than one uniform grid over the same range, and pays with a positive step about twice as wide
    (half the codes; the positive error about 4x)."""
    x = torch.nn.functional.gelu(torch.randn(50_000, generator=torch.Generator().manual_seed(0)) * 3)
    lo, hi, neg = x.min(), x.max(), x < 0
    twin, uni = TwinUniformQuantizer(), UniformQuantizer()
    bt_twin, bt_uni = BitTypeConfig(bits, True, "twin"), BitTypeConfig(bits, False, "uint")
    twin_err = (twin.fake_quant(x, *twin.qparams(lo, hi, bt_twin), bt_twin) - x).square()
    uni_err = (uni.fake_quant(x, *uni.qparams(lo, hi, bt_uni), bt_uni) - x).square()
    assert twin_err[neg].mean() < 0.01 * uni_err[neg].mean()
    assert 3 < twin_err[~neg].mean() / uni_err[~neg].mean() < 5


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_unsigned_twin_uniform_is_nearest_level_of_both_grids(bits):
    """PTQ4ViT's post-softmax twin grid: every value goes to the nearest of the 2^(b-1) fine levels
    c * s * 2^-m and the 2^(b-1) coarse levels c * s (brute force over the enumerated levels)."""
    probs = torch.softmax(torch.randn(64, 197, generator=torch.Generator().manual_seed(bits)) * 3, dim=-1).reshape(-1)
    bt = BitTypeConfig(bits, False, f"uint{bits}")
    method = TwinUniformQuantizer()
    scale, shift = method.qparams(probs.min(), probs.max(), bt)
    half = 2 ** (bits - 1)
    assert shift.item() == min(TwinUniformQuantizer.POSITIVE_SHIFT, bits - 1)
    assert scale.item() == pytest.approx(probs.max().item() / (half - 1), rel=1e-6)
    fine = scale.double() * 2.0 ** -shift.double()
    levels = torch.cat([torch.arange(half) * fine, torch.arange(half) * scale.double()])
    nearest = levels[(probs.double()[:, None] - levels[None, :]).abs().argmin(dim=1)]
    out = method.fake_quant(probs, scale, shift, bt)
    torch.testing.assert_close(out.double(), nearest, rtol=0, atol=1e-7)
    assert torch.equal(method.fake_quant(probs, scale.item(), float(shift), bt), out)  # float parameters: same
    assert torch.equal(method.fake_quant(levels.float(), scale, shift, bt), levels.float())  # levels round-trip
    lo_bound, hi_bound = method.grid_bounds(scale, shift, bt)
    assert lo_bound.item() == 0 and hi_bound.item() == pytest.approx(probs.max().item(), rel=1e-6)
    assert method.level_step(scale, shift).item() == pytest.approx(fine.item(), rel=1e-6)


def test_unsigned_twin_uniform_beats_one_uniform_grid_on_attention_maps():
    """At 8 bits the small probabilities (most of an attention map) get a 2^m-times finer step, the peaks
    a step about twice as wide as one uniform grid's: the squared error overall falls."""
    probs = torch.softmax(torch.randn(64, 197, generator=torch.Generator().manual_seed(0)) * 3, dim=-1).reshape(-1)
    bt = BitTypeConfig(8, False, "uint8")
    twin, uni = TwinUniformQuantizer(), UniformQuantizer()
    twin_err = (twin.fake_quant(probs, *twin.qparams(probs.min(), probs.max(), bt), bt) - probs).square()
    uni_err = (uni.fake_quant(probs, *uni.qparams(probs.min(), probs.max(), bt), bt) - probs).square()
    small = probs < probs.max() / 2**TwinUniformQuantizer.POSITIVE_SHIFT
    assert twin_err[small].mean() < uni_err[small].mean() / 100
    assert twin_err.mean() < uni_err.mean() / 2


def test_build_quantizer_lists_valid_names():
    with pytest.raises(ValueError, match="log2, log_sqrt2, twin_uniform, uniform"):
        build_quantizer("nope")


def _spec(**kw) -> QuantizerSpec:
    return QuantizerSpec(**kw)


def test_tensor_quantizer_channel_wise_weight_axis0_matches_rows():
    torch.manual_seed(0)
    w = torch.randn(6, 20) * torch.linspace(0.1, 3, 6)[:, None]
    state = QuantState(QuantMode.CALIBRATE)
    q = TensorQuantizer(_spec(bit_type=INT8, calibration_mode="channel_wise"), state, num_channels=6, channel_axis=0, is_weight=True)
    q(w)
    assert q.finalize()
    ref = w.abs().amax(dim=1) / 127
    assert q.scale.shape == (6,)
    torch.testing.assert_close(q.scale, ref)
    assert torch.all(q.zero_point == 0)
    state.mode = QuantMode.QUANT
    out = q(w)
    assert ((out - w).abs() <= q.scale[:, None] / 2 + 1e-7).all()


def test_tensor_quantizer_channel_wise_activation_last_axis():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 5) * torch.tensor([0.5, 1, 2, 4, 8])
    state = QuantState(QuantMode.CALIBRATE)
    q = TensorQuantizer(_spec(bit_type=UINT8, calibration_mode="channel_wise"), state, num_channels=5)
    q(x)
    q.finalize()
    flat = x.reshape(-1, 5)
    lo, hi = flat.amin(0).clamp(max=0), flat.amax(0).clamp(min=0)
    torch.testing.assert_close(q.scale, (hi - lo) / 255)
    assert q.scale.shape == (5,)


def test_tensor_quantizer_modes_and_uncalibrated_error():
    state = QuantState(QuantMode.QUANT)
    q = TensorQuantizer(_spec(bit_type=UINT8), state)
    q.name = "blocks.0.attn.qkv.input_quant"
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="blocks.0.attn.qkv.input_quant.*before calibration"):
        q(x)
    state.mode = QuantMode.FP32
    assert q(x) is x
    disabled = TensorQuantizer(None, state)
    state.mode = QuantMode.QUANT
    assert disabled(x) is x


def test_static_weight_cache_follows_in_place_updates():
    state = QuantState(QuantMode.CALIBRATE)
    w = torch.nn.Parameter(torch.randn(4, 8), requires_grad=False)
    q = TensorQuantizer(_spec(bit_type=INT8, calibration_mode="channel_wise"), state, num_channels=4, channel_axis=0, is_weight=True)
    q(w)
    q.finalize()
    state.mode = QuantMode.QUANT
    with torch.no_grad():
        first = q(w).clone()
        assert q(w) is q(w)  # cached
        w.mul_(0.5)
        second = q(w)
    assert not torch.equal(second, first)
    torch.testing.assert_close(second, q.fake_quant(w.detach()), atol=0, rtol=0)


def test_straight_through_gradient():
    state = QuantState(QuantMode.CALIBRATE)
    q = TensorQuantizer(_spec(bit_type=UINT8), state)
    x = torch.randn(100, requires_grad=True)
    q(x.detach())
    q.finalize()
    state.mode = QuantMode.QUANT
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(100))


def test_more_bits_give_smaller_error():
    torch.manual_seed(0)
    x = torch.randn(10_000)
    errors = []
    for bits in (4, 6, 8):
        state = QuantState(QuantMode.CALIBRATE)
        q = TensorQuantizer(_spec(bit_type=BitTypeConfig(bits, True, f"int{bits}")), state)
        q(x)
        q.finalize()
        state.mode = QuantMode.QUANT
        errors.append((q(x) - x).square().mean().item())
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("name", ["uniform", "log2", "log_sqrt2", "twin_uniform"])
def test_capabilities_say_what_the_method_does(name):
    """The properties the profiler, scale search and export ask are true of the method's actual outputs."""
    method = build_quantizer(name)
    rng = np.random.default_rng(3)
    bt = UINT8 if name in ("log2", "log_sqrt2") else INT8
    # A GELU-like sliver below zero: twin_uniform's negative grid is then finer than one uniform grid.
    lo, hi = torch.tensor(-0.05 if bt.symmetric else 0.0), torch.tensor(float(rng.uniform(0.3, 5.0)))
    scale, zero_point = method.qparams(lo, hi, bt)
    # A power-of-two scale exactly when the method promises one (log2: a shift; log_sqrt2: the maximum itself).
    assert bool(torch.log2(scale) == torch.round(torch.log2(scale))) == method.power_of_two_scale
    x = torch.from_numpy(rng.uniform(float(lo), float(hi), 4096).astype(np.float32)).clamp_min(1e-6 if not bt.symmetric else -1.0)
    out = method.fake_quant(x, float(scale), float(zero_point), bt)
    if method.log_domain:  # every non-zero output is scale * 2^(-k * step) for a whole k
        k = -torch.log2(out[out > 0] / scale) / method.step
        assert torch.allclose(k, torch.round(k), atol=1e-4)
    else:
        assert not hasattr(method, "step")
    # Exportable as Q/DQ exactly when ONNX's (= PyTorch's) fake quantization gives the same tensor.
    reference = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), bt.qmin, bt.qmax)
    assert torch.equal(out, reference) == method.qdq_exportable
