"""Range observers for post-training calibration (FQ-ViT, arXiv 2111.13824, Sec. 4.1 and Table 2).

Every observer has the same small API - ``update(x)``, ``compute_range()``, ``compute_qparams()``,
``reset()`` - and works per tensor (``channel_axis=None``) or per channel:

* ``minmax``     running minimum / maximum;
* ``percentile`` the ``alpha`` quantile of |x| (symmetric grids) or the two tail quantiles;
* ``kl``         the clipping range whose quantized distribution is closest in KL divergence to the
                 calibration histogram (TensorRT's entropy calibration: 2048 bins, threshold search);
* ``omse``       the clipping range that minimises the quantization MSE of *every* calibration value.

Percentile, KL and OMSE share one :class:`StreamingHistogram`, accumulated over all calibration
batches, so none of them looks only at the last batch and memory does not grow with the data.
:class:`PowerOfTwoFactor` picks FQ-ViT's per-channel power-of-two factors (Sec. 3.2) the same way.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.ptq.quantizers import QuantMethod
from quant_config import BitTypeConfig, QuantizerSpec

__all__ = [
    "Observer",
    "MinMaxObserver",
    "PercentileObserver",
    "KLObserver",
    "OMSEObserver",
    "StreamingHistogram",
    "PowerOfTwoFactor",
    "OBSERVERS",
    "build_observer",
    "channel_view",
]


def channel_view(x: Tensor, channel_axis: int | None) -> Tensor:
    """View ``x`` as (values, channels); one column when ``channel_axis`` is None (per tensor)."""
    if channel_axis is None:
        return x.reshape(-1, 1)
    axis = channel_axis % x.dim()
    if axis == x.dim() - 1:
        return x.reshape(-1, x.shape[-1])
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


def _squeeze(t: Tensor, per_channel: bool) -> Tensor:
    return t if per_channel else t.reshape(())


def _column_aminmax(v: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column min and max of (values, channels), shape (C,); one column uses the ~20x faster full reduction."""
    if v.shape[1] == 1:
        lo, hi = torch.aminmax(v)
        return lo.reshape(1), hi.reshape(1)
    return torch.aminmax(v, dim=0)


class Observer:
    """Base class: collects statistics of one tensor over the calibration batches."""

    def __init__(self, spec: QuantizerSpec, method: QuantMethod, channel_axis: int | None = None) -> None:
        self.spec = spec
        self.bit_type: BitTypeConfig = spec.bit_type
        self.method = method
        self.channel_axis = channel_axis
        self.reset()

    @property
    def per_channel(self) -> bool:
        return self.channel_axis is not None

    @property
    def has_data(self) -> bool:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, x: Tensor) -> None:
        raise NotImplementedError

    def compute_range(self) -> tuple[Tensor, Tensor]:
        """Clipping range (lo, hi): 0-dim per tensor, shape (C,) per channel."""
        raise NotImplementedError

    def compute_qparams(self) -> tuple[Tensor, Tensor]:
        lo, hi = self.compute_range()
        return self.method.qparams(lo, hi, self.bit_type)


class MinMaxObserver(Observer):
    def reset(self) -> None:
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None

    @property
    def has_data(self) -> bool:
        return self.min_val is not None

    def update(self, x: Tensor) -> None:
        lo, hi = _column_aminmax(channel_view(x.detach(), self.channel_axis))
        if self.min_val is None:
            self.min_val, self.max_val = lo.float(), hi.float()
        else:
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)

    def compute_range(self) -> tuple[Tensor, Tensor]:
        if self.min_val is None:
            raise RuntimeError("observer has no data")
        return _squeeze(self.min_val, self.per_channel), _squeeze(self.max_val, self.per_channel)


