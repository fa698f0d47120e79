"""Integer-only softmax: i-exp, integer normalisation, and uniform or log2 attention codes.

FQ-ViT (arXiv 2111.13824, Sec. 3.3) computes the softmax of the 8-bit attention scores in integers and
quantizes the result on a log2 grid (log-int-softmax), so that attention x V becomes bit shifts; its
8-bit variant keeps a uniform grid. The fake-quant model (:class:`~models.ptq.layers.QuantSoftmax`)
calls :meth:`IntSoftmax.codes` itself, so the program and its simulation give the same codes.

**i-exp** (I-BERT, arXiv 2101.01321, Sec. 3.4). With the scores as integers ``d <= 0`` of scale ``S``
(each row's maximum subtracted), write ``x = -z ln2 + r`` with ``r`` in ``(-ln2, 0]``: ``exp(x) =
2^-z exp(r)``, and ``exp(r) ~= a (r + b)^2 + c`` (a = 0.3585, b = 1.353, c = 0.344). With 8-bit scores
``S`` is coarse (0.1 to 0.3) and ``floor(ln2 / S)`` would misstate ln2 by up to ``S`` per halving
(7% for S = 0.16), so the codes are first shifted onto a grid ``2^k`` times finer on which ln2 spans
``[4096, 8192)`` steps (``k < 0``, a right shift, for very fine scores). Then

    x = clamp(d * 2^k, -30 ln2_int),  z = floor(-x / ln2_int),  r = x + z ln2_int,
    exp_int = floor(((r + b_int)^2 + c_int) / 2^z)

all in int32 (the polynomial is below 2^29). Error of ``exp_int * a * fine^2`` against ``exp(d S)``:
at most 0.0025 absolute, 0.5% relative where ``exp >= 2^-12`` (the polynomial's 0.31% plus one fine
step per halving); :data:`IEXP_MAX_ABS_ERROR`, :data:`IEXP_MAX_REL_ERROR`, checked by the tests.

**Normalisation.** ``e = exp_int >> rsh`` keeps 15 bits (``rsh`` fixed per softmax by its largest
value ``exp_int(0)``), ``sum`` is the row's sum of ``e`` (int32 for rows below 2^16 tokens).

* Uniform codes (scale ``s_a``, stored zero point ``z_a``): ``code = floor((e * M + sum * H) / (sum *
  2^g))`` with ``M = rint(2^g / s_a)``, ``H = rint((z_a + 1/2) 2^g)``: round half up of ``e / sum / s_a
  + z_a`` up to ``e``'s 15 bits and ``M``'s rounding (relative ``2^-(g+1) s_a``), clamped to the grid.
  PTQ4ViT's unsigned twin grid is two such normalisations, onto its fine and its coarse step.
* log2 codes (FQ-ViT's LIS; scale ``2^ea``, ``2^bits - 1`` meaning 0): ``code = floor(t + 1/2)`` with
  ``t = -log2(p / 2^ea) = log2(sum) + rsh + z - log2(poly) + ea`` (``exp_int ~= poly / 2^z``), each log2
  in 16 fractional bits from a cubic fitted on the one octave its argument spans (error below
  0.0015, :data:`LOG2_MAX_ERROR`): ``floor(t + 1/2)`` is the nearest level in the log domain, as the
  fake-quant log2 grid rounds, up to that error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.integer.isqrt import bit_length

__all__ = ["IEXP_COEFFS", "IEXP_MAX_ABS_ERROR", "IEXP_MAX_REL_ERROR", "LOG2_FRACTION", "LOG2_MAX_ERROR", "IExp", "IntSoftmax", "Log2Fit", "Normaliser"]

IEXP_COEFFS = (0.3585, 1.353, 0.344)  # a, b, c of I-BERT's exp approximation on (-ln2, 0]
# Error bounds of the i-exp on any score grid, checked by the tests (measured: 0.0022 and 0.45%):
IEXP_MAX_ABS_ERROR = 0.0025  # |exp_int * a fine^2 - exp(d S)| for every d <= 0
IEXP_MAX_REL_ERROR = 0.005  # relative, where exp(d S) >= 2^-12
MAX_HALVINGS = 30
_LN2 = math.log(2.0)
_LN2_STEPS = 4096  # ln2 spans [4096, 8192) fine steps
NORM_BITS = 15  # e = exp_int >> rsh keeps this many bits
LOG2_FRACTION = 16  # fractional bits of the fixed-point log2
LOG2_MAX_ERROR = 0.0015  # |fitted log2 - log2| on an octave, in log2 units (measured 0.0013)


@dataclass(frozen=True)
class IExp:
    """The integers of i-exp for one score scale (:meth:`for_scale`)."""

    shift: int  # k: d * 2^k (k >= 0) or floor(d / 2^-k) onto the fine grid
    ln2: int  # floor(ln2 / fine)
    b: int  # floor(b / fine)
    c: int  # floor(c / (a fine^2))
    value_scale: float  # a fine^2: exp(d S) ~= exp_int * value_scale

    @classmethod
    def for_scale(cls, scale: float) -> "IExp":
        a, b, c = IEXP_COEFFS
        k = math.ceil(math.log2(scale * _LN2_STEPS / _LN2))
        fine = scale / 2.0**k
        return cls(k, math.floor(_LN2 / fine), math.floor(b / fine), math.floor(c / (a * fine * fine)), a * fine * fine)

    @property
    def peak(self) -> int:
        """``exp_int(0)``, the largest value."""
        return self.b * self.b + self.c

    @property
    def norm_shift(self) -> int:
        """``rsh``: ``exp_int >> rsh`` keeps ``NORM_BITS`` bits of the largest value."""
        return max(0, self.peak.bit_length() - NORM_BITS)

    def fine(self, d: Tensor) -> Tensor:
        return torch.bitwise_left_shift(d, self.shift) if self.shift >= 0 else torch.bitwise_right_shift(d, -self.shift)

    def __call__(self, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(exp_int, z, poly)`` of int64 ``d <= 0``: ``exp_int = poly >> z``."""
        x = self.fine(d).clamp_(min=-MAX_HALVINGS * self.ln2)
        z = torch.div(-x, self.ln2, rounding_mode="floor")
        r = x + z * self.ln2
        poly = (r + self.b).square_().add_(self.c)
        return torch.bitwise_right_shift(poly, z), z, poly


