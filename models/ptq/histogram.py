"""Streaming per-channel histograms, and the quantization error they give for a candidate grid.

The percentile, KL and OMSE observers (:mod:`models.ptq.observers`) and FQ-ViT's power-of-two factor
(:mod:`models.ptq.ptf`) read one :class:`StreamingHistogram` accumulated over all calibration batches:
a fixed number of equal bins over a range that grows with the data, so memory does not grow with it.
For exact and distributed calibration an optional first pass records only the range
(``observe_range``, all-reduced by ``fix_range``), so the counting pass bins alike in every process;
``synchronize`` all-reduces the counts (sums of integers, exact in float64).
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.ptq.collectives import all_reduce_, is_distributed
from models.ptq.quantizers import QuantMethod
from quant_config import BitTypeConfig

__all__ = ["StreamingHistogram", "channel_view", "column_aminmax", "histogram_sq_error"]


def channel_view(x: Tensor, channel_axis: int | None) -> Tensor:
    """View ``x`` as (values, channels); one column when ``channel_axis`` is None (per tensor)."""
    if channel_axis is None:
        return x.reshape(-1, 1)
    axis = channel_axis % x.dim()
    if axis == x.dim() - 1:
        return x.reshape(-1, x.shape[-1])
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


def column_aminmax(v: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column min and max of (values, channels), shape (C,); one column uses the ~20x faster full reduction."""
    if v.shape[1] == 1:
        lo, hi = torch.aminmax(v)
        return lo.reshape(1), hi.reshape(1)
    return torch.aminmax(v, dim=0)


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
        lo, hi = column_aminmax(v)
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

    def running_extremes(self) -> list[Tensor]:
        """The range recorded so far: the first pass's, or the growing range of a histogram without one."""
        if self._seen:
            return list(self._seen)
        return [self.lo, self.hi] if self.lo is not None and not self.fixed else []

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
        if is_distributed():
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
