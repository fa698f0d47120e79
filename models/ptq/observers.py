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

Exact and distributed calibration (``torchrun``): an optional first pass over the images records only
each histogram's range (``observe_range``; ``fix_range`` all-reduces it across processes), so the
second pass counts into fixed bins - no re-binning, and every process bins alike. ``synchronize`` then
all-reduces the statistics (min/max, histogram counts: sums of integers, exact in float64), so the
calibrated parameters equal a single process's on the same batches (:mod:`models.ptq.histogram`,
:mod:`models.ptq.collectives`). FQ-ViT's per-channel power-of-two factors (Sec. 3.2) are in :mod:`models.ptq.ptf`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from models.ptq.collectives import all_reduce_
from models.ptq.histogram import StreamingHistogram, channel_view, column_aminmax, histogram_sq_error
from models.ptq.quantizers import QuantMethod
from quant_config import BitTypeConfig, QuantizerSpec

__all__ = ["Observer", "MinMaxObserver", "HistogramObserver", "PercentileObserver", "KLObserver", "OMSEObserver", "OBSERVERS", "build_observer"]


def _squeeze(t: Tensor, per_channel: bool) -> Tensor:
    return t if per_channel else t.reshape(())


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

    @property
    def needs_range(self) -> bool:
        """Whether a first pass of :meth:`observe_range` makes the statistics exact (histograms)."""
        return False

    def observe_range(self, x: Tensor) -> None:
        """First pass of exact calibration: record the range the statistics will cover."""

    def fix_range(self) -> None:
        """End of the first pass: fix that range (the same in every process)."""

    def synchronize(self) -> None:
        """Combine the statistics of every process (before :meth:`compute_qparams`)."""

    def compute_range(self) -> tuple[Tensor, Tensor]:
        """Clipping range (lo, hi): 0-dim per tensor, shape (C,) per channel."""
        raise NotImplementedError

    def running_extremes(self) -> list[Tensor]:
        """The running minima and maxima kept so far (NaN or infinity in the data shows up in them)."""
        return []

    def compute_qparams(self) -> tuple[Tensor, Tensor]:
        lo, hi = self.compute_range()
        return self.method.qparams(lo, hi, self.bit_type)


class MinMaxObserver(Observer):
    def reset(self) -> None:
        self.min_val: Tensor | None = None
        self.max_val: Tensor | None = None
        self._seen: list[Tensor] = []  # the range pass's min/max: only for the non-finite check

    def observe_range(self, x: Tensor) -> None:
        # Min/max need no first pass; keeping it anyway lets a NaN or infinity be named where it first
        # appears in that pass, before a histogram point downstream counts it.
        lo, hi = column_aminmax(channel_view(x.detach(), self.channel_axis))
        if self._seen:
            torch.minimum(self._seen[0], lo, out=self._seen[0])
            torch.maximum(self._seen[1], hi, out=self._seen[1])
        else:
            self._seen = [lo.float(), hi.float()]

    def fix_range(self) -> None:
        self._seen = []

    @property
    def has_data(self) -> bool:
        return self.min_val is not None

    def update(self, x: Tensor) -> None:
        lo, hi = column_aminmax(channel_view(x.detach(), self.channel_axis))
        if self.min_val is None:
            self.min_val, self.max_val = lo.float(), hi.float()
        else:
            torch.minimum(self.min_val, lo, out=self.min_val)
            torch.maximum(self.max_val, hi, out=self.max_val)

    def synchronize(self) -> None:
        all_reduce_(self.min_val, "min")
        all_reduce_(self.max_val, "max")

    def running_extremes(self) -> list[Tensor]:
        return self._seen + ([] if self.min_val is None else [self.min_val, self.max_val])

    def compute_range(self) -> tuple[Tensor, Tensor]:
        if self.min_val is None:
            raise RuntimeError("observer has no data")
        return _squeeze(self.min_val, self.per_channel), _squeeze(self.max_val, self.per_channel)


