"""FQ-ViT's power-of-two factor for the LayerNorm input (arXiv 2111.13824, Sec. 3.2, Eq. 6-7)."""
from __future__ import annotations

import torch
from torch import Tensor

from models.ptq.histogram import StreamingHistogram, channel_view, histogram_sq_error
from models.ptq.observers import HistogramObserver, Observer
from models.ptq.quantizers import QuantMethod
from quant_config import QuantizerSpec

__all__ = ["PowerOfTwoFactor"]


class PowerOfTwoFactor:
    """FQ-ViT power-of-two factor (Sec. 3.2, Eq. 6-7) for the LayerNorm input.

    The channel-wise observer gives each channel's range; the base scale ``s`` is the one covering the
    widest of them, so an outlier channel is never clipped by a statistic of the whole tensor (a
    tensor-wide percentile or KL range cuts exactly the few channels that carry the residual stream's
    outliers). Channel ``c`` then uses ``s * 2^(alpha_c - (levels - 1))`` with alpha_c in [0, levels),
    chosen to minimise that channel's squared error over all calibration values (a per-channel
    streaming histogram: the observer's own when it keeps one). The zero point is shared (FQ-ViT), so the
    integer LayerNorm only needs bit shifts to bring every channel to one scale; with
    ``ptf_channel_zero_points`` each channel has its own, subtracted before the shift.
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

    def running_extremes(self) -> list[Tensor]:
        return [] if self._shares_histogram else self._hist.running_extremes()

    def synchronize(self) -> None:
        if not self._shares_histogram:
            self._hist.synchronize()

    def base_qparams(self, ranges: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Scale and zero point of the grid that covers every channel's observed range (``ranges``: the
        observer's per-channel ``(lo, hi)`` when the caller already has them)."""
        lo, hi = ranges if ranges is not None else self.observer.compute_range()
        return self.method.qparams(lo.min(), hi.max(), self.spec.bit_type)

    def candidates(self, base_scale: Tensor, zero_point: Tensor, ranges: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Every channel's candidate grids: scales ``s * 2^(k - levels + 1)`` and zero points, both (levels, C).

        The zero point is the shared one, or with ``ptf_channel_zero_points`` the code that puts the
        middle of each channel's observed range (``ranges``: per-channel ``(lo, hi)``) at the middle of
        the integer range at that scale.
        """
        levels = self.spec.ptf_levels
        k = torch.arange(levels, device=base_scale.device, dtype=torch.float32)
        channels = self.hist.counts.shape[0]
        scales = (base_scale * torch.exp2(k - (levels - 1)))[:, None].expand(levels, channels)
        if not self.spec.ptf_channel_zero_points:
            return scales, zero_point.reshape(1, 1).expand(levels, channels).to(scales)
        bt = self.spec.bit_type
        lo, hi = ranges
        middle = ((lo.float() + hi.float()) / 2).reshape(1, channels)
        return scales, torch.round((bt.qmin + bt.qmax) / 2 - middle / scales).clamp_(bt.qmin, bt.qmax)

    def channel_qparams(self) -> tuple[Tensor, Tensor]:
        """Per-channel scales s * 2^(alpha_c - levels + 1) and zero points (shared or per channel), both (C,)."""
        # Read once: a histogram observer's per-channel range is a search over its bins.
        ranges = self.observer.compute_range()
        base_scale, zero_point = self.base_qparams(ranges)
        scales, zps = self.candidates(base_scale, zero_point, ranges)
        errors = histogram_sq_error(self.hist, self.method, self.spec.bit_type, scales, zps)  # (levels, C)
        # Ties (e.g. an all-zero channel) go to the largest factor, i.e. no extra clipping.
        alpha = (errors.shape[0] - 1) - errors.flip(0).argmin(dim=0, keepdim=True)
        return scales.gather(0, alpha)[0], zps.gather(0, alpha)[0]
