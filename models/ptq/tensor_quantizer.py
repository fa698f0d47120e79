"""One quantizer object per tensor (the design of NVIDIA's TensorQuantizer, applied to FQ-ViT).

A :class:`TensorQuantizer` owns everything about one quantization point: its spec (bit type,
observer, calibration mode, quantizer method), the observer collecting calibration statistics, and the
calibrated ``scale`` / ``zero_point`` as registered buffers, so ``state_dict``, ``.to()`` and saving a
calibrated model just work. Layers only call ``self.input_quant(x)`` or ``self.weight_quant(w)``.

What a call does depends on the model-wide :class:`QuantState` (one object shared by all quantizers of
a model, flipped by the model's context managers): pass through (FP32), observe and pass through
(CALIBRATE, so every observer sees FP32 activations as in FQ-ViT), or fake-quantize (QUANT).
"""
from __future__ import annotations

import enum
import logging
from typing import Any

import torch
from torch import Tensor, nn

from models.ptq.observers import build_observer
from models.ptq.ptf import PowerOfTwoFactor
from models.ptq.quantizers import build_quantizer
from models.ptq.token_scale import token_scaled_fake_quant
from quant_config import QuantizerSpec

__all__ = ["QuantMode", "QuantState", "TensorQuantizer"]

log = logging.getLogger(__name__)


def _version(t: Tensor) -> int:
    """In-place update counter (inference-mode tensors have none and cannot be updated outside it)."""
    return -1 if t.is_inference() else t._version


class QuantMode(enum.Enum):
    FP32 = "fp32"
    RANGE = "range"  # first pass of exact calibration: observers record ranges only
    CALIBRATE = "calibrate"
    QUANT = "quant"
    # ONNX export: quantizers pass through (the exporter's Q/DQ hooks stand in for them), the layers
    # compute what deploys (the integer softmax's float form, corrected biases).
    EXPORT = "export"


