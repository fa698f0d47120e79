"""Requantization by dyadic numbers: a real multiplier as an integer and a right shift.

Integer-only inference rescales an int32 accumulator onto the next tensor's grid with ``m ~= M / 2^sh``
(gemmlowp / TFLite's quantized multiplier; I-BERT's "dyadic numbers", arXiv 2101.01321, Sec. 3.1;
FQ-ViT, arXiv 2111.13824, Sec. 3.1). One operation covers every such step of the program, with any
number of terms on a common grid (a residual addition is two):

    y = clamp( floor( (sum_i M_i * x_i + R) / 2^sh ), lo, hi )

Rounding: ``R`` carries ``+ 1/2`` (``R = rint((r + 1/2) * 2^sh)``), so with ``M_i = rint(m_i * 2^sh)``
the result is ``floor(t + 1/2 + delta)`` for the real target ``t = sum_i m_i x_i + r``: round half up,
with ``|delta| <= (sum_i |x_i| + 1) / 2^(sh + 1)`` (each of ``M_i`` and ``R`` is off by at most 1/2).
The division by ``2^sh`` is a floor (an arithmetic right shift). Zero points are folded into ``R``
(``x_i`` are the stored codes), so every term is one multiply-add.

The products are exact in int64: the lowering picks ``sh`` so that every ``|M_i x_i|`` and their sum stay
below :data:`INT64_BOUND` for the inputs' ranges (:meth:`models.integer.builder.Builder.requant`).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from models.integer import IntegerUnsupported

__all__ = ["INT64_BOUND", "fixed_point", "requantize"]

# Every intermediate of the program stays below this in magnitude (int64 with one bit to spare).
INT64_BOUND = 2**62


def fixed_point(values: np.ndarray | float, sh: int) -> np.ndarray:
    """``rint(values * 2^sh)`` as int64 (round half to even; exact for |values * 2^sh| < 2^53)."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * 2.0**sh)
    if not np.all(np.abs(scaled) < INT64_BOUND):
        raise IntegerUnsupported(f"a constant scaled by 2^{sh} exceeds the int64 range of the program")
    return scaled.astype(np.int64)


def requantize(terms: Sequence[tuple[Tensor, Tensor]], offset: Tensor, shift: int, lo: int, hi: int) -> Tensor:
    """``clamp(floor((sum M * x + offset) / 2^shift), lo, hi)`` in int64: ``terms`` are ``(x, M)`` pairs of
    integer tensors that broadcast against each other, ``offset`` is ``R``."""
    acc = offset.to(torch.int64)
    for x, m in terms:
        acc = acc + x.to(torch.int64) * m.to(torch.int64)
    return torch.bitwise_right_shift(acc, shift).clamp_(lo, hi)
