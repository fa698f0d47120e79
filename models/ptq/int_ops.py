"""Integer-only exponential and softmax (FQ-ViT, arXiv 2111.13824, Sec. 3.3; I-BERT, arXiv 2101.01321, Sec. 3.4).

FQ-ViT's log-int-softmax computes the softmax of the quantized attention scores with integer arithmetic
only and then quantizes the result to a log2 grid. The exponential is I-BERT's ``i-exp``: with the
scores as integers ``x_int`` of scale ``S`` (shifted so the row maximum is 0), write
``x = -z ln2 + r`` with ``r`` in (-ln2, 0]; then ``exp(x) = 2^-z exp(r)`` and ``exp(r)`` is the
second-order polynomial ``a (r + b)^2 + c`` evaluated on integers (a = 0.3585, b = 1.353, c = 0.344).

One change over I-BERT/FQ-ViT: with 8-bit scores ``S`` is coarse (0.1 to 0.3), and ``floor(ln2 / S)``
then misstates ln2 by up to ``S``, an error that compounds with every halving (7% per halving for
S = 0.16). We first move the integers to a grid ``2^k`` times finer (a left shift, still integer
arithmetic) so that ln2 spans at least 4096 steps (int32 still holds the polynomial); the remaining error is the polynomial's
(relative error <= 0.31% on (-ln2, 0]) plus at most ln2 / 4096 per halving.

Everything here runs on integer-valued float tensors with Python-float constants, so it fake-quantizes
on any device without a host round trip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

__all__ = ["IExpConstants", "int_exp", "int_softmax", "IEXP_COEFFS", "IEXP_MAX_ABS_ERROR", "IEXP_MAX_REL_ERROR"]

IEXP_COEFFS = (0.3585, 1.353, 0.344)  # a, b, c of I-BERT's exp approximation on (-ln2, 0]
# Error bounds of int_exp on any integer grid, checked by the tests (measured: 0.0022 and 0.45%):
IEXP_MAX_ABS_ERROR = 0.0025  # |i_exp(x) - exp(x)| for every x <= 0
IEXP_MAX_REL_ERROR = 0.005  # |i_exp(x) / exp(x) - 1| where exp(x) >= 2^-12
_LN2 = math.log(2.0)
_MIN_LN2_STEPS = 4096.0


@dataclass(frozen=True)
class IExpConstants:
    """The integers of i-exp for one input scale, computed once per calibration (Python floats)."""

    factor: float  # 2^k: left shift onto the finer grid
    ln2_int: float  # floor(ln2 / fine_scale)
    b_int: float  # floor(b / fine_scale)
    c_int: float  # floor(c / (a * fine_scale^2))
    exp_scale: float  # a * fine_scale^2, the scale of the result

    @classmethod
    def from_scale(cls, scale: float) -> "IExpConstants":
        a, b, c = IEXP_COEFFS
        # Smallest power-of-two refinement that makes ln2 span at least 4096 steps.
        factor = 2.0 ** max(0, math.ceil(math.log2(scale * _MIN_LN2_STEPS / _LN2)))
        fine = scale / factor
        return cls(factor, math.floor(_LN2 / fine), math.floor(b / fine), math.floor(c / (a * fine * fine)), a * fine * fine)


def int_exp(x_int: Tensor, constants: IExpConstants, max_halvings: int = 30) -> Tensor:
    """Integer-valued ``exp_int`` with ``exp(x_int * scale) ~= exp_int * constants.exp_scale``.

    ``x_int`` holds integers <= 0 (as floats) and is modified in place.
    """
    k = constants
    x = x_int.mul_(k.factor).clamp_(min=-max_halvings * k.ln2_int)  # left shift onto the finer grid
    z = x.div(-k.ln2_int).floor_()  # number of halvings, >= 0
    r = x.add_(z, alpha=k.ln2_int)  # in (-ln2_int, 0]
    poly = r.add_(k.b_int).square_().add_(k.c_int)  # a (r + b)^2 + c in units of a * fine_scale^2
    return poly.mul_(z.neg_().exp2_()).floor_()  # shift right by z


def int_softmax(
    x: Tensor, scale: float, constants: IExpConstants | None = None, dim: int = -1, inplace: bool = False
) -> Tensor:
    """Softmax of the quantized scores ``x`` (multiples of ``scale``) through :func:`int_exp`.

    Returns the probabilities ``exp_int / sum(exp_int)``; the caller quantizes them (log2 or uniform),
    which in integer hardware is a division of two integers followed by a rounding. ``inplace`` reuses
    ``x`` (a temporary the caller owns) instead of allocating.
    """
    row_max = x.amax(dim=dim, keepdim=True)
    x_int = (x.sub_(row_max) if inplace else x - row_max).div_(scale).round_()
    exp_int = int_exp(x_int, constants or IExpConstants.from_scale(scale))
    return exp_int.div_(exp_int.sum(dim=dim, keepdim=True))
