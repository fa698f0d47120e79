"""Quantized layers of a fully quantized ViT (FQ-ViT, arXiv 2111.13824, Sec. 3 and Fig. 2).

Each class subclasses the float layer it replaces and keeps its attribute names, so timm weights load
unchanged: :meth:`convert` turns an existing float module into the quantized class *in place* (its
parameters are kept, not copied) and adds its :class:`TensorQuantizer` children. The layers stay thin:
they call ``self.input_quant(x)`` / ``self.weight_quant(w)`` and otherwise do the float computation.

"Fully quantized" as in FQ-ViT: every input of a Conv2d / Linear / attention matmul, the LayerNorm
inputs (the residual stream, with power-of-two factors), and the softmax output (log2 in LIS) are
quantized. Each layer is handed only the :class:`QuantizerSpec` of its own tensors, never the recipe.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from models.ptq.int_ops import IExpConstants, int_softmax
from models.ptq.tensor_quantizer import QuantMode, QuantState, TensorQuantizer
from quant_config import QuantizerSpec

__all__ = ["QuantConv2d", "QuantLinear", "QuantLayerNorm", "QuantAct", "QuantSoftmax", "QuantAttention", "QuantBlock", "SmoothedGELU"]


def _device(module: nn.Module) -> torch.device | None:
    param = next(module.parameters(recurse=False), None)
    return param.device if param is not None else None


class _QuantWeightedLayer:
    """A Conv/Linear with a quantized input and weight, whose bias gets a correction
    (models/ptq/bias_correction.py) when it runs quantized.

    ``bias_correction`` is a buffer only once set (absent from the state dict otherwise, like a
    quantizer's ``rounded`` weight); the FP32 mode keeps the original bias.
    """

    bias: nn.Parameter | None
    state: QuantState
    bias_correction: Tensor | None
    input_quant: TensorQuantizer
    weight_quant: TensorQuantizer
    input_channel_axis = -1  # where the input's channels are: a Linear's features are last

    @classmethod
    def convert(cls, module: nn.Module, state: QuantState, *, activation: QuantizerSpec | None, weight: QuantizerSpec | None):
        """Turn ``module`` into ``cls`` in place with its two quantizers: the input, and the weight per
        output channel (axis 0; the weight is [out, in, ...] for both Linear and Conv2d)."""
        module.__class__ = cls
        dev = _device(module)
        out_channels, in_channels = module.weight.shape[0], module.weight.shape[1] * getattr(module, "groups", 1)
        module.state = state
        module.register_buffer("bias_correction", None)
        module.input_quant = TensorQuantizer(activation, state, num_channels=in_channels, channel_axis=cls.input_channel_axis, kind="activation", device=dev)
        module.weight_quant = TensorQuantizer(weight, state, num_channels=out_channels, channel_axis=0, is_weight=True, kind="weight", device=dev)
        return module

    def set_bias_correction(self, value: Tensor) -> None:
        self.bias_correction = value.detach().clone()

    def quant_bias(self) -> Tensor | None:
        """The bias, corrected when the layer runs quantized (a user switch that turns both of its
        quantizers off, as the profiler's isolated view does, turns the correction off too)."""
        quantized = self.input_quant.enabled or self.weight_quant.enabled
        if self.bias_correction is None or not quantized or self.state.mode not in (QuantMode.QUANT, QuantMode.EXPORT):
            return self.bias
        return self.bias_correction if self.bias is None else self.bias + self.bias_correction

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        key = prefix + "bias_correction"
        self.bias_correction = torch.empty_like(state_dict[key], device=self.weight.device) if key in state_dict else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QuantLinear(_QuantWeightedLayer, nn.Linear):
    """``nn.Linear`` with a quantized input (per tensor or per input feature) and weight (per output row)."""

    input_quant: TensorQuantizer
    weight_quant: TensorQuantizer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quant(x), self.weight_quant(self.weight), self.quant_bias())


class QuantConv2d(_QuantWeightedLayer, nn.Conv2d):
    """``nn.Conv2d`` (the patch embedding) with a quantized input image and per-filter weight."""

    input_quant: TensorQuantizer
    weight_quant: TensorQuantizer

    input_channel_axis = 1  # an image batch's channels

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quant(x), self.weight_quant(self.weight), self.quant_bias())


class QuantLayerNorm(nn.LayerNorm):
    """LayerNorm whose input (the residual stream) is quantized with FQ-ViT's power-of-two factor.

    With PTF the per-channel input scales are ``s * 2^alpha_c``, so an integer LayerNorm can bring all
    channels to the common scale ``s`` with bit shifts and compute mean and variance exactly in
    integers (Sec. 3.2, Eq. 8); with ``ptf_channel_zero_points`` it subtracts each channel's zero point
    before the shift. Normalising the dequantized input in float is that same computation.
    """

    input_quant: TensorQuantizer

    @classmethod
    def convert(cls, module: nn.LayerNorm, state: QuantState, *, layernorm_input: QuantizerSpec | None) -> "QuantLayerNorm":
        module.__class__ = cls
        module.input_quant = TensorQuantizer(
            layernorm_input, state, num_channels=module.normalized_shape[-1], kind="layernorm_input", device=_device(module)
        )
        return module

    def normalize(self, x: Tensor) -> Tensor:
        """LayerNorm of an input that is already quantized (the residual stream in :class:`QuantBlock`)."""
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(self.input_quant(x))


