"""Quantizer methods: turn a calibrated range into (scale, zero point) and fake-quantize with them.

* ``uniform`` - FQ-ViT (arXiv 2111.13824) Sec. 3.1, Eq. 1: ``q = clamp(round(x / s) + zp, qmin, qmax)``,
  dequantized as ``(q - zp) * s``. Symmetric grids are signed with ``zp = 0``; the others are unsigned
  with the zero point chosen so that 0 is exactly representable.
* ``log2`` - FQ-ViT Sec. 3.3, Eq. 12: ``x_hat = s * 2^-q`` with ``q = round(-log2(|x| / s))``. The scale
  is a power of two, so dequantization is a bit shift; with ``b`` bits the codes ``0 .. 2^b - 2`` are
  exponents and the top code stands for 0 (a signed grid spends one bit on the sign).
* ``log_sqrt2`` - RepQ-ViT (arXiv 2212.08254) Sec. 4.3: the log base sqrt(2), ``x_hat = s * 2^(-q/2)``
  with ``q = round(-2 * log2(|x| / s))``: twice the levels of log2 near the attention map's large
  values, where log2 leaves its largest gap (1 to 1/2). ``2^(-q/2)`` is a shift by ``floor(q/2)`` and,
  for odd q, one multiplication by the constant 1/sqrt(2), so integer hardware still needs no table.
  The scale is the calibrated maximum itself (it folds into the next matmul's requantization).
* ``twin_uniform`` - PTQ4ViT (arXiv 2111.12293) Sec. 3.1, twin uniform quantization for post-GELU
  values: one signed ``b``-bit code whose sign picks the region, ``c * s`` for ``c >= 0`` and
  ``c * s * 2^-m`` for ``c < 0``. GELU's outputs are a long positive tail and a dense negative sliver
  in [-0.17, 0); one uniform grid spans both and gives the sliver a level or two, the twin grid gives it
  half the codes at a step ``2^m`` times finer (a shift away from the positive one, so an integer
  kernel aligns the two regions with one bit shift). ``s`` is the positive half-range over
  ``2^(b-1) - 1``; ``m`` the largest integer whose negative range ``2^(b-1) * s * 2^-m`` still covers
  the calibrated minimum. There is no zero point: the ``zero_point`` slot carries ``m``.
  On an unsigned grid (``symmetric: false``) it is PTQ4ViT's post-softmax twin: both regions are
  non-negative and the code's top bit picks one - ``c * s * 2^-m`` (fine) or ``c * s`` (coarse), ``c`` in
  ``[0, 2^(b-1))``. An attention map is mostly values near ``1 / tokens`` with a few peaks up to ~1;
  one uniform grid over ``[0, max]`` rounds most of the small values to a level or two, the twin grid
  gives them a step ``2^m`` times finer and keeps the peaks on the coarse grid. ``s`` is the calibrated
  maximum over ``2^(b-1) - 1``; the data gives no second range to derive ``m`` from, so it is the fixed
  ``POSITIVE_SHIFT`` (at most ``b - 1``, so the coarse levels continue the fine region's).

All work per tensor and per channel: ``scale`` / ``zero_point`` are Python floats (the fast path,
no device synchronisation) or tensors already shaped to broadcast against ``x``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quant_config import BitTypeConfig

__all__ = ["uniform_fake_quant", "QuantMethod", "UniformQuantizer", "Log2Quantizer", "LogSqrt2Quantizer", "TwinUniformQuantizer", "QUANTIZERS", "build_quantizer", "SCALE_EPS"]

Number = float | Tensor

# Smallest scale allowed: an all-zero tensor still gets a finite, positive step.
SCALE_EPS = float(torch.finfo(torch.float32).eps)


class QuantMethod:
    """Interface shared by the quantizer methods, with what each can do: callers (profiler, scale search,
    export) ask these, never the class."""

    name = ""
    log_domain = False  # levels are s * 2^(-q * step): error and saturation are measured in log2 units
    power_of_two_scale = False  # the scale must stay a power of two (a bit shift in integer kernels)
    qdq_exportable = False  # ONNX QuantizeLinear/DequantizeLinear express it exactly (8-bit uniform)
    learnable_rounding = False  # levels (q - zp) * s with integer q: a weight may round down or up by a learned choice
    learnable_scale = False  # (clamp(round(x / s) + zp, qmin, qmax) - zp) * s: s can learn through straight-through rounding (LSQ)
    twin_regions = False  # two uniform grids, s and s * 2^-m (m in the zero-point slot), chosen by the code
    uniform_levels = False  # levels (q - zp) * s, q integer: an integer program stores q as it is

    def qparams(self, lo: Tensor, hi: Tensor, bit_type: BitTypeConfig) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def fake_quant(self, x: Tensor, scale: Number, zero_point: Number, bit_type: BitTypeConfig) -> Tensor:
        raise NotImplementedError

    def grid_bounds(self, scale: Number, zero_point: Number, bit_type: BitTypeConfig, margin: float = 0.0) -> tuple[Number, Number]:
        """The grid's lowest and highest level, each moved ``margin`` of its own step outwards (uniform grids)."""
        return (bit_type.qmin - zero_point - margin) * scale, (bit_type.qmax - zero_point + margin) * scale

    def level_step(self, scale: Tensor, zero_point: Tensor) -> Tensor:
        """The step every level is a whole multiple of (uniform grids: the scale)."""
        return scale


