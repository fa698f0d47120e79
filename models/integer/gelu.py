"""Integer GELU: a lookup table on 12-bit codes of fc1's output, whose entries are fc2's input codes.

The integer program (FQ-ViT, arXiv 2111.13824, every operation in integers) requantizes fc1's int32
accumulator onto an index grid ``x_i = lo + i * step``, ``i = 0 .. 4095``, spanning ``[lo, hi]`` with
``lo = -5`` (``|GELU(x)| < 1.5e-6`` below it) and ``hi`` one step above fc2's largest input level
(beyond it fc2's quantizer saturates whatever GELU gives). Table entry ``i`` is fc2's stored input code
of ``GELU(x_i)`` (float64 GELU, fc2's own quantizer): GELU and fc2's quantization are one gather.
The grid needs no calibration: it follows fc2's.

Error: the index rounds ``x`` to the nearest ``x_i`` (round half up), so before fc2's rounding
``|GELU(x_i) - GELU(x)| <= 1.13 * step / 2`` (GELU's slope is at most 1.129) for ``x`` in ``[lo, hi]``;
below ``lo`` at most 1.5e-6. With fc2's 8-bit grid over ~10 units, ``step`` is ~0.004, a tenth of
fc2's step. The fake-quant model (:class:`~models.ptq.layers.SmoothedGELU` with the recipe's
``integer_gelu``) quantizes fc1's output onto the same index grid, so it rounds where the program does.

Why a table (chosen on held-out calibration images; docs/integer.md has the measurements): as faithful
as float GELU and an integer polynomial, and one gather that also performs fc2's quantization, where
the polynomial takes about twenty integer passes; 4 KB a layer fits an NPU or a microcontroller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["INDEX_BITS", "LOW", "MAX_SLOPE", "GeluTable"]

LOW = -5.0
INDEX_BITS = 12
MAX_SLOPE = 1.129  # max GELU'(x), at x = 1.414


@dataclass(frozen=True)
class GeluTable:
    """The index grid ``lo + i * step``, ``i < size``, of one MLP's GELU table."""

    lo: float
    step: float
    size: int

    @classmethod
    def up_to(cls, hi: float, bits: int = INDEX_BITS) -> "GeluTable":
        """The grid from :data:`LOW` to ``hi`` (fc2's largest level plus a step) in ``2^bits`` codes."""
        size = 2**bits
        return cls(LOW, (max(hi, LOW + 1.0) - LOW) / (size - 1), size)

    def index(self, x: Tensor) -> Tensor:
        """The nearest grid point of each float ``x`` (clamped to the grid), as int64."""
        return torch.floor((x - self.lo) / self.step + 0.5).clamp_(0, self.size - 1).to(torch.int64)

    def values(self, index: Tensor) -> Tensor:
        """``GELU(lo + i * step)`` in float64: what the table's entries quantize."""
        return F.gelu(self.lo + index.to(torch.float64) * self.step)

    def lookup(self, x: Tensor) -> Tensor:
        """GELU at each float ``x``'s grid point, in float64, gathered from the ``size`` values the program's
        table is built from (one GELU per entry, not per element of ``x``)."""
        return self.values(torch.arange(self.size, device=x.device))[self.index(x)]

    def error_bound(self) -> float:
        """``|GELU(x_i) - GELU(x)|`` for any ``x`` in ``[lo, hi]`` rounded to its grid point ``x_i``."""
        return MAX_SLOPE * self.step / 2 + math.ulp(1.0)