class SmoothedGELU(nn.GELU):
    """``nn.GELU`` whose output can be divided channel by channel: what SmoothQuant's migration of the
    MLP's hidden activation into fc2 (models/ptq/reparam.py, ``mlp_alpha``) leaves in the graph.
    Without factors it is ``nn.GELU``. It quantizes nothing itself: fc2's input quantizer quantizes its
    output. The factors are replayed from the calibrated file, so they are not state.
    """

    channel_scale: Tensor | None

    @classmethod
    def convert(cls, module: nn.GELU) -> "SmoothedGELU":
        module.__class__ = cls
        module.register_buffer("channel_scale", None, persistent=False)
        return module

    def set_channel_scale(self, scale: Tensor) -> None:
        # A normal tensor even when set under inference mode (calibration): the Fisher scale search and
        # block reconstruction back-propagate through this division afterwards.
        with torch.inference_mode(False):
            self.channel_scale = scale.detach().clone()

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        return y if self.channel_scale is None else y / self.channel_scale


class QuantAct(nn.Identity):
    """A quantization point on a tensor that no float layer owns (the attention matmul operands)."""

    input_quant: TensorQuantizer

    def __init__(self, spec: QuantizerSpec | None, state: QuantState, *, num_channels: int = 1, device=None) -> None:
        super().__init__()
        self.input_quant = TensorQuantizer(spec, state, num_channels=num_channels, kind="activation", device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.input_quant(x)


class QuantSoftmax(nn.Softmax):
    """Softmax over the last axis with quantized output: FQ-ViT's log-int-softmax (Sec. 3.3) or uniform.

    With ``integer=True`` the scores are first quantized (``input_quant``, per tensor, as FQ-ViT's
    8-bit attention scores) and the exponential is the integer-only i-exp of :mod:`int_ops`; otherwise
    the softmax is float. ``output_quant`` quantizes the attention map (log2 for LIS, or uniform).
    """

    input_quant: TensorQuantizer
    output_quant: TensorQuantizer

    def __init__(
        self, state: QuantState, *, scores: QuantizerSpec | None, attention: QuantizerSpec | None, integer: bool, device=None
    ) -> None:
        super().__init__(dim=-1)
        self.state = state
        self.integer = integer
        if integer and scores is not None:
            # The integer exponential needs one scale for the whole score tensor.
            scores = dataclasses.replace(scores, calibration_mode="layer_wise", power_of_two_factor=False)
        self.input_quant = TensorQuantizer(scores if integer else None, state, kind="activation", device=device)
        self.output_quant = TensorQuantizer(attention, state, kind="attention", device=device)
        self._iexp: IExpConstants | None = None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (Swin's shifted windows: 0 or -100) is added to the scores after they are quantized, so
        their grid is not stretched over it; a masked score's integer exponential is 0."""
        x = self.input_quant(x)
        if mask is not None:
            x = x + mask
        if self.integer and self.state.mode is QuantMode.QUANT and self.input_quant.enabled:
            scale = self.input_quant.scale_value
            if self._iexp is None or self._iexp_scale != scale:
                self._iexp, self._iexp_scale = IExpConstants.from_scale(scale), scale
            # The fake-quantized scores are a fresh tensor: the integer softmax may overwrite them.
            probs = int_softmax(x, scale, self._iexp, dim=-1, inplace=True)
        else:
            probs = x.softmax(dim=-1)
        return self.output_quant(probs)


class QuantAttention(Attention):
    """timm ``Attention`` with its softmax visible (fused attention off) and both matmuls' operands quantized.

    The attention scale is folded into q before it is quantized, so the first matmul takes two
    quantized operands directly (the layout TensorRT fuses).
    """

    q_act: QuantAct
    k_act: QuantAct
    v_act: QuantAct
    softmax: QuantSoftmax

    @classmethod
    def convert(
        cls,
        module: Attention,
        state: QuantState,
        *,
        activation: QuantizerSpec | None,
        attention: QuantizerSpec | None,
        integer_softmax: bool,
    ) -> "QuantAttention":
        module.__class__ = cls
        module.fused_attn = False
        dev = _device(module.qkv)
        module.q_act = QuantAct(activation, state, num_channels=module.head_dim, device=dev)
        module.k_act = QuantAct(activation, state, num_channels=module.head_dim, device=dev)
        module.v_act = QuantAct(activation, state, num_channels=module.head_dim, device=dev)
        module.softmax = QuantSoftmax(state, scores=activation, attention=attention, integer=integer_softmax, device=dev)
        return module

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, **kwargs) -> Tensor:
        if attn_mask is not None or is_causal or kwargs:
            raise NotImplementedError("QuantAttention supports image classification ViTs only (no attention mask)")
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = self.q_act(q * self.scale) @ self.k_act(k).transpose(-2, -1)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ self.v_act(v)).transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)


class QuantBlock(Block):
    """timm ``Block`` whose residual stream is quantized where it enters each LayerNorm.

    FQ-ViT quantizes the sum of every residual connection (its ``qact2`` / ``qact4``); that tensor is
    both the skip path and the LayerNorm input, so the LayerNorm's input quantizer is applied once and
    its result feeds both.
    """

    norm1: QuantLayerNorm
    norm2: QuantLayerNorm

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Give ``module`` this class's forward, in place (a block has no quantizers of its own)."""
        module.__class__ = cls
        return module

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        x = self.norm1.input_quant(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1.normalize(x), **kwargs)))
        x = self.norm2.input_quant(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2.normalize(x))))