def uniform_fake_quant(x: Tensor, scale: Number, zero_point: Number, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s``: divided by the scale, as ONNX's QuantizeLinear
    does (a multiply by ``1 / s``, as torch's fake_quantize ops do, sends some half-step values to the
    neighbouring code). Since zp is an integer this is ``clamp(round(x/s), qmin - zp, qmax - zp) * s``: one
    allocation and four in-place passes; with float bounds ~40x faster on CPU than
    torch.fake_quantize_per_tensor_affine, and 6x faster than with tensor bounds."""
    return x.div(scale).round_().clamp_(qmin - zero_point, qmax - zero_point).mul_(scale)


class UniformQuantizer(QuantMethod):
    name = "uniform"
    qdq_exportable = True
    learnable_rounding = True
    learnable_scale = True
    uniform_levels = True

    def qparams(self, lo: Tensor, hi: Tensor, bit_type: BitTypeConfig) -> tuple[Tensor, Tensor]:
        lo, hi = lo.float(), hi.float()
        if bit_type.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = (amax / bit_type.qmax).clamp_min(SCALE_EPS)
            return scale, torch.zeros_like(scale)
        # The range must contain 0 so that zero padding and exact zeros stay exact.
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / (bit_type.qmax - bit_type.qmin)).clamp_min(SCALE_EPS)
        zero_point = (bit_type.qmin - torch.round(lo / scale)).clamp(bit_type.qmin, bit_type.qmax)
        return scale, zero_point

    def fake_quant(self, x: Tensor, scale: Number, zero_point: Number, bit_type: BitTypeConfig) -> Tensor:
        return uniform_fake_quant(x, scale, zero_point, bit_type.qmin, bit_type.qmax)


# Rounding |x| to the nearest power of two in the log domain, on the float32 bit pattern: with mantissa
# field M, log2 rounds up iff M >= (sqrt(2) - 1) * 2^23 = 3474675.7; adding 2^23 - 3474676 carries into the
# exponent exactly then, and clearing the mantissa leaves the power of two.
_ROUND_LOG2_OFFSET = 2**23 - 3474676
_EXPONENT_MASK = -(2**23)  # sign and exponent bits of an int32 view


class Log2Quantizer(QuantMethod):
    name = "log2"
    log_domain = True
    power_of_two_scale = True
    step = 1.0  # distance of neighbouring levels in log2 units

    @staticmethod
    def max_code(bit_type: BitTypeConfig) -> int:
        """Largest exponent code; the code above it encodes zero."""
        magnitude_bits = bit_type.bits - 1 if bit_type.symmetric else bit_type.bits
        return 2**magnitude_bits - 2

    def qparams(self, lo: Tensor, hi: Tensor, bit_type: BitTypeConfig) -> tuple[Tensor, Tensor]:
        amax = torch.maximum(lo.float().abs(), hi.float().abs()).clamp_min(SCALE_EPS)
        scale = torch.exp2(torch.ceil(torch.log2(amax)))
        return scale, torch.zeros_like(scale)

    def fake_quant(self, x: Tensor, scale: Number, zero_point: Number, bit_type: BitTypeConfig) -> Tensor:
        # The bit trick needs every code to be a normal float32 (2^-125 and up), and whole powers of two.
        if self.step == 1.0 and x.dtype == torch.float32 and not bit_type.symmetric and self.max_code(bit_type) <= 125:
            return self._fake_quant_float32(x, scale, bit_type)
        magnitude = x.abs() if bit_type.symmetric else x.clamp(min=0.0)
        code = magnitude.div_(scale).log2_().div_(-self.step).round_().clamp_(min=0.0)  # |x| = 0 gives +inf
        is_zero = code > self.max_code(bit_type)
        out = code.mul_(-self.step).exp2_().masked_fill_(is_zero, 0.0).mul_(scale)
        return out.mul_(torch.sign(x)) if bit_type.symmetric else out

    def _fake_quant_float32(self, x: Tensor, scale: Number, bit_type: BitTypeConfig) -> Tensor:
        """Same result as the generic path for unsigned grids, without log2/exp2 (the softmax hot path)."""
        y = x.div(scale).clamp_(0.0, 1.0)
        # Values that round below the smallest code 2^-max_code become 0: the rounding boundary is
        # 2^-(max_code + 1) with mantissa 3474676; keep everything from there up.
        boundary = torch.tensor([((126 - self.max_code(bit_type)) << 23) + 3474676 - 1], dtype=torch.int32)
        F.threshold_(y, float(boundary.view(torch.float32)), 0.0)
        y.view(torch.int32).add_(_ROUND_LOG2_OFFSET).bitwise_and_(_EXPONENT_MASK)
        return y.mul_(scale)


class LogSqrt2Quantizer(Log2Quantizer):
    name = "log_sqrt2"
    power_of_two_scale = False  # the calibrated maximum itself
    step = 0.5

    def qparams(self, lo: Tensor, hi: Tensor, bit_type: BitTypeConfig) -> tuple[Tensor, Tensor]:
        scale = torch.maximum(lo.float().abs(), hi.float().abs()).clamp_min(SCALE_EPS)
        return scale, torch.zeros_like(scale)


class TwinUniformQuantizer(QuantMethod):
    name = "twin_uniform"
    twin_regions = True
    MAX_SHIFT = 24  # |m| bound: a tensor with no negative values gets the finest negative step
    # Unsigned form: the fine region's step is 2^-m of the coarse one. On the held-out calibration images
    # (DeiT-tiny, fqvit_plus_w8a8's attention map) m = 3, 4, 5, 6 gave logit cosines within 0.0002 of each
    # other (5 and 6 the best).
    POSITIVE_SHIFT = 5

    @staticmethod
    def region_top(bit_type: BitTypeConfig) -> int:
        """Each region's largest code magnitude: a region has half of the ``2^b`` codes."""
        return 2 ** (bit_type.bits - 1) - 1

    def qparams(self, lo: Tensor, hi: Tensor, bit_type: BitTypeConfig) -> tuple[Tensor, Tensor]:
        top = self.region_top(bit_type)
        scale = (hi.float().clamp(min=0.0) / top).clamp_min(SCALE_EPS)
        if not bit_type.symmetric:
            return scale, torch.full_like(scale, float(min(self.POSITIVE_SHIFT, bit_type.bits - 1)))
        neg = (-lo.float()).clamp(min=SCALE_EPS)
        # Largest m with 2^(b-1) * scale * 2^-m >= |lo|.
        shift = torch.floor(torch.log2((top + 1) * scale / neg)).clamp_(-self.MAX_SHIFT, self.MAX_SHIFT)
        return scale, shift

    @staticmethod
    def fine_step(scale: Number, shift: Number) -> Number:
        """The fine region's step ``scale * 2^-m`` (the negative values, or the unsigned form's low
        region); ``m`` is carried in the zero-point slot."""
        return scale * 2.0 ** (-shift) if isinstance(shift, float) else scale * torch.exp2(-shift)

    def fake_quant(self, x: Tensor, scale: Number, zero_point: Number, bit_type: BitTypeConfig) -> Tensor:
        fine_scale = self.fine_step(scale, zero_point)
        top = self.region_top(bit_type)
        if not bit_type.symmetric:
            # Nearest level of the union: the fine grid up to its last level, the coarse one beyond (with
            # m <= b - 1 the coarse levels continue the fine ones, so this is round-to-nearest).
            fine = x.div(fine_scale).round_().clamp_(min=0.0)
            coarse = x.div(scale).round_().clamp_(0.0, top).mul_(scale)
            return torch.where(fine <= top, fine.mul_(fine_scale), coarse)
        # Each region's expression is exactly 0 on the other's values, so their sum is the twin grid.
        positive = x.div(scale).round_().clamp_(0.0, top).mul_(scale)
        return positive.add_(x.div(fine_scale).round_().clamp_(bit_type.qmin, 0.0).mul_(fine_scale))

    def grid_bounds(self, scale: Number, zero_point: Number, bit_type: BitTypeConfig, margin: float = 0.0) -> tuple[Number, Number]:
        lowest = bit_type.qmin if bit_type.symmetric else 0
        return (lowest - margin) * self.fine_step(scale, zero_point), (self.region_top(bit_type) + margin) * scale

    def level_step(self, scale: Tensor, zero_point: Tensor) -> Tensor:
        return torch.minimum(scale, self.fine_step(scale, zero_point))


QUANTIZERS: dict[str, type[QuantMethod]] = {
    "uniform": UniformQuantizer,
    "log2": Log2Quantizer,
    "log_sqrt2": LogSqrt2Quantizer,
    "twin_uniform": TwinUniformQuantizer,
}


def build_quantizer(name: str) -> QuantMethod:
    """Instantiate a quantizer method by its registry name."""
    try:
        return QUANTIZERS[name]()
    except KeyError:
        raise ValueError(f"unknown quantizer {name!r}; valid: {', '.join(sorted(QUANTIZERS))}") from None
