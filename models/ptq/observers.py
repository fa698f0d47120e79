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
calibrated parameters equal a single process's on the same batches.
:class:`PowerOfTwoFactor` picks FQ-ViT's per-channel power-of-two factors (Sec. 3.2) the same way.
"""
from __future__ import annotations

import math

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
    "all_reduce_",
    "channel_view",
    "distributed",
]


def distributed() -> bool:
    """True inside a torch.distributed process group of more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def all_reduce_(t: Tensor, op: str) -> Tensor:
    """In-place all-reduce (``"min"``, ``"max"`` or ``"sum"``) across the process group; a no-op in one process."""
    if distributed():
        torch.distributed.all_reduce(t, op={"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX,
                                            "sum": torch.distributed.ReduceOp.SUM}[op])  # fmt: skip
    return t


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

    def synchronize(self) -> None:
        all_reduce_(self.min_val, "min")
        all_reduce_(self.max_val, "max")

    def compute_range(self) -> tuple[Tensor, Tensor]:
        if self.min_val is None:
            raise RuntimeError("observer has no data")
        return _squeeze(self.min_val, self.per_channel), _squeeze(self.max_val, self.per_channel)


def _bin_counts(idx: Tensor, size: int) -> Tensor:
    """How often each of 0 .. size-1 occurs in ``idx`` (integers inside that range).

    On a GPU, ``torch.bincount`` reads ``idx.max()`` back to size its output, which would stall every
    calibration batch; ``torch.histc`` over ``size`` unit-wide bins gives the same counts without a
    host round trip (float64 input: every count is exact, and so is each integer's bin).
    """
    if idx.is_cuda:
        return torch.histc(idx.to(torch.float64), bins=size, min=0, max=size)
    return torch.bincount(idx, minlength=size)


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
        self.updates = 0  # batches counted
        self.fixed = False  # range fixed by a first pass: no re-binning
        self._seen: list[Tensor] = []  # [lo, hi] of the first pass

    @property
    def width(self) -> Tensor:
        return (self.hi - self.lo) / self.bins

    def _batch_range(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """The range this histogram needs for the columns of ``v``: [0, max|x|] or [min(x, 0), max(x, 0)]."""
        lo, hi = _column_aminmax(v)
        if self.absolute:
            return torch.zeros_like(lo), torch.maximum(-lo, hi)
        return lo.clamp(max=0.0), hi.clamp(min=0.0)

    def observe_range(self, v: Tensor) -> None:
        """First pass: only widen the recorded range to the columns of ``v``."""
        lo, hi = self._batch_range(v.detach().float())
        if self._seen:
            torch.minimum(self._seen[0], lo, out=self._seen[0])
            torch.maximum(self._seen[1], hi, out=self._seen[1])
        else:
            self._seen = [lo, hi]

    def fix_range(self) -> None:
        """Fix the bins to the first pass's range, all-reduced over the processes; counts start at zero."""
        if not self._seen:
            return
        lo, hi = all_reduce_(self._seen[0], "min"), all_reduce_(self._seen[1], "max")
        self.lo, self.hi = lo, torch.maximum(hi, lo + 1e-12)  # a constant channel still needs a positive width
        self.counts = torch.zeros(lo.shape[0], self.bins, dtype=torch.float64, device=lo.device)
        self.updates, self.fixed, self._seen = 0, True, []

    def synchronize(self) -> None:
        """Sum the counts of every process: needs bins fixed alike everywhere (:meth:`fix_range`)."""
        if distributed():
            if not self.fixed:
                raise RuntimeError("distributed calibration needs fixed histogram ranges: run QVit.observing_ranges() first")
            all_reduce_(self.counts, "sum")

    def update(self, v: Tensor) -> None:
        """Add the columns of ``v`` (values, channels) to the per-channel histograms."""
        v = v.detach().float()
        self.updates += 1
        if self.fixed:  # no range check, so no host synchronisation
            self._accumulate(v.abs() if self.absolute else v)
            return
        lo, hi = self._batch_range(v)
        if self.absolute:
            v = v.abs()  # a fresh tensor, binned in place below
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
        self.counts += _bin_counts(idx.reshape(-1), channels * self.bins).view(channels, self.bins)

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


def histogram_sq_error(
    hist: StreamingHistogram, method: QuantMethod, bit_type: BitTypeConfig, scale: Tensor, zero_point: Tensor
) -> Tensor:
    """Squared quantization error summed over everything the histogram counted.

    ``scale``/``zero_point`` are (K, C) candidates; returns (K, C). For the uniform quantizer the values
    are taken as uniformly spread inside each bin and the error is integrated exactly, so it stays
    accurate when a quantization step is no wider than a bin; other quantizers use the bin centers.
    Symmetric grids see |x|, which has the same error as x on a symmetric grid.

    The integral of ``(x - Q(x))^2`` up to ``t`` is, below the clip range ``[lo, hi]``,
    ``(t - lo)^3 / 3`` (likewise above), and inside it the sawtooth ``s * (u - round(u))``, ``u = t / s``,
    integrates to ``s^3 * (n / 12 + r^3 / 3)`` with ``n = floor(u + 1/2)``, ``r = u - n``. Differencing n
    (integers) and r^3 separately keeps float32 exact enough.
    """
    counts = hist.counts[None].float()  # (1, C, B)
    if method.name != "uniform":
        centers = hist.centers()[None]
        deq = method.fake_quant(centers, scale[..., None], zero_point[..., None], bit_type)
        return ((deq - centers).square_() * counts).sum(dim=-1)
    steps = torch.arange(hist.bins + 1, device=hist.lo.device, dtype=torch.float32)
    edges = (hist.lo[:, None] + hist.width[:, None] * steps)[None]  # (1, C, B+1)
    s = scale.float()[..., None]
    clip_lo, clip_hi = (bit_type.qmin - zero_point.float()[..., None]) * s, (bit_type.qmax - zero_point.float()[..., None]) * s
    outside = (torch.clamp(edges, max=clip_lo) - clip_lo).pow_(3) + (torch.clamp(edges, min=clip_hi) - clip_hi).pow_(3)
    u = torch.maximum(torch.minimum(edges, clip_hi), clip_lo).div_(s)
    n = torch.floor(u + 0.5)
    r3 = (u - n).pow_(3)
    per_bin = outside.diff(dim=-1).div_(3) + s.pow(3) * (n.diff(dim=-1).div_(12) + r3.diff(dim=-1).div_(3))
    return (per_bin * counts).sum(dim=-1) / hist.width[None]


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


class PowerOfTwoFactor:
    """FQ-ViT power-of-two factor (Sec. 3.2, Eq. 6-7) for the LayerNorm input.

    The channel-wise observer gives each channel's range; the base scale ``s`` is the one covering the
    widest of them, so an outlier channel is never clipped by a statistic of the whole tensor (a
    tensor-wide percentile or KL range cuts exactly the few channels that carry the residual stream's
    outliers). Channel ``c`` then uses ``s * 2^(alpha_c - (levels - 1))`` with alpha_c in [0, levels),
    chosen to minimise that channel's squared error over all calibration values (a per-channel
    streaming histogram: the observer's own when it keeps one). The zero point is shared, so the integer
    LayerNorm only needs bit shifts to bring every channel to one scale.
    """

    def __init__(self, spec: QuantizerSpec, method: QuantMethod, channel_axis: int, observer: Observer) -> None:
        self.spec = spec
        self.method = method
        self.channel_axis = channel_axis
        self.observer = observer
        self.reset()

    @property
    def _shares_histogram(self) -> bool:
        return isinstance(self.observer, HistogramObserver)

    @property
    def hist(self) -> StreamingHistogram:
        return self.observer.hist if self._shares_histogram else self._hist

    def reset(self) -> None:
        self._hist = None if self._shares_histogram else StreamingHistogram(self.spec.hist_bins, absolute=self.spec.bit_type.symmetric)

    def update(self, x: Tensor) -> None:
        if not self._shares_histogram:
            self._hist.update(channel_view(x.detach(), self.channel_axis))

    # Its own histogram (beside a MinMax observer) takes part in the exact / distributed passes too.
    @property
    def needs_range(self) -> bool:
        return not self._shares_histogram

    def observe_range(self, x: Tensor) -> None:
        if not self._shares_histogram:
            self._hist.observe_range(channel_view(x.detach(), self.channel_axis))

    def fix_range(self) -> None:
        if not self._shares_histogram:
            self._hist.fix_range()

    def synchronize(self) -> None:
        if not self._shares_histogram:
            self._hist.synchronize()

    def base_qparams(self) -> tuple[Tensor, Tensor]:
        """Scale and zero point of the grid that covers every channel's observed range."""
        lo, hi = self.observer.compute_range()
        return self.method.qparams(lo.min(), hi.max(), self.spec.bit_type)

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

    def channel_qparams(self) -> tuple[Tensor, Tensor]:
        """Per-channel scales s * 2^(alpha_c - levels + 1) and the shared zero point, both (C,)."""
        base_scale, zero_point = self.base_qparams()
        levels = self.spec.ptf_levels
        scales = base_scale * torch.exp2(self.factors(base_scale, zero_point) - (levels - 1))
        return scales, zero_point.expand_as(scales)