class QuantState:
    """The mode of one model, shared by reference by all of its quantizers."""

    __slots__ = ("mode",)

    def __init__(self, mode: QuantMode = QuantMode.QUANT) -> None:
        self.mode = mode


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor with calibrated parameters.

    Args:
        spec: how to quantize; ``None`` keeps the tensor in floating point.
        state: the model-wide mode object.
        num_channels: size of the channel axis (used when ``spec`` is channel-wise).
        channel_axis: axis of the channels: 0 for weights, -1 (features) for activations.
        is_weight: the tensor is a parameter: observe it once and cache its quantized value.
        kind: the recipe kind this point belongs to (for reports).
    """

    def __init__(
        self,
        spec: QuantizerSpec | None,
        state: QuantState,
        *,
        num_channels: int = 1,
        channel_axis: int = -1,
        is_weight: bool = False,
        kind: str = "",
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.state = state
        self.kind = kind
        self.is_weight = is_weight
        self.channel_axis = channel_axis
        self.num_channels = num_channels
        self.name = ""  # module path, set by QVit
        # A user switch (profiler's isolated view, keeping sensitive layers in float); the mode is separate.
        self.enabled = spec is not None
        per_channel = spec is not None and spec.calibration_mode == "channel_wise"
        shape = (num_channels,) if per_channel else ()
        self.register_buffer("scale", torch.ones(shape, device=device))
        self.register_buffer("zero_point", torch.zeros(shape, device=device))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool, device=device))
        # A weight's quantized value when a rounding search (GPTQ) chose it instead of round-to-nearest;
        # None (and absent from the state dict) otherwise.
        self.register_buffer("rounded", None)
        self._ready = False  # mirror of `calibrated` that needs no device sync
        self._weight_seen = False  # a weight's range was recorded in the range pass
        self._cache: tuple[Any, Tensor] | None = None
        self._wide: tuple[Any, Tensor] | None = None  # the cached weight in another dtype (as_dtype)
        # Per-tensor scale and uniform zero points as Python floats: the fast path, read back once.
        self._args_key: tuple[int, int] | None = None
        self._generation = 0  # counts the calibrations, rescalings and loads (see grid_key)
        self._scale_float: float | None = None
        self._zp_float: float | None = None
        self.method = self.observer = self.ptf = None
        if spec is not None:
            self.method = build_quantizer(spec.quantizer)
            self.observer = build_observer(spec.observer, spec, self.method, channel_axis if per_channel else None)
            if spec.power_of_two_factor:
                self.ptf = PowerOfTwoFactor(spec, self.method, channel_axis, self.observer)

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() == 1

    @property
    def static_grid(self) -> bool:
        """The calibrated ``scale`` / ``zero_point`` alone give the grid (no factor computed at run time):
        what a Q/DQ export can write down and what LSQ can learn a step for."""
        return self.spec is None or not self.spec.dynamic_token_scale

    @property
    def is_calibrated(self) -> bool:
        return self._ready

    def extra_repr(self) -> str:
        if self.spec is None:
            return "float"
        s = self.spec
        parts = [s.bit_type.name, s.quantizer, s.observer, s.calibration_mode]
        if s.power_of_two_factor:
            parts.append("ptf")
        if s.dynamic_token_scale:
            parts.append(f"token scale per {s.token_scale_group} channels" if s.token_scale_group else "token scale")
        if not self.enabled:
            parts.append("disabled")
        return ", ".join(parts)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        mode = self.state.mode
        if mode is QuantMode.QUANT:
            return self.quantize(x)
        if mode is QuantMode.CALIBRATE:
            self.observe(x)
        elif mode is QuantMode.RANGE:
            self.observe_range(x)
        return x

    # -- calibration -------------------------------------------------------------------------------
    def reset_observer(self) -> None:
        self._weight_seen = False
        if self.observer is not None:
            self.observer.reset()
        if self.ptf is not None:
            self.ptf.reset()

    def _statistics(self) -> list:
        """The observer and, with PTF, the factor search: what collects calibration statistics."""
        return [s for s in (self.observer, self.ptf) if s is not None]

    def running_extremes(self) -> list[Tensor]:
        """The running minima and maxima its statistics hold (non-finite data shows up in them)."""
        return [t for stats in self._statistics() for t in stats.running_extremes()]

    @property
    def needs_range(self) -> bool:
        """Whether this point keeps a histogram, made exact by a first range pass (QVit.observing_ranges)."""
        return self.enabled and any(stats.needs_range for stats in self._statistics())

    @torch.no_grad()
    def observe_range(self, x: Tensor) -> None:
        if self.is_weight and self._weight_seen:
            return
        self._weight_seen = self.is_weight
        for stats in self._statistics():
            stats.observe_range(x.detach())

    @torch.no_grad()
    def fix_range(self) -> None:
        for stats in self._statistics():
            stats.fix_range()
        self._weight_seen = False  # the counting pass observes the weight again

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        if self.is_weight and self.observer.has_data:
            return  # a weight does not change between calibration batches
        x = x.detach()
        self.observer.update(x)
        if self.ptf is not None:
            self.ptf.update(x)

    @torch.no_grad()
    def finalize(self) -> bool:
        """Turn the collected statistics into scale / zero point; False if this point saw no data."""
        if self.spec is None or not self.observer.has_data:
            if self.spec is not None:
                log.warning("quantizer %s saw no calibration data; it stays uncalibrated", self.name or "?")
            return False
        for stats in self._statistics():
            stats.synchronize()  # combine the processes' statistics (torchrun); nothing in one process
        scale, zero_point = self.ptf.channel_qparams() if self.ptf is not None else self.observer.compute_qparams()
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.calibrated.fill_(True)
        self._ready = True
        self._cache = self._args_key = self._wide = None
        self._generation += 1
        self.rounded = None  # chosen on the previous grid
        self.reset_observer()  # the statistics are no longer needed; free them
        return True

    @torch.no_grad()
    def rescale(self, ratio: float) -> None:
        """Multiply the calibrated scale by ``ratio``, keeping the zero point (the range becomes ``ratio * [lo, hi]``)."""
        self.scale.mul_(ratio)
        self._cache = self._args_key = self._wide = None  # inference-mode buffers carry no version to notice the change
        self._generation += 1

    @torch.no_grad()
    def set_rounded(self, value: Tensor | None) -> None:
        """Use ``value`` (already on this weight's grid) as the quantized weight instead of rounding to
        nearest; None goes back to rounding to nearest."""
        if not self.is_weight:
            raise RuntimeError(f"quantizer {self.name or '?'} is not a weight's: only weights keep a rounded value")
        self.rounded = None if value is None else value.detach().clone()
        self._cache = self._wide = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # The rounded weight is a buffer only where a rounding search set it: follow the file.
        key = prefix + "rounded"
        self.rounded = torch.empty_like(state_dict[key], device=self.scale.device) if key in state_dict else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = bool(self.calibrated)
        self._cache = self._args_key = self._wide = None
        self._generation += 1

    # -- quantization ------------------------------------------------------------------------------
    def broadcast(self, t: Tensor, x: Tensor) -> Tensor:
        if t.dim() == 0:
            return t
        axis = self.channel_axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = t.numel()
        return t.view(shape)

    def _refresh_args(self) -> None:
        # Read back after calibration or loading (both reset the key) or an in-place edit of the buffers.
        key = (_version(self.scale), _version(self.zero_point))
        if key == self._args_key:
            return
        self._scale_float = float(self.scale) if self.scale.dim() == 0 else None
        zp = self.zero_point.reshape(-1)
        # PTF and symmetric per-channel grids share one zero point: scalar clamp bounds are much faster.
        self._zp_float = float(zp[0]) if bool((zp == zp[0]).all()) else None
        self._args_key = key

    @property
    def grid_key(self) -> tuple[int, int, int]:
        """Changes whenever the grid (scale or zero point) may have: a key for what is derived from it."""
        return self._generation, _version(self.scale), _version(self.zero_point)

    @property
    def scale_value(self) -> float:
        """The per-tensor scale as a Python float (read from the device once per calibration)."""
        self._refresh_args()
        if self._scale_float is None:
            raise ValueError(f"quantizer {self.name or '?'} has per-channel scales")
        return self._scale_float

    @property
    def zero_point_value(self) -> float:
        """The per-tensor (or shared) zero point as a Python float (read from the device once per calibration)."""
        self._refresh_args()
        if self._zp_float is None:
            raise ValueError(f"quantizer {self.name or '?'} has per-channel zero points")
        return self._zp_float

    def fake_quant(self, x: Tensor) -> Tensor:
        """Quantize and dequantize ``x`` with the calibrated parameters (no mode checks); a weight with a
        rounded value (GPTQ) gives that value, which is ``x`` quantized by the rounding search."""
        if self.is_weight and self.rounded is not None:
            if self.rounded.shape != x.shape:
                raise RuntimeError(f"quantizer {self.name or '?'}: its rounded weight is {tuple(self.rounded.shape)}, got {tuple(x.shape)}")
            return self.rounded.to(x.dtype)
        self._refresh_args()
        scale = self._scale_float if self._scale_float is not None else self.broadcast(self.scale, x)
        zero_point = self._zp_float if self._zp_float is not None else self.broadcast(self.zero_point, x)
        return self.fake_quant_with(x, scale, zero_point)

    def fake_quant_with(self, x: Tensor, scale: Tensor | float, zero_point: Tensor | float) -> Tensor:
        """``x`` on this point's grid with the given (broadcastable) parameters: what the scale search
        scores its candidates with, so that it judges the grid the model will run."""
        if not self.static_grid:
            return token_scaled_fake_quant(x, scale, zero_point, self.spec.bit_type, self.spec.token_scale_group)
        return self.method.fake_quant(x, scale, zero_point, self.spec.bit_type)

    def as_dtype(self, value: Tensor, dtype: torch.dtype) -> Tensor:
        """This weight's quantized ``value`` (what :meth:`forward` returned) in ``dtype``: its codes times its
        scale computed in ``dtype``, so float64 holds the grid's levels exactly where float32 rounds them."""
        if not (self.is_weight and self.enabled and self._ready and self.method.uniform_levels):
            return value.to(dtype)
        key = (value.data_ptr(), _version(value), dtype)
        if self._wide is None or self._wide[0] != key:
            scale = self.broadcast(self.scale, value)
            self._wide = (key, torch.round(value / scale).to(dtype) * scale.to(dtype))
        return self._wide[1]

    def quantize(self, x: Tensor) -> Tensor:
        if not self._ready:
            raise RuntimeError(f"quantizer {self.name or '?'} is used before calibration: calibrate the model or load a calibrated state")
        if torch.is_grad_enabled() and x.requires_grad:
            # Straight-through estimator: quantized forward, identity backward.
            with torch.no_grad():
                noise = self.fake_quant(x) - x
            return x + noise
        if self.is_weight and not torch.is_grad_enabled():
            key = (x.data_ptr(), x.device, x.dtype, _version(x), _version(self.scale), _version(self.zero_point))
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self.fake_quant(x))
            return self._cache[1]
        return self.fake_quant(x)
