"""A dynamic per-token scale on the residual stream where it enters a LayerNorm.

Token-wise activation quantization (ZeroQuant, arXiv 2206.01861, Sec. 4.1; LLM.int8's vector-wise
quantization, arXiv 2208.07339, Sec. 3.2) applied on top of FQ-ViT's static LayerNorm-input grid
(arXiv 2111.13824, Sec. 3.2). The calibrated grid (per-channel PTF scales ``s_c`` and zero points
``z_c``) must cover the widest token of every image; most tokens use a fraction of it. Each token ``t``
therefore gets, at run time, the factor

    f_t = min(1, max_c |x_tc / s_c| / room_c),   room_c = qmax - z_c above the zero point, z_c - qmin below

so that its largest value lands on the grid's last code, and is quantized as

    x_hat_tc = s_c * f_t * (clamp(round(x_tc / (s_c f_t)) + z_c, qmin, qmax) - z_c).

The codes stay 8-bit (or whatever the spec says); ``f_t`` is one number per token, never above 1, so no
token is coarser or clipped more than on the static grid. What makes it cheap in an integer pipeline:
the LayerNorm that reads the stream is invariant to a per-token factor (it normalizes each token by its
own mean and deviation), so the integer LayerNorm runs on the codes alone; only the skip path's add
needs ``f_t``, a per-token rescale of the accumulator the requantization does anyway. Q/DQ cannot
express a scale computed at run time, so the ONNX export keeps such a point in float
(:mod:`utils.onnx_export`).

With ``token_scale_group: g`` each token gets one factor per ``g`` consecutive channels instead
(fine-grained block scaling, as the microscaling formats' shared scale per block of 32 values: OCP MX
spec v1.0; Rouhani et al., arXiv 2310.10537). A token's channels no longer share ``f``, so the LayerNorm no
longer cancels it: an integer LayerNorm multiplies each group's codes by its factor before the sums.
Being stored beside every ``g`` codes, a group's factor is held as 8 bits (``k / 255``, rounded up so
that nothing clips more): 6-bit codes in groups of 16 make 6.5 bits a value.

Why: on held-out calibration images of DeiT-tiny, the 8-bit stream alone (every other point at 16 bits)
keeps logit cosine 0.9946 with FP32, below the 0.995 that the fully quantized 8-bit recipe aims for; with
this factor 0.9983 (docs/accuracy.md). Per-channel grids were already as good as free per-channel
scales there, and neither a twin-uniform nor a Hadamard-rotated stream lowered its squared error: what
was left is that most tokens use a fraction of a range that a few tokens set.
"""
from __future__ import annotations

import torch
from torch import Tensor

from quant_config import BitTypeConfig

__all__ = ["token_factors", "token_scaled_fake_quant"]

# A token of zeros keeps a tiny positive factor (its codes are all zero-point codes either way).
_MIN_FACTOR = 2.0**-24
# A factor per group of channels is an 8-bit number k / 255 (see _factors).
_GROUP_FACTOR_LEVELS = 255.0


def _inverse_room(zero_point: Tensor | float, bit_type: BitTypeConfig, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel, 1 / (codes above the zero point) and 1 / (codes below it); 0 where a side has none
    (a zero point at the grid's edge: values there clip at every factor, so they must not shrink it)."""
    zero_point = torch.as_tensor(zero_point, device=like.device).to(like.dtype)
    above, below = bit_type.qmax - zero_point, zero_point - bit_type.qmin
    return (torch.where(above > 0, 1 / above.clamp(min=1), 0.0), torch.where(below > 0, 1 / below.clamp(min=1), 0.0))


def _factors(codes: Tensor, zero_point: Tensor | float, bit_type: BitTypeConfig, group: int = 0) -> Tensor:
    """:func:`token_factors` from ``codes = x / scale``. Only the channel-sized room is built: a value's
    fill on the wrong side of the zero point is negative and never wins the maximum."""
    inv_above, inv_below = _inverse_room(zero_point, bit_type, codes)
    channels = codes.shape[-1]
    width = group or channels
    if channels % width:
        raise ValueError(f"token_scale_group {group} does not divide the stream's {channels} channels")

    def fill(ratio: Tensor) -> Tensor:  # the largest ratio of each token's group
        return ratio.unflatten(-1, (channels // width, width)).amax(dim=-1)

    factors = torch.maximum(fill(codes * inv_above), fill(codes * -inv_below)).clamp_(_MIN_FACTOR, 1.0)
    if not group:
        return factors
    # Stored next to every `group` codes, a group's factor counts in the stream's width: it is held as
    # 8 bits, k / 255, rounded up so that no value clips (6-bit codes in groups of 16: 6.5 bits a value).
    return factors.mul_(_GROUP_FACTOR_LEVELS).ceil_().div_(_GROUP_FACTOR_LEVELS).repeat_interleave(group, dim=-1)


def token_factors(
    x: Tensor, scale: Tensor | float, zero_point: Tensor | float, bit_type: BitTypeConfig, group: int = 0
) -> Tensor:
    """Each token's factor ``f_t`` in (0, 1] (the last axis is channels), shaped ``x.shape[:-1] + (1,)``;
    with ``group`` channels per factor, one per token and group, repeated to ``x.shape``."""
    return _factors(x / scale, zero_point, bit_type, group)


def token_scaled_fake_quant(
    x: Tensor, scale: Tensor | float, zero_point: Tensor | float, bit_type: BitTypeConfig, group: int = 0
) -> Tensor:
    """Quantize and dequantize ``x`` (tokens on the second-to-last axis, channels last) on the calibrated
    grid refined per token (and per ``group`` channels, if given) by :func:`token_factors`."""
    codes = x / scale  # signed distance from the zero point, in calibrated steps: read once, for both
    factors = _factors(codes, zero_point, bit_type, group)
    return codes.div_(factors).round_().clamp_(bit_type.qmin - zero_point, bit_type.qmax - zero_point).mul_(factors * scale)
