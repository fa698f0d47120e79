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

Everything here runs on integer-valued float tensors, so it fake-quantizes on any device.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["int_exp", "int_softmax", "IEXP_COEFFS", "IEXP_MAX_ABS_ERROR", "IEXP_MAX_REL_ERROR"]

IEXP_COEFFS = (0.3585, 1.353, 0.344)  # a, b, c of I-BERT's exp approximation on (-ln2, 0]
# Error bounds of int_exp on any integer grid, checked by the tests (measured: 0.0022 and 0.45%):
IEXP_MAX_ABS_ERROR = 0.0025  # |i_exp(x) - exp(x)| for every x <= 0
IEXP_MAX_REL_ERROR = 0.005  # |i_exp(x) / exp(x) - 1| where exp(x) >= 2^-12
_LN2 = math.log(2.0)
_MIN_LN2_STEPS = 4096.0


def _refine(scale: Tensor) -> Tensor:
    """Power-of-two factor 2^k that makes ln2 span at least 4096 steps of ``scale / 2^k``."""
    k = torch.ceil(torch.log2(scale * (_MIN_LN2_STEPS / _LN2))).clamp_(min=0.0)
    return torch.exp2(k)


def int_exp(x_int: Tensor, scale: Tensor, max_halvings: int = 30) -> tuple[Tensor, Tensor]:
    """``exp(x_int * scale) ~= exp_int * exp_scale`` for integer-valued ``x_int <= 0``.

    Returns the integer-valued ``exp_int`` (float tensor) and the 0-dim ``exp_scale``. ``x_int`` is
    modified in place.
    """
    a, b, c = IEXP_COEFFS
    factor = _refine(scale)
    fine_scale = scale / factor
    x = x_int.mul_(factor)  # left shift onto the finer grid
    ln2_int = torch.floor(_LN2 / fine_scale)
    b_int = torch.floor(b / fine_scale)
    c_int = torch.floor(c / (a * fine_scale * fine_scale))
    x.clamp_(min=-max_halvings * ln2_int)
    z = torch.div(x, ln2_int).neg_().floor_()  # number of halvings, >= 0 (floor(-x / ln2_int))
    r = x.addcmul_(z, ln2_int)  # in (-ln2_int, 0]
    poly = r.add_(b_int).square_().add_(c_int)  # a (r + b)^2 + c in units of a * fine_scale^2
    exp_int = poly.mul_(z.neg_().exp2_()).floor_()  # shift right by z
    return exp_int, a * fine_scale * fine_scale


def int_softmax(x: Tensor, scale: Tensor, dim: int = -1) -> Tensor:
    """Softmax of the quantized scores ``x`` (multiples of ``scale``) through :func:`int_exp`.

    Returns the probabilities ``exp_int / sum(exp_int)``; the caller quantizes them (log2 or uniform),
    which in integer hardware is a division of two integers followed by a rounding.
    """
    x_int = (x - x.amax(dim=dim, keepdim=True)).div_(scale).round_()
    exp_int, _ = int_exp(x_int, scale)
    return exp_int.div_(exp_int.sum(dim=dim, keepdim=True))