class StreamingHistogram:
    """Per-channel histograms with a fixed number of equal bins over a range that grows with the data.

    ``absolute`` histograms count |x| over [0, max|x|] (symmetric grids, as TensorRT's entropy
    calibrator); the others count x over [min(x, 0), max(x, 0)]. When a batch falls outside the current
    range, the counts are re-binned into the wider range by linear interpolation of their cumulative
    distribution (mass is conserved exactly; only the position inside an old bin is approximated).
    """

    def __init__(self, bins: int, absolute: bool) -> None:
        self.bins = bins
        self.absolute = absolute
        self.counts: Tensor | None = None  # (C, bins), float64
        self.lo: Tensor | None = None  # (C,)
        self.hi: Tensor | None = None  # (C,)

    @property
    def width(self) -> Tensor:
        return (self.hi - self.lo) / self.bins

    def update(self, v: Tensor) -> None:
        """Add the columns of ``v`` (values, channels) to the per-channel histograms."""
        v = v.detach().float()
        if self.absolute:
            v = v.abs()  # a fresh tensor, binned in place below
            lo = torch.zeros(v.shape[1], device=v.device)
            hi = _column_aminmax(v)[1]
        else:
            lo, hi = _column_aminmax(v)
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        if self.counts is None:
            # A constant channel still needs a positive width.
            hi = torch.maximum(hi, lo + 1e-12)
            self.lo, self.hi = lo, hi
            self.counts = torch.zeros(v.shape[1], self.bins, dtype=torch.float64, device=v.device)
        else:
            lo, hi = torch.minimum(lo, self.lo), torch.maximum(hi, self.hi)
            if bool(((lo < self.lo) | (hi > self.hi)).any()):
                self._rebin(lo, hi)
        self._accumulate(v)

    def _accumulate(self, v: Tensor) -> None:
        channels = v.shape[1]
        # |x| histograms start at 0 and own `v` already; others need one new tensor for x - lo.
        pos = v if self.absolute else v - self.lo
        # Truncation is floor for these non-negative positions; int32 indices halve bincount's work.
        idx = pos.mul_(self.bins / (self.hi - self.lo)).clamp_(0, self.bins - 1).to(torch.int32)
        if channels > 1:
            idx += torch.arange(channels, device=v.device, dtype=torch.int32) * self.bins
        counts = torch.bincount(idx.reshape(-1), minlength=channels * self.bins)
        self.counts += counts.view(channels, self.bins)

    def _rebin(self, lo: Tensor, hi: Tensor) -> None:
        channels, bins = self.counts.shape
        cdf = torch.zeros(channels, bins + 1, dtype=torch.float64, device=self.counts.device)
        torch.cumsum(self.counts, dim=1, out=cdf[:, 1:])
        steps = torch.arange(bins + 1, device=lo.device, dtype=torch.float64) / bins
        new_edges = lo.double()[:, None] + (hi - lo).double()[:, None] * steps
        pos = ((new_edges - self.lo.double()[:, None]) / (self.hi - self.lo).double()[:, None] * bins).clamp_(0, bins)
        left = pos.floor().long().clamp_(max=bins - 1)
        frac = pos - left
        below = cdf.gather(1, left)
        new_cdf = below + frac * (cdf.gather(1, left + 1) - below)
        self.counts = new_cdf.diff(dim=1).clamp_(min=0.0)
        self.lo, self.hi = lo, hi

    def centers(self) -> Tensor:
        """Bin centers, (C, bins)."""
        steps = torch.arange(self.bins, device=self.lo.device, dtype=torch.float32) + 0.5
        return self.lo[:, None] + self.width[:, None] * steps

    def quantile(self, q: float) -> Tensor:
        """Per-channel ``q`` quantile, interpolated linearly inside the bin that holds it."""
        cdf = self.counts.cumsum(dim=1)
        target = cdf[:, -1:] * q
        idx = torch.searchsorted(cdf, target).clamp_(max=self.bins - 1)
        below = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(target))
        inside = self.counts.gather(1, idx).clamp(min=1e-12)
        frac = ((target - below) / inside).clamp(0.0, 1.0)
        return (self.lo[:, None] + self.width[:, None] * (idx + frac)).squeeze(1).float()


