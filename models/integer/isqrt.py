"""Integer square root for the integer LayerNorm (FQ-ViT, arXiv 2111.13824, Sec. 3.2; I-BERT's
integer square root, arXiv 2101.01321, Algorithm 4).

``isqrt(D) = floor(sqrt(D))`` exactly, for every ``0 <= D < 2^62``, with int64 operations only:

1. ``n = bit_length(D)`` by a binary search over the shifts 32, 16, 8, 4, 2, 1 (six compare-and-adds);
2. start at ``x0 = 2^ceil(n / 2)``, which lies in ``[sqrt(D), 2 sqrt(D)]``;
3. six Newton steps (on ``max(D, 1)``, so that no step divides by 0) ``x <- floor((x + floor(D / x)) / 2)``: from above, the relative error falls as
   ``e -> e^2 / 2`` (1, 1/4, 1/40, 3e-4, 5e-8, 1e-15), so ``x`` ends at ``floor(sqrt(D))`` or one above
   it (integer Newton may alternate between the two when ``D + 1`` is a square);
4. ``x <- x - [x^2 > D]``.

Exact: no rounding error. ``D = 0`` gives 0. Every step is an integer operation the ONNX form repeats
one for one (:mod:`utils.integer_onnx`), so both give the same integers by construction, and the tests
check exactness against Python's ``math.isqrt``.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BIT_SEARCH", "NEWTON_STEPS", "bit_length", "isqrt"]

BIT_SEARCH = (32, 16, 8, 4, 2, 1)
NEWTON_STEPS = 6


def bit_length(x: Tensor) -> Tensor:
    """Bits of each element of a non-negative int64 tensor (0 for 0), by binary search."""
    n = torch.zeros_like(x)
    for step in BIT_SEARCH:
        n = n + (torch.bitwise_right_shift(x, n + step) > 0).to(x.dtype) * step
    return n + (x > 0).to(x.dtype)


def isqrt(d: Tensor) -> Tensor:
    """``floor(sqrt(d))`` of a non-negative int64 tensor (elements below 2^62)."""
    d = d.to(torch.int64)
    positive = d.clamp(min=1)  # x stays >= 1: the last step turns isqrt(1) into isqrt(0) where d = 0
    x = torch.bitwise_left_shift(torch.ones_like(d), torch.bitwise_right_shift(bit_length(positive) + 1, 1))
    for _ in range(NEWTON_STEPS):
        x = torch.bitwise_right_shift(x + torch.div(positive, x, rounding_mode="floor"), 1)
    return x - (x * x > d).to(d.dtype)