@dataclass(frozen=True)
class Log2Fit:
    """``log2(v)`` in ``LOG2_FRACTION`` fractional bits for ``v`` in ``[lo, hi]`` (at most an octave): a
    cubic in ``w = (v >> shift) - base`` (``w < 2^16``), by Horner with a floor after each product:
    ``p = c3; p = floor(p w / 2^16) + c_k`` for ``k = 2, 1, 0``."""

    shift: int
    base: int
    coeffs: tuple[int, int, int, int]  # c3, c2, c1, c0: the cubic's coefficients times 2^(16 + 16 k) ... 2^16

    @classmethod
    def fit(cls, lo: int, hi: int) -> "Log2Fit":
        shift = max(0, int(hi).bit_length() - 16)
        base = lo >> shift
        w = np.linspace(0.0, (hi >> shift) - base, 4097)
        target = np.log2(w + base) + shift
        c3, c2, c1, c0 = np.polyfit(w, target, 3)
        one = 2.0**LOG2_FRACTION
        scaled = (c3 * one * 2.0**48, c2 * one * 2.0**32, c1 * one * 2.0**16, c0 * one)
        return cls(shift, base, tuple(int(np.rint(c)) for c in scaled))

    def __call__(self, v: Tensor) -> Tensor:
        w = torch.bitwise_right_shift(v, self.shift) - self.base
        p = torch.full_like(w, self.coeffs[0])
        for c in self.coeffs[1:]:
            p = torch.bitwise_right_shift(p * w, 16) + c
        return p


MANTISSA_LOG2 = Log2Fit.fit(2**15, 2**16 - 1)  # log2 of m in [2^15, 2^16)