class HistogramObserver(Observer):
    """Base of the observers that pick their range from a :class:`StreamingHistogram`."""

    def reset(self) -> None:
        self.hist = StreamingHistogram(self.spec.hist_bins, absolute=self.bit_type.symmetric)

    @property
    def has_data(self) -> bool:
        return self.hist.updates > 0

    def update(self, x: Tensor) -> None:
        self.hist.update(channel_view(x.detach(), self.channel_axis))

    @property
    def needs_range(self) -> bool:
        return True

    def observe_range(self, x: Tensor) -> None:
        self.hist.observe_range(channel_view(x.detach(), self.channel_axis))

    def fix_range(self) -> None:
        self.hist.fix_range()

    def synchronize(self) -> None:
        self.hist.synchronize()

    def running_extremes(self) -> list[Tensor]:
        return self.hist.running_extremes()

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


def _xlogx(x: Tensor) -> Tensor:
    return torch.where(x > 0, x * x.clamp(min=1e-300).log(), torch.zeros_like(x))


class KLObserver(HistogramObserver):
    """Entropy calibration (TensorRT's INT8 calibrator, NVIDIA GTC 2017 "8-bit inference with TensorRT").

    For every candidate window of the histogram, P is the windowed histogram with the mass outside
    folded into its edge bins, Q is the window merged into as many groups as the grid has levels and
    spread back over the non-empty bins; the window with the smallest KL(P || Q) wins. Per tensor every
    window length from ``levels`` to all bins is tried; per channel ``channel_candidates`` lengths spread
    evenly over the same interval.

    Q is constant inside each group, so KL(P || Q) = sum P log P - sum_g P(g) log Q(g) needs only prefix
    sums of c, c log c and the count of non-empty bins: O(levels) per window instead of O(bins), the
    same numbers as the direct computation (checked by the tests).
    """

    chunk_elements = 1 << 22
    channel_candidates: int | None = 64

    def _range_from_histogram(self) -> tuple[Tensor, Tensor]:
        hist = self.hist
        levels = self.bit_type.qmax + 1 if self.bit_type.symmetric else self.bit_type.qmax - self.bit_type.qmin + 1
        if levels >= hist.bins:  # finer grid than the histogram: nothing to search
            return hist.lo, hist.hi
        channels = hist.counts.shape[0]
        starts, ends = _candidate_windows(hist, levels, None if channels == 1 else self.channel_candidates)  # (C, K)
        sums = _PrefixSums(hist.counts)
        step = max(1, self.chunk_elements // (channels * (levels + 1)))
        kl = torch.cat(
            [kl_divergence_of_windows(sums, starts[:, k : k + step], ends[:, k : k + step], levels) for k in range(0, starts.shape[1], step)],
            dim=1,
        )
        best = kl.argmin(dim=1, keepdim=True)  # (C, 1)
        lo = hist.lo + hist.width * starts.gather(1, best).squeeze(1)
        hi = hist.lo + hist.width * ends.gather(1, best).squeeze(1)
        return (-hi, hi) if hist.absolute else (lo, hi)


class _PrefixSums:
    """Prefix sums over each channel's histogram (float64): counts, c log c, non-empty bins."""

    def __init__(self, counts: Tensor) -> None:
        c = counts.double()
        zero = c.new_zeros(c.shape[0], 1)
        self.counts = c
        self.count = torch.cat([zero, c.cumsum(dim=1)], dim=1)
        self.clogc = torch.cat([zero, _xlogx(c).cumsum(dim=1)], dim=1)
        self.nonzero = torch.cat([zero, (c > 0).double().cumsum(dim=1)], dim=1)
        self.total = self.count[:, -1:]  # (C, 1)


def kl_divergence_of_windows(sums: _PrefixSums, starts: Tensor, ends: Tensor, levels: int) -> Tensor:
    """KL(P || Q) of the histogram windows [starts, ends) of each channel, (C, K) -> (C, K)."""
    channels = starts.shape[0]
    lengths = ends - starts
    g = torch.arange(levels + 1, device=starts.device)
    # Group g holds window bins j with floor(j * levels / L) == g, i.e. j in [ceil(gL/levels), ceil((g+1)L/levels)).
    bounds = starts[..., None] + torch.div(g * lengths[..., None] + levels - 1, levels, rounding_mode="floor")
    flat = bounds.reshape(channels, -1)
    count_at = sums.count.gather(1, flat).reshape(bounds.shape)
    group_mass = count_at.diff(dim=-1)  # window mass per group (without the outliers)
    group_nonzero = sums.nonzero.gather(1, flat).reshape(bounds.shape).diff(dim=-1)
    left = sums.count.gather(1, starts)  # mass left of the window, folded into its first bin
    right = sums.total - sums.count.gather(1, ends)  # mass right of it, folded into its last bin
    first, last = sums.counts.gather(1, starts), sums.counts.gather(1, ends - 1)
    p_mass = group_mass.clone()
    p_mass[..., 0] += left
    p_mass[..., -1] += right
    group_nonzero[..., 0] += ((first == 0) & (left > 0)).double()
    group_nonzero[..., -1] += ((last == 0) & (right > 0)).double()
    # sum_j p_j log p_j over the window, the two edge bins corrected for the folded outliers.
    plogp = sums.clogc.gather(1, ends) - sums.clogc.gather(1, starts)
    plogp = plogp - _xlogx(first) + _xlogx(first + left) - _xlogx(last) + _xlogx(last + right)
    total = sums.total
    window_mass = count_at[..., -1] - count_at[..., 0]
    # Q_j = (group mass / non-empty bins) / window mass; a group with P mass but no Q mass gets 1e-10.
    log_q = torch.where(
        group_mass > 0,
        torch.log((group_mass / group_nonzero.clamp(min=1.0)).clamp(min=1e-300)) - torch.log(window_mass.clamp(min=1e-300))[..., None],
        torch.full_like(group_mass, math.log(1e-10)),
    )
    return plogp / total - torch.log(total) - (p_mass * log_q).sum(dim=-1) / total


class OMSEObserver(HistogramObserver):
    """Range minimising the quantization MSE over all calibration values (OMSE, Choukroun et al. 2019).

    The error of a candidate range ``alpha * [lo, hi]`` is summed over the streaming histogram, i.e.
    over every value of every calibration batch. alpha is searched coarse to fine: 25 values 1/25 .. 1,
    then 23 more around the best at steps of 1/300.
    """

    coarse = 25
    refine = 12
    chunk = 8

    def _errors(self, alphas: Tensor) -> Tensor:
        """(K,) or (K, C) candidate alphas -> (K, C) squared errors."""
        hist = self.hist
        errors = []
        for a in alphas.split(self.chunk):
            a = a.reshape(len(a), -1)
            hi = a * hist.hi[None]
            lo = -hi if hist.absolute else a * hist.lo[None]
            scale, zp = self.method.qparams(lo, hi, self.bit_type)
            errors.append(histogram_sq_error(hist, self.method, self.bit_type, scale, zp))
        return torch.cat(errors)

    def _range_from_histogram(self) -> tuple[Tensor, Tensor]:
        hist = self.hist
        coarse = torch.arange(1, self.coarse + 1, device=hist.lo.device, dtype=torch.float32) / self.coarse
        best = coarse[self._errors(coarse).argmin(dim=0)]  # (C,)
        offsets = torch.arange(-self.refine + 1, self.refine, device=best.device, dtype=torch.float32) / (self.refine * self.coarse)
        fine = (best[None, :] + offsets[:, None]).clamp_(1.0 / (self.refine * self.coarse), 1.0)  # (K, C)
        chosen = fine.gather(0, self._errors(fine).argmin(dim=0, keepdim=True)).squeeze(0)
        hi = chosen * hist.hi
        return (-hi if hist.absolute else chosen * hist.lo), hi


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