class HistogramObserver(Observer):
    """Base of the observers that pick their range from a :class:`StreamingHistogram`."""

    def reset(self) -> None:
        self.hist = StreamingHistogram(self.spec.hist_bins, absolute=self.bit_type.symmetric)

    @property
    def has_data(self) -> bool:
        return self.hist.counts is not None

    def update(self, x: Tensor) -> None:
        self.hist.update(channel_view(x.detach(), self.channel_axis))

    def compute_range(self) -> tuple[Tensor, Tensor]:
        if not self.has_data:
            raise RuntimeError("observer has no data")
        lo, hi = self._range_from_histogram()
        return _squeeze(lo.float(), self.per_channel), _squeeze(hi.float(), self.per_channel)

    def _range_from_histogram(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    def _range_from_histogram(self) -> tuple[Tensor, Tensor]:
        alpha = float(self.spec.percentile)
        if self.hist.absolute:
            t = self.hist.quantile(alpha)
            return -t, t
        return self.hist.quantile(1.0 - alpha), self.hist.quantile(alpha)


def _candidate_windows(hist: StreamingHistogram, min_bins: int, max_candidates: int | None) -> tuple[Tensor, Tensor]:
    """Bin windows [start, end) that shrink the range towards 0: (C, K) each, widest last."""
    bins = hist.bins
    lengths = torch.arange(min_bins, bins + 1, device=hist.counts.device)
    if max_candidates is not None and lengths.numel() > max_candidates:
        pick = torch.linspace(0, lengths.numel() - 1, max_candidates, device=lengths.device).round().long()
        lengths = lengths[pick]
    alpha = lengths.double() / bins  # (K,)
    zero = (-hist.lo.double() / (hist.hi - hist.lo).double() * bins)[:, None]  # (C, 1): position of 0 in bins
    start = torch.round(zero * (1.0 - alpha)).long()
    end = torch.minimum(start + lengths, torch.full_like(start, bins))
    start = end - lengths
    return start, end


class KLObserver(HistogramObserver):
    """Entropy calibration (TensorRT's INT8 calibrator, NVIDIA GTC 2017 "8-bit inference with TensorRT").

    For every candidate window of the histogram, P is the windowed histogram with the mass outside
    folded into its edge bins, Q is the window merged into as many groups as the grid has levels and
    spread back over the non-empty bins; the window with the smallest KL(P || Q) wins. Per tensor every
    window length from ``levels`` to all bins is tried; per channel, to bound the cost of hundreds of
    channels, ``channel_candidates`` window lengths spread evenly over the same interval.
    """

    chunk_rows = 256
    channel_candidates: int | None = 128

    def _range_from_histogram(self) -> tuple[Tensor, Tensor]:
        hist = self.hist
        levels = self.bit_type.qmax + 1 if self.bit_type.symmetric else self.bit_type.qmax - self.bit_type.qmin + 1
        if levels >= hist.bins:  # finer grid than the histogram: nothing to search
            return hist.lo, hist.hi
        starts, ends = _candidate_windows(hist, levels, None if hist.counts.shape[0] == 1 else self.channel_candidates)
        best = torch.stack([self._best_window(hist.counts[c], starts[c], ends[c], levels) for c in range(hist.counts.shape[0])])
        channels = torch.arange(hist.counts.shape[0], device=best.device)
        lo = hist.lo + hist.width * starts[channels, best]
        hi = hist.lo + hist.width * ends[channels, best]
        return (-hi, hi) if hist.absolute else (lo, hi)

    def _best_window(self, counts: Tensor, starts: Tensor, ends: Tensor, levels: int) -> Tensor:
        counts = counts.float()
        cdf = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        total = cdf[-1]
        kl_all = []
        for s, e in zip(starts.split(self.chunk_rows), ends.split(self.chunk_rows)):
            kl_all.append(self._kl(counts, cdf, total, s, e, levels))
        return torch.cat(kl_all).argmin()

    @staticmethod
    def _kl(counts: Tensor, cdf: Tensor, total: Tensor, starts: Tensor, ends: Tensor, levels: int) -> Tensor:
        lengths = ends - starts  # (K,)
        width = int(lengths.max())
        j = torch.arange(width, device=counts.device)
        inside = j[None, :] < lengths[:, None]
        window = counts[(starts[:, None] + j).clamp_(max=counts.numel() - 1)] * inside  # (K, W)
        p = window.clone()
        rows = torch.arange(len(starts), device=counts.device)
        p[rows, 0] += cdf[starts]  # mass left of the window
        p[rows, lengths - 1] += total - cdf[ends]  # mass right of the window
        # Group g(j) = floor(j * levels / L): the window merged into `levels` quantization bins.
        group = torch.div(j[None, :] * levels, lengths[:, None], rounding_mode="floor")
        group = torch.where(inside, group, torch.full_like(group, levels))  # padding -> spare group
        nonzero = (p > 0).float()
        group_sum = window.new_zeros(len(starts), levels + 1).scatter_add_(1, group, window)
        group_nonzero = window.new_zeros(len(starts), levels + 1).scatter_add_(1, group, nonzero)
        q = (group_sum / group_nonzero.clamp(min=1.0)).gather(1, group) * nonzero
        p = p / p.sum(dim=1, keepdim=True)
        q = q / q.sum(dim=1, keepdim=True).clamp(min=1e-30)
        # Bins where P has mass but Q has none get a tiny probability (the usual smoothing).
        q = torch.where((p > 0) & (q <= 0), torch.full_like(q, 1e-10), q)
        terms = torch.where(p > 0, p * (p.clamp(min=1e-30).log() - q.clamp(min=1e-30).log()), torch.zeros_like(p))
        return terms.sum(dim=1)


def _uniform_sq_error_antiderivative(t: Tensor, scale: Tensor, clip_lo: Tensor, clip_hi: Tensor) -> Tensor:
    """An antiderivative of ``(x - Q(x))^2`` for the uniform quantizer Q with step ``scale`` and clip range.

    Below ``clip_lo`` the error is ``x - clip_lo`` (integral ``(x - clip_lo)^3 / 3``), above ``clip_hi``
    likewise; in between it is the sawtooth ``scale * (u - round(u))`` with ``u = x / scale``, whose
    integral from the middle of cell 0 is ``scale^3 * (n / 12 + (r^3 + 1/8) / 3)`` with
    ``n = floor(u + 1/2)``, ``r = u - n``. The pieces join continuously.
    """
    below = (torch.clamp(t, max=clip_lo) - clip_lo).pow(3) / 3
    above = (torch.clamp(t, min=clip_hi) - clip_hi).pow(3) / 3
    u = torch.clamp(t, clip_lo, clip_hi) / scale
    n = torch.floor(u + 0.5)
    r = u - n
    return below + above + scale.pow(3) * (n / 12 + (r.pow(3) + 0.125) / 3)


def histogram_sq_error(
    hist: StreamingHistogram, method: QuantMethod, bit_type: BitTypeConfig, scale: Tensor, zero_point: Tensor
) -> Tensor:
    """Squared quantization error summed over everything the histogram counted.

    ``scale``/``zero_point`` are (K, C) candidates; returns (K, C). For the uniform quantizer the values
    are taken as uniformly spread inside each bin and the error is integrated exactly (so it stays
    accurate when a quantization step is no wider than a bin); other quantizers use the bin centers.
    Symmetric grids see |x|, which has the same error as x on a symmetric grid.
    """
    counts = hist.counts[None]  # (1, C, B)
    if method.name == "uniform":
        steps = torch.arange(hist.bins + 1, device=hist.lo.device, dtype=torch.float64)
        edges = (hist.lo.double()[:, None] + hist.width.double()[:, None] * steps)[None]  # (1, C, B+1)
        s, zp = scale.double()[..., None], zero_point.double()[..., None]
        phi = _uniform_sq_error_antiderivative(edges, s, (bit_type.qmin - zp) * s, (bit_type.qmax - zp) * s)
        return (counts * phi.diff(dim=-1)).sum(dim=-1) / hist.width.double()[None]
    centers = hist.centers()[None]
    deq = method.fake_quant(centers, scale[..., None], zero_point[..., None], bit_type)
    return ((deq - centers).square_().double() * counts).sum(dim=-1)


class OMSEObserver(HistogramObserver):
    """Range minimising the quantization MSE over all calibration values (OMSE, Choukroun et al. 2019).

    The error of each candidate range ``alpha * [lo, hi]`` (alpha = 1/K .. 1, K = 100) is summed over
    the streaming histogram, i.e. over every value of every calibration batch.
    """

    candidates = 100
    chunk = 10

    def _range_from_histogram(self) -> tuple[Tensor, Tensor]:
        hist = self.hist
        alphas = torch.arange(1, self.candidates + 1, device=hist.lo.device, dtype=torch.float32) / self.candidates
        errors = []
        for a in alphas.split(self.chunk):
            lo, hi = a[:, None] * hist.lo[None], a[:, None] * hist.hi[None]  # (k, C)
            if hist.absolute:
                lo = -hi
            scale, zp = self.method.qparams(lo, hi, self.bit_type)
            errors.append(histogram_sq_error(hist, self.method, self.bit_type, scale, zp))
        best = alphas[torch.cat(errors).argmin(dim=0)]  # (C,)
        hi = best * hist.hi
        return (-hi if hist.absolute else best * hist.lo), hi


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "kl": KLObserver,
    "omse": OMSEObserver,
}


