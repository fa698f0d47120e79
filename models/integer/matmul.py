"""Exact integer matrix products in PyTorch: ``sum_k (a_k - za) (b_k - zb)`` into int32.

The program's GEMMs (FQ-ViT, arXiv 2111.13824: int8 x int8 accumulated in int32) have one exact answer;
this module computes it with whatever kernel the device has:

* an 8-bit operand pair through ``torch._int_mm`` (int8 x int8 -> int32) on the CPU, and on CUDA where
  its shape rules hold (more than 16 rows, inner and outer sizes multiples of 8). Unsigned codes ``u`` with zero point
  ``z`` enter as ``u - 128`` (int8) and the difference ``(128 - z) * sum_k b_k`` is added back, in int32;
* otherwise float32 when every partial sum is an integer below 2^24 in magnitude (then no rounding
  happens, whatever the summation order: ``bound`` is ``K * max|a - za| * max|b - zb|``), else float64
  (below 2^53), else refused.

Exact in every case: no rounding error. CUDA matmuls run with TF32 off (its 10-bit mantissa would round
operands above 2^11).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_int", "matmul_int"]

_FLOAT32_EXACT = 2**24
_FLOAT64_EXACT = 2**53


def _int_mm_fits(rows: int, inner: int, outer: int, device: torch.device) -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    return device.type == "cpu" or (device.type == "cuda" and rows > 16 and inner % 8 == 0 and outer % 8 == 0)


def _float_matmul(a: Tensor, b: Tensor, bound: int) -> Tensor:
    if bound >= _FLOAT64_EXACT:
        raise OverflowError(f"an integer matmul whose sums reach {bound} is beyond float64's exact range")
    dtype = torch.float32 if bound < _FLOAT32_EXACT else torch.float64
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return torch.matmul(a.to(dtype), b.to(dtype)).to(torch.int32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def linear_int(x: Tensor, x_zero: int, weight: Tensor) -> Tensor:
    """``sum_k (x_k - x_zero) w_kn``: ``x`` unsigned 8-bit codes ``[..., K]``, ``weight`` int8 ``[K, N]``."""
    rows = x.reshape(-1, x.shape[-1])
    if _int_mm_fits(rows.shape[0], weight.shape[0], weight.shape[1], x.device):
        shifted = (rows.to(torch.int16) - 128).to(torch.int8)
        out = torch._int_mm(shifted, weight)
        if x_zero != 128:
            out += (128 - x_zero) * weight.to(torch.int32).sum(0)
    else:
        bound = weight.shape[0] * max(x_zero, 255 - x_zero) * 128
        out = _float_matmul(rows.to(torch.int32) - x_zero, weight, bound)
    return out.reshape(*x.shape[:-1], weight.shape[1])


def matmul_int(a: Tensor, a_zero: int, b: Tensor, b_zero: int, bound: int) -> Tensor:
    """Batched ``(a - a_zero) @ (b - b_zero)`` of two integer tensors; ``bound`` is ``K`` times the largest
    ``|a - a_zero| * |b - b_zero|`` the caller's value ranges allow."""
    return _float_matmul(a.to(torch.int32) - a_zero, b.to(torch.int32) - b_zero, bound)
