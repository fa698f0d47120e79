"""Integer LayerNorm on power-of-two-factor codes (FQ-ViT, arXiv 2111.13824, Sec. 3.2, Eq. 8).

The residual stream arrives as codes ``u_c`` with a zero point ``z_c`` and a scale ``s * 2^alpha_c`` per
channel (the PTF), so ``X_c = (u_c - z_c) << alpha_c`` is every channel on the one grid ``s``:

    S = sum_c X_c (int32),  Q = sum_c X_c^2 (int64; int32 runs where their bound allows),
    D = C Q - S^2 + E = C^2 (var + eps) / s^2,  E = rint(C^2 eps / s^2),
    sigma = max(isqrt(D * 4^f), 1) ~= 2^f sqrt(D)                       (models.integer.isqrt, exact)
    y_c = clamp( floor( ((C X_c - S) G_c 2^f + H_c sigma) / (sigma 2^g) ), lo, hi )

with ``G_c = rint(gamma_c / s_out_c * 2^g)`` and ``H_c = rint((beta_c / s_out_c + z_out_c + 1/2) 2^g)``:
``(C X_c - S) / sqrt(D) = (x_c - mean) / sqrt(var + eps)``, so ``y_c`` is the LayerNorm output rounded
half up onto the output grid (the next Linear's input, or any per-channel grid) in one integer division.
``f`` (fractional bits of ``sigma``) and ``g`` (of ``G``, ``H``) are chosen per layer as large as the
int64 bound allows (:meth:`IntLayerNorm.build`).

Error against the float64 LayerNorm, in output steps, before clamping: ``isqrt`` truncates ``sigma``
by less than 1 (relative ``< 1 / sigma``), ``G / 2^g`` and ``H / 2^g`` are within ``2^-(g + 1)`` of
their reals, and the division floors, so ``|y - (LN(x) / s_out + z_out)| <= 1/2 + |t| (|gamma / s_out| /
sigma + 2^-(g+1)) + 2^-(g+1)`` with ``t`` the normalized value (``|t| < sqrt(C)``); the tests check this
bound token by token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from models.integer.dyadic import INT64_BOUND, fixed_point
from models.integer.isqrt import isqrt

__all__ = ["IntLayerNorm", "ptf_steps"]


def ptf_steps(scale: np.ndarray) -> tuple[float, np.ndarray] | None:
    """``(unit, shift)`` with ``scale = unit * 2^shift`` channel by channel (FQ-ViT's power-of-two
    factors; a per-tensor scale has shift 0), or None when the scales are not power-of-two multiples of
    one step."""
    scale = np.asarray(scale, np.float64)
    unit = float(scale.min())
    shift = np.rint(np.log2(scale / unit)).astype(np.int64)
    if not np.allclose(unit * 2.0**shift, scale, rtol=1e-6, atol=0):
        return None
    return unit, shift


@dataclass(frozen=True)
class IntLayerNorm:
    """The constants of one integer LayerNorm (all int64 arrays of one entry per channel)."""

    zero: np.ndarray  # z_c, stored input zero points
    shift: np.ndarray  # alpha_c, the power-of-two factors
    gain: np.ndarray  # G_c * 2^f
    offset: np.ndarray  # H_c
    eps: int  # E
    f: int
    g: int
    lo: int
    hi: int

    @property
    def channels(self) -> int:
        return len(self.zero)

    @classmethod
    def for_grids(cls, c: int, in_scale: np.ndarray, in_zero: np.ndarray, code_max: int, weight: np.ndarray | None, bias: np.ndarray | None,
                  eps: float, out_scale: np.ndarray, out_zero: np.ndarray, lo: int, hi: int) -> "IntLayerNorm | None":  # fmt: skip
        """For ``c`` channels, from the input grid (per-channel scales - power-of-two multiples of one step -
        and stored zero points, codes ``0 .. code_max``), the affine (None: 1 and 0) and the output grid
        (stored zero points; ``[lo, hi]`` its stored codes); None when the input scales are not PTF steps."""
        in_scale = np.asarray(in_scale, np.float64)
        steps = ptf_steps(np.broadcast_to(in_scale, (c,)))
        if steps is None:
            return None
        unit, shift = steps
        weight = np.ones(c) if weight is None else np.asarray(weight, np.float64)
        bias = np.zeros(c) if bias is None else np.asarray(bias, np.float64)
        zero = np.broadcast_to(np.asarray(in_zero, np.int64), (c,))
        return cls.build(zero, shift, code_max, unit, weight, bias, eps, out_scale, out_zero, lo, hi)

    @classmethod
    def build(cls, zero: np.ndarray, shift: np.ndarray, code_max: int, unit: float, weight: np.ndarray, bias: np.ndarray, eps: float,
              out_scale: np.ndarray, out_zero: np.ndarray, lo: int, hi: int) -> "IntLayerNorm":  # fmt: skip
        """From the input grid (stored zero points, shifts, largest code ``code_max``, the common step
        ``unit = s``), the affine ``weight`` / ``bias`` and ``eps``, and the output grid (scales and stored
        zero points, broadcast to the channels; ``[lo, hi]`` the stored codes)."""
        zero, shift = np.array(zero, np.int64), np.array(shift, np.int64)
        c = len(zero)
        out_scale = np.broadcast_to(np.asarray(out_scale, np.float64), (c,)).copy()
        out_zero = np.broadcast_to(np.asarray(out_zero, np.float64), (c,)).copy()
        x_max = int(np.max(np.maximum(zero, code_max - zero) << shift))
        e = int(np.rint(c * c * eps / unit**2))
        d_max = c * c * x_max * x_max + e
        f = max(0, min(16, (61 - d_max.bit_length()) // 2))
        ratio = np.asarray(weight, np.float64) / out_scale
        centre = np.asarray(bias, np.float64) / out_scale + out_zero + 0.5
        sigma_max = math.isqrt(d_max << (2 * f)) + 1
        # g: as many fractional bits for G and H as the int64 bound allows (at most 32).
        gain_unit = float(np.max(np.abs(ratio))) * 2**f * 2 * c * x_max + 1
        offset_unit = float(np.max(np.abs(centre))) * sigma_max + 1
        g = max(0, min(32, math.floor(math.log2(INT64_BOUND / (gain_unit + offset_unit))) - 1))
        if sigma_max * 2.0**g >= INT64_BOUND:
            g = max(0, math.floor(math.log2(INT64_BOUND / sigma_max)) - 1)
        gain = fixed_point(ratio, g) << f
        return cls(zero, shift, gain, fixed_point(centre, g), e, f, g, lo, hi)

    def __call__(self, u: Tensor) -> Tensor:
        dev = u.device
        zero, shift = torch.as_tensor(self.zero, device=dev), torch.as_tensor(self.shift, device=dev)
        x = torch.bitwise_left_shift(u.to(torch.int64) - zero, shift)
        s = x.sum(dim=-1, keepdim=True)
        q = (x * x).sum(dim=-1, keepdim=True)
        d = self.channels * q - s * s + self.eps
        sigma = isqrt(torch.bitwise_left_shift(d, 2 * self.f)).clamp_(min=1)
        num = (self.channels * x - s) * torch.as_tensor(self.gain, device=dev) + torch.as_tensor(self.offset, device=dev) * sigma
        return torch.div(num, sigma * 2**self.g, rounding_mode="floor").clamp_(self.lo, self.hi)
