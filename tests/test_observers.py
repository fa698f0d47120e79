"""Observers against independent NumPy reference computations written here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.ptq.histogram import StreamingHistogram, histogram_sq_error
from models.ptq.observers import OBSERVERS, KLObserver, build_observer
from models.ptq.ptf import PowerOfTwoFactor
from models.ptq.quantizers import UniformQuantizer
from quant_config import BitTypeConfig, QuantizerSpec

INT8 = BitTypeConfig(8, True, "int8")
UINT8 = BitTypeConfig(8, False, "uint8")


def observer(name: str, bt: BitTypeConfig = INT8, channel_axis=None, **kw):
    spec = QuantizerSpec(bit_type=bt, observer=name, **kw)
    return build_observer(name, spec, UniformQuantizer(), channel_axis)


def heavy_tailed(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(df=3, size=n)).astype(np.float32)


def np_mse(x: np.ndarray, lo: float, hi: float, bt: BitTypeConfig) -> float:
    if bt.symmetric:
        scale, zp = max(abs(lo), abs(hi)) / bt.qmax, 0.0
    else:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = (hi - lo) / (bt.qmax - bt.qmin)
        zp = np.clip(bt.qmin - np.round(lo / scale), bt.qmin, bt.qmax)
    q = np.clip(np.round(x / scale) + zp, bt.qmin, bt.qmax)
    return float(np.mean(((q - zp) * scale - x) ** 2))


def test_build_observer_lists_valid_names():
    with pytest.raises(ValueError, match="kl, minmax, omse, percentile"):
        observer("median")


def test_minmax_layer_and_channel_wise_stream_over_batches():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, 5, 4)).astype(np.float32) * (i + 1) for i in range(3)]
    ob = observer("minmax", UINT8)
    obc = observer("minmax", UINT8, channel_axis=-1)
    for b in batches:
        ob.update(torch.from_numpy(b))
        obc.update(torch.from_numpy(b))
    allx = np.concatenate([b.reshape(-1, 4) for b in batches])
    lo, hi = ob.compute_range()
    assert (lo.item(), hi.item()) == (allx.min(), allx.max())
    lo_c, hi_c = obc.compute_range()
    np.testing.assert_array_equal(lo_c.numpy(), allx.min(0))
    np.testing.assert_array_equal(hi_c.numpy(), allx.max(0))
    scale, zp = obc.compute_qparams()
    assert scale.shape == (4,) and zp.shape == (4,)


@pytest.mark.parametrize("symmetric", [True, False])
def test_percentile_matches_numpy_quantile_across_growing_batches(symmetric):
    x = heavy_tailed(60_000)
    # Increasing spread forces the histogram to re-bin twice.
    batches = [x[:20_000] * 0.5, x[20_000:40_000], x[40_000:] * 2]
    allx = np.concatenate(batches)
    bt = INT8 if symmetric else UINT8
    ob = observer("percentile", bt, percentile=0.999)
    for b in batches:
        ob.update(torch.from_numpy(b))
    lo, hi = ob.compute_range()
    tol = 3 * np.abs(allx).max() / 2048
    if symmetric:
        assert hi.item() == pytest.approx(np.quantile(np.abs(allx), 0.999), abs=tol)
        assert lo.item() == -hi.item()
    else:
        assert hi.item() == pytest.approx(np.quantile(allx, 0.999), abs=tol)
        assert lo.item() == pytest.approx(np.quantile(allx, 0.001), abs=tol)


def test_streaming_histogram_conserves_mass_and_matches_one_shot_histogram():
    x = heavy_tailed(30_000, seed=3)
    h = StreamingHistogram(512, absolute=False)
    for part in np.array_split(x, 5):
        h.update(torch.from_numpy(part)[:, None])
    assert h.counts.sum().item() == pytest.approx(len(x))
    one = StreamingHistogram(512, absolute=False)
    one.update(torch.from_numpy(x)[:, None])
    # Same final range; re-binning only moves mass within neighbouring bins.
    assert (h.lo.item(), h.hi.item()) == (one.lo.item(), one.hi.item())
    cdf_a, cdf_b = h.counts.cumsum(1), one.counts.cumsum(1)
    assert (cdf_a - cdf_b).abs().max().item() / len(x) < 0.01


@pytest.mark.parametrize("absolute", [True, False])
def test_range_pass_makes_the_histogram_exact_and_order_free(absolute):
    x = heavy_tailed(30_000, seed=4)
    parts = np.array_split(x, 5)

    def two_pass(order) -> StreamingHistogram:
        h = StreamingHistogram(512, absolute=absolute)
        for i in order:
            h.observe_range(torch.from_numpy(parts[i])[:, None])
        h.fix_range()
        for i in order:
            h.update(torch.from_numpy(parts[i])[:, None])
        return h

    h, shuffled = two_pass(range(5)), two_pass([3, 0, 4, 1, 2])
    values = np.abs(x) if absolute else x
    lo = 0.0 if absolute else min(float(values.min()), 0.0)
    reference, _ = np.histogram(values, bins=512, range=(lo, float(values.max())))
    # Bins fixed before counting: exactly NumPy's histogram over the whole data (at most a value on a
    # bin edge lands on the other side of it), whatever the batch order.
    assert (h.lo.item(), h.hi.item()) == pytest.approx((lo, float(values.max())), rel=1e-7)
    assert np.abs(h.counts[0].numpy() - reference).sum() <= 2
    assert torch.equal(h.counts, shuffled.counts) and h.counts.sum().item() == len(x)


def reference_window_kl(hist: np.ndarray, start: int, end: int, levels: int) -> float:
    """KL(P || Q) of one window of a histogram, written as plain loops (the textbook algorithm)."""
    length = end - start
    reference = hist[start:end].copy()
    reference[0] += hist[:start].sum()
    reference[-1] += hist[end:].sum()
    window = hist[start:end]
    quantized = np.zeros(length)
    groups = [j * levels // length for j in range(length)]
    for g in range(levels):
        members = [j for j in range(length) if groups[j] == g]
        total = sum(window[j] for j in members)
        nonzero = [j for j in members if reference[j] > 0]
        for j in nonzero:
            quantized[j] = total / len(nonzero)
    p = reference / reference.sum()
    q = quantized / quantized.sum()
    return sum(pj * (math.log(pj) - math.log(qj if qj > 0 else 1e-10)) for pj, qj in zip(p, q) if pj > 0)


def reference_entropy_threshold(abs_x: np.ndarray, bins: int, levels: int) -> float:
    """TensorRT-style entropy calibration on |x|: the threshold of the best window [0, i)."""
    hist, edges = np.histogram(abs_x, bins=bins, range=(0.0, float(abs_x.max())))
    hist = hist.astype(np.float64)
    kls = [reference_window_kl(hist, 0, i, levels) for i in range(levels, bins + 1)]
    return (levels + int(np.argmin(kls))) * (edges[1] - edges[0])


def test_kl_matches_reference_entropy_calibration():
    x = heavy_tailed(20_000, seed=1)
    bins, levels = 256, 16  # small sizes keep the loop reference fast; same algorithm as 2048 / 128
    ob = observer("kl", BitTypeConfig(5, True, "int5"), hist_bins=bins)
    ob.update(torch.from_numpy(x))
    lo, hi = ob.compute_range()
    ref = reference_entropy_threshold(np.abs(x), bins, levels)
    width = np.abs(x).max() / bins
    assert hi.item() == pytest.approx(ref, abs=1.01 * width)
    assert lo.item() == -hi.item()
    # Heavy tails: the entropy threshold clips well inside the maximum.
    assert hi.item() < 0.8 * np.abs(x).max()


@pytest.mark.parametrize("bt", [INT8, UINT8])
def test_omse_is_near_the_brute_force_optimum_and_beats_minmax(bt):
    x = heavy_tailed(50_000, seed=2)
    ob = observer("omse", bt)
    for part in np.array_split(x, 4):
        ob.update(torch.from_numpy(part))
    lo, hi = ob.compute_range()
    mse = np_mse(x, lo.item(), hi.item(), bt)
    lo0, hi0 = float(min(x.min(), 0)), float(max(x.max(), 0))
    if bt.symmetric:
        lo0 = -max(abs(lo0), hi0)
        hi0 = -lo0
    best = min(np_mse(x, a / 400 * lo0, a / 400 * hi0, bt) for a in range(1, 401))
    assert mse <= 1.03 * best
    assert mse < np_mse(x, float(x.min()), float(x.max()), bt)


def test_omse_accumulates_every_batch_not_only_the_last():
    rng = np.random.default_rng(4)
    wide = (rng.standard_normal(20_000) * 8).astype(np.float32)
    narrow = (rng.standard_normal(20_000) * 0.5).astype(np.float32)
    streamed, last_only, joint = observer("omse"), observer("omse"), observer("omse")
    streamed.update(torch.from_numpy(wide))
    streamed.update(torch.from_numpy(narrow))
    last_only.update(torch.from_numpy(narrow))
    joint.update(torch.from_numpy(np.concatenate([wide, narrow])))
    assert streamed.compute_range()[1].item() == pytest.approx(joint.compute_range()[1].item(), rel=0.03)
    assert streamed.compute_range()[1].item() > 3 * last_only.compute_range()[1].item()


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_channel_wise_equals_layer_wise_per_column(name, monkeypatch):
    # Per channel KL normally tries fewer window lengths; with the full search it must agree exactly.
    monkeypatch.setattr(KLObserver, "channel_candidates", None)
    rng = np.random.default_rng(5)
    x = (rng.standard_t(df=4, size=(4000, 3)) * np.array([0.5, 2.0, 6.0])).astype(np.float32)
    obc = observer(name, UINT8, channel_axis=-1)
    obc.update(torch.from_numpy(x))
    lo_c, hi_c = obc.compute_range()
    assert lo_c.shape == (3,)
    for c in range(3):
        ob = observer(name, UINT8)
        ob.update(torch.from_numpy(np.ascontiguousarray(x[:, c])))
        lo, hi = ob.compute_range()
        assert lo_c[c].item() == pytest.approx(lo.item(), rel=1e-5, abs=1e-6)
        assert hi_c[c].item() == pytest.approx(hi.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_symmetric_grids_get_zero_point_zero(name):
    ob = observer(name, INT8)
    ob.update(torch.from_numpy(heavy_tailed(5000) + 3.0))
    scale, zp = ob.compute_qparams()
    assert zp.item() == 0 and scale.item() > 0


def test_ptf_factors_are_powers_of_two_and_base_covers_widest_channel():
    rng = np.random.default_rng(6)
    widths = np.array([40.0, 10.0, 5.0, 2.5, 1.0, 0.3])
    x = (rng.uniform(-1, 1, size=(20_000, 6)) * widths).astype(np.float32)
    spec = QuantizerSpec(bit_type=UINT8, calibration_mode="channel_wise", power_of_two_factor=True, ptf_levels=4)
    method = UniformQuantizer()
    channel_obs = build_observer("minmax", spec, method, -1)
    ptf = PowerOfTwoFactor(spec, method, -1, channel_obs)
    for part in np.array_split(x, 3):
        channel_obs.update(torch.from_numpy(part))
        ptf.update(torch.from_numpy(part))
    base, zp = ptf.base_qparams()
    scales, zps = ptf.channel_qparams()
    assert torch.all(zps == zp)
    ratio = (scales / base).numpy()
    exponents = np.log2(ratio)
    np.testing.assert_array_equal(exponents, np.round(exponents))  # powers of two
    assert exponents.min() >= -3 and exponents.max() == 0  # base covers the widest channel
    # The base grid spans the whole tensor (to half a step: the zero point is rounded).
    lo, hi = x.min(), x.max()
    half = base.item() / 2
    assert base.item() * (UINT8.qmax - zp.item()) >= hi - half and base.item() * (UINT8.qmin - zp.item()) <= lo + half
    # Each factor is the best of the four choices on the raw data (brute force).
    for c in range(6):
        errs = [np_fake_quant_err(x[:, c], base.item() * 2.0 ** (k - 3), zp.item()) for k in range(4)]
        chosen = errs[int(exponents[c]) + 3]
        assert chosen <= 1.05 * min(errs) + 1e-12
    assert list(exponents[:3]) == [0, -2, -3]


def test_ptf_channel_zero_points_centre_each_channel_and_never_lose_to_the_shared_one():
    # Off-centre channels beside a wide symmetric one: the shared zero point sits at the tensor's centre, so
    # at a fine scale the grid leaves one side of an off-centre channel outside it.
    rng = np.random.default_rng(9)
    ranges = np.array([[-50.0, 50.0], [-2.0, 30.0], [-30.0, 2.0], [-1.0, 1.0], [-0.1, 3.0]])
    x = rng.uniform(ranges[:, 0], ranges[:, 1], size=(20_000, 5)).astype(np.float32)

    def calibrate(per_channel: bool):
        spec = QuantizerSpec(bit_type=UINT8, calibration_mode="channel_wise", power_of_two_factor=True, ptf_levels=8, ptf_channel_zero_points=per_channel)
        method = UniformQuantizer()
        obs = build_observer("minmax", spec, method, -1)
        ptf = PowerOfTwoFactor(spec, method, -1, obs)
        obs.update(torch.from_numpy(x))
        ptf.update(torch.from_numpy(x))
        return ptf.base_qparams()[0].item(), *ptf.channel_qparams()

    _, _, shared_zps = calibrate(False)
    base, scales, zps = calibrate(True)
    exponents = np.log2((scales / base).numpy())
    np.testing.assert_array_equal(exponents, np.round(exponents))  # still powers of two of one base
    for c in range(5):
        lo, hi = x[:, c].min(), x[:, c].max()
        # Independent reference: at each candidate scale, the code that puts the range's middle at 127.5.
        cands = [(base * 2.0 ** (k - 7), float(np.clip(np.round(127.5 - (lo + hi) / 2 / (base * 2.0 ** (k - 7))), 0, 255))) for k in range(8)]
        errs = [np_fake_quant_err(x[:, c], s, z) for s, z in cands]
        k = int(exponents[c]) + 7
        assert scales[c].item() == pytest.approx(cands[k][0]) and zps[c].item() == cands[k][1]
        assert errs[k] <= 1.05 * min(errs) + 1e-12
        shared_errs = [np_fake_quant_err(x[:, c], base * 2.0 ** (j - 7), shared_zps[0].item()) for j in range(8)]
        assert errs[k] <= 1.05 * min(shared_errs) + 1e-12
        if c in (1, 2, 4):  # off-centre: a finer step than the shared zero point allows, a quarter of the error or less
            assert errs[k] < 0.3 * min(shared_errs)
    assert exponents[1] == exponents[2] == -1 and zps[1].item() < 100 and zps[2].item() > 155
    assert zps.min().item() >= UINT8.qmin and zps.max().item() <= UINT8.qmax  # zero stays on every grid


def np_fake_quant_err(x: np.ndarray, scale: float, zp: float) -> float:
    q = np.clip(np.round(x / scale) + zp, 0, 255)
    return float(np.mean(((q - zp) * scale - x) ** 2))


@pytest.mark.parametrize("bt", [INT8, UINT8])
def test_histogram_error_integral_matches_direct_error(bt):
    # For data spread uniformly inside each bin, the closed-form integral equals the direct error.
    rng = np.random.default_rng(7)
    bins = 64
    hist = StreamingHistogram(bins, absolute=bt.symmetric)
    x = (rng.standard_normal(200_000) * 2).astype(np.float32)
    hist.update(torch.from_numpy(x)[:, None])
    lo, hi, w = hist.lo.item(), hist.hi.item(), hist.width.item()
    counts = hist.counts[0].numpy()
    # Resample: each bin's count spread evenly (midpoints of a fine sub-grid) inside the bin.
    sub = 2000
    offsets = (np.arange(sub) + 0.5) / sub
    method = UniformQuantizer()
    scale, zp = method.qparams(torch.tensor([[lo * 0.3]]), torch.tensor([[hi * 0.3]]), bt)
    total = 0.0
    for b in range(bins):
        v = lo + (b + offsets) * w
        q = np.clip(np.round(v / scale.item()) + zp.item(), bt.qmin, bt.qmax)
        total += counts[b] * np.mean(((q - zp.item()) * scale.item() - v) ** 2)
    got = histogram_sq_error(hist, method, bt, scale, zp).item()
    assert got == pytest.approx(total, rel=1e-4)


def test_ptf_base_keeps_an_outlier_channel_a_tensor_wide_percentile_would_clip():
    # Channel 0 carries large values on 0.5% of the rows: 0.008% of all values, i.e. beyond the tensor-wide
    # 99.99th percentile, but well inside channel 0's own. The base grid must still reach them.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((40_000, 64)).astype(np.float32)
    rows = rng.choice(40_000, 200, replace=False)
    x[rows, 0] = rng.choice([-40.0, 40.0], 200).astype(np.float32) + rng.standard_normal(200).astype(np.float32)
    spec = QuantizerSpec(bit_type=UINT8, observer="percentile", calibration_mode="channel_wise", power_of_two_factor=True)
    method = UniformQuantizer()
    obs = build_observer("percentile", spec, method, -1)
    ptf = PowerOfTwoFactor(spec, method, -1, obs)
    obs.update(torch.from_numpy(x))
    ptf.update(torch.from_numpy(x))
    assert np.quantile(np.abs(x), 0.9999) < 10  # what a tensor-wide percentile would keep
    scales, zps = ptf.channel_qparams()
    top, bottom = (UINT8.qmax - zps[0]) * scales[0], (UINT8.qmin - zps[0]) * scales[0]
    assert top.item() >= 39.0 and bottom.item() <= -39.0
    assert scales[1:].max().item() < scales[0].item()  # ordinary channels get finer steps


def test_kl_on_signed_histograms_matches_reference_windows():
    # Unsigned grids search windows that shrink [min, max] towards 0 on both sides.
    from models.ptq.observers import _candidate_windows

    rng = np.random.default_rng(9)
    x = np.concatenate([rng.standard_t(3, 15_000) * 0.5, rng.exponential(2.0, 5_000)]).astype(np.float32)
    bins, bt = 256, BitTypeConfig(5, False, "uint5")
    ob = observer("kl", bt, hist_bins=bins)
    ob.update(torch.from_numpy(x))
    lo, hi = ob.compute_range()
    hist = ob.hist.counts[0].numpy()
    starts, ends = _candidate_windows(ob.hist, 32, None)
    kls = [reference_window_kl(hist, int(a), int(b), 32) for a, b in zip(starts[0], ends[0])]
    best = int(np.argmin(kls))
    width = ob.hist.width.item()
    assert lo.item() == pytest.approx(ob.hist.lo.item() + width * int(starts[0, best]), abs=1e-5)
    assert hi.item() == pytest.approx(ob.hist.lo.item() + width * int(ends[0, best]), abs=1e-5)
    assert lo.item() > x.min() and hi.item() < x.max()