def build_observer(name: str, spec: QuantizerSpec, method: QuantMethod, channel_axis: int | None = None) -> Observer:
    """Instantiate an observer by its registry name."""
    try:
        cls = OBSERVERS[name]
    except KeyError:
        raise ValueError(f"unknown observer {name!r}; valid: {', '.join(sorted(OBSERVERS))}") from None
    return cls(spec, method, channel_axis)


class PowerOfTwoFactor:
    """FQ-ViT power-of-two factor (Sec. 3.2, Eq. 6-7) for the LayerNorm input.

    The layer-wise observer gives one base scale ``s`` that covers the widest channel; channel ``c`` then
    uses ``s * 2^(alpha_c - (levels - 1))`` with alpha_c in [0, levels), chosen to minimise that channel's
    squared error over all calibration values (a per-channel streaming histogram). The zero point is
    shared, so the integer LayerNorm only needs bit shifts to bring every channel to one scale.
    """

    def __init__(self, spec: QuantizerSpec, method: QuantMethod, channel_axis: int) -> None:
        self.spec = spec
        self.method = method
        self.channel_axis = channel_axis
        self.reset()

    def reset(self) -> None:
        self.hist = StreamingHistogram(self.spec.hist_bins, absolute=self.spec.bit_type.symmetric)

    def update(self, x: Tensor) -> None:
        self.hist.update(channel_view(x.detach(), self.channel_axis))

    def factors(self, base_scale: Tensor, zero_point: Tensor) -> Tensor:
        """Exponents alpha_c (C,), as integers in a float tensor."""
        levels = self.spec.ptf_levels
        k = torch.arange(levels, device=base_scale.device, dtype=torch.float32)
        channels = self.hist.counts.shape[0]
        scales = (base_scale * torch.exp2(k - (levels - 1)))[:, None].expand(levels, channels)
        zps = zero_point.reshape(1, 1).expand(levels, channels).to(scales)
        errors = histogram_sq_error(self.hist, self.method, self.spec.bit_type, scales, zps)  # (levels, C)
        # Ties (e.g. an all-zero channel) go to the largest factor, i.e. no extra clipping.
        return (levels - 1) - errors.flip(0).argmin(dim=0).float()

    def channel_scales(self, base_scale: Tensor, zero_point: Tensor) -> Tensor:
        levels = self.spec.ptf_levels
        return base_scale * torch.exp2(self.factors(base_scale, zero_point) - (levels - 1))