def log2_fixed(v: Tensor) -> Tensor:
    """``log2(v)`` in ``LOG2_FRACTION`` fractional bits for positive int64 ``v`` of any size: the bit
    length, and the cubic on the 16-bit mantissa."""
    n = bit_length(v)
    m = torch.bitwise_right_shift(torch.bitwise_left_shift(v, (16 - n).clamp(min=0)), (n - 16).clamp(min=0))
    return (n - 16) * 2**LOG2_FRACTION + MANTISSA_LOG2(m)


@dataclass(frozen=True)
class Normaliser:
    """``floor((e * mul + sum * half) / (sum * 2^g))``: round half up of ``e / sum / step + zero``."""

    mul: int
    half: int
    g: int

    @classmethod
    def onto(cls, step: float, zero: int = 0) -> "Normaliser":
        # 2^g / step below 2^15 (e * mul < 2^30), and (zero + 1/2) 2^g an integer.
        g = max(1, 14 - math.floor(math.log2(1.0 / step)))
        return cls(int(round(2.0**g / step)), (2 * zero + 1) << (g - 1), g)

    def __call__(self, e: Tensor, total: Tensor) -> Tensor:
        return torch.div(e * self.mul + total * self.half, total * 2**self.g, rounding_mode="floor")


@dataclass(frozen=True)
class IntSoftmax:
    """The integer softmax of one attention: i-exp of its scores, normalised to its output grid.

    ``kind`` is ``uniform`` (codes ``0 .. hi``, stored zero point in ``norm``), ``log2`` (codes ``0 ..
    hi``, ``hi`` meaning 0; scale ``2^exponent``) or ``twin`` (PTQ4ViT's unsigned twin grid: codes ``0
    .. top`` on the fine step, ``top + 1 + k`` for ``k`` on the coarse step; ``fine`` normalises onto
    the fine step, ``norm`` onto the coarse one).
    """

    iexp: IExp
    rsh: int
    kind: str
    hi: int
    norm: Normaliser | None = None
    fine: Normaliser | None = None
    top: int = 0
    # log2
    exponent: int = 0
    poly_log2: Log2Fit | None = None

    @classmethod
    def uniform(cls, score_scale: float, out_scale: float, zero: int, hi: int) -> "IntSoftmax":
        iexp = IExp.for_scale(score_scale)
        return cls(iexp, iexp.norm_shift, "uniform", hi, norm=Normaliser.onto(out_scale, zero))

    @classmethod
    def twin(cls, score_scale: float, coarse: float, fine: float, top: int) -> "IntSoftmax":
        """Codes ``f`` (``f <= top``, the fine step) or ``top + 1 + k`` (``k <= top``, the coarse step):
        the fine code where it fits, as the twin grid rounds (models/ptq/quantizers.py)."""
        iexp = IExp.for_scale(score_scale)
        return cls(iexp, iexp.norm_shift, "twin", 2 * top + 1, norm=Normaliser.onto(coarse), fine=Normaliser.onto(fine), top=top)

    @classmethod
    def log2(cls, score_scale: float, exponent: int, hi: int) -> "IntSoftmax":
        iexp = IExp.for_scale(score_scale)
        low = (iexp.b - iexp.ln2 + 1) ** 2 + iexp.c  # poly at the smallest r
        return cls(iexp, iexp.norm_shift, "log2", hi, exponent=exponent, poly_log2=Log2Fit.fit(low, iexp.peak))

    def codes(self, d: Tensor) -> Tensor:
        """Stored codes (int64) of the scores ``d`` (int64, each row's maximum 0, masked entries far below)."""
        exp_int, z, poly = self.iexp(d)
        e = torch.bitwise_right_shift(exp_int, self.rsh)
        total = e.sum(dim=-1, keepdim=True)
        if self.kind == "uniform":
            return self.norm(e, total).clamp_(0, self.hi)
        if self.kind == "twin":
            fine = self.fine(e, total)
            return torch.where(fine <= self.top, fine, self.top + 1 + self.norm(e, total).clamp_(0, self.top))
        one = 2**LOG2_FRACTION
        t = log2_fixed(total) - self.poly_log2(poly) + (z + self.rsh + self.exponent) * one
        return torch.bitwise_right_shift(t + one // 2, LOG2_FRACTION).clamp_(0, self.hi)
