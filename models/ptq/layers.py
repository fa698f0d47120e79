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
import math

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from models.integer.gelu import GeluTable
from models.integer.layernorm import IntLayerNorm
from models.integer.softmax import IExp, IntSoftmax
from models.ptq.tensor_quantizer import QuantMode, QuantState, TensorQuantizer
from quant_config import QuantizerSpec

__all__ = ["QuantConv2d", "QuantLinear", "QuantLayerNorm", "QuantAct", "QuantSoftmax", "QuantAttention", "QuantBlock", "SmoothedGELU", "link_reader"]


def link_reader(module: nn.Module, reader: nn.Module) -> None:
    """Record the layer whose input quantizer reads ``module``'s output, where the integer program
    computes that output directly on the reader's grid (a LayerNorm, GELU's table). A plain attribute,
    not a child module (the module tree keeps one path per module); the reader's quantizer is looked up
    at run time, so a replaced quantizer (a recipe's ``layers``) is the one read."""
    object.__setattr__(module, "reader", reader)


def _reader_quantizer(module: nn.Module) -> TensorQuantizer | None:
    reader = module.__dict__.get("reader")
    return None if reader is None else reader.input_quant


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

    def quant_operands(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The weight and bias as the layer computes with them, in ``x``'s dtype: a float64 run (the exact
        simulation of the integer program, :meth:`models.quant_vit.QVit.forward`) takes the weight's
        codes times its scale in float64, which float32 would round."""
        weight, bias = self.weight_quant(self.weight), self.quant_bias()
        if weight.dtype == x.dtype:
            return weight, bias
        return self.weight_quant.as_dtype(weight, x.dtype), None if bias is None else bias.to(x.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        key = prefix + "bias_correction"
        self.bias_correction = torch.empty_like(state_dict[key], device=self.weight.device) if key in state_dict else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QuantLinear(_QuantWeightedLayer, nn.Linear):
    """``nn.Linear`` with a quantized input (per tensor or per input feature) and weight (per output row)."""

    input_quant: TensorQuantizer
    weight_quant: TensorQuantizer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quant(x), *self.quant_operands(x))


class QuantConv2d(_QuantWeightedLayer, nn.Conv2d):
    """``nn.Conv2d`` (the patch embedding) with a quantized input image and per-filter weight."""

    input_quant: TensorQuantizer
    weight_quant: TensorQuantizer

    input_channel_axis = 1  # an image batch's channels

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quant(x), *self.quant_operands(x))


class QuantLayerNorm(nn.LayerNorm):
    """LayerNorm whose input (the residual stream) is quantized with FQ-ViT's power-of-two factor.

    With PTF the per-channel input scales are ``s * 2^alpha_c``, so an integer LayerNorm can bring all
    channels to the common scale ``s`` with bit shifts and compute mean and variance exactly in
    integers (Sec. 3.2, Eq. 8); with ``ptf_channel_zero_points`` it subtracts each channel's zero point
    before the shift. Normalising the dequantized input in float is that same computation, up to the
    rounding of the result; the float64 run that simulates the integer program (QVit.forward) takes the
    integer LayerNorm's own codes (:mod:`models.integer.layernorm`) where a linked reader's grid
    receives them, so it rounds where the program rounds.
    """

    input_quant: TensorQuantizer

    @classmethod
    def convert(cls, module: nn.LayerNorm, state: QuantState, *, layernorm_input: QuantizerSpec | None) -> "QuantLayerNorm":
        module.__class__ = cls
        module.input_quant = TensorQuantizer(
            layernorm_input, state, num_channels=module.normalized_shape[-1], kind="layernorm_input", device=_device(module)
        )
        module._integer_cache = None
        return module

    def integer_layernorm(self, out_scale, out_zero, lo: int, hi: int) -> IntLayerNorm | None:
        """The integer program's LayerNorm from this input point's calibrated grid onto an output grid
        (scales and stored zero points; stored codes ``lo .. hi``); None for input scales that are not
        power-of-two steps of one unit."""
        q = self.input_quant
        bt = q.spec.bit_type
        zero = np.rint(q.zero_point.detach().double().cpu().numpy()).astype(np.int64) - bt.qmin
        affine = [None if p is None else p.detach().double().cpu().numpy() for p in (self.weight, self.bias)]
        scale = q.scale.detach().double().cpu().numpy()
        return IntLayerNorm.for_grids(self.normalized_shape[-1], scale, zero, bt.qmax - bt.qmin, *affine, self.eps, out_scale, out_zero, lo, hi)

    def _simulated(self, x: Tensor) -> Tensor | None:
        """The integer LayerNorm's output values, in the float64 run of a quantized model whose reader
        has a uniform grid (per tensor, or per channel: the next LayerNorm's); None otherwise."""
        q, out = self.input_quant, _reader_quantizer(self)
        if x.dtype != torch.float64 or q.state.mode is not QuantMode.QUANT or out is None or not (q.enabled and out.enabled):
            return None
        if not out.method.uniform_levels or not out.static_grid:
            return None
        bt, bt_out = q.spec.bit_type, out.spec.bit_type
        key = (id(q), q.grid_key, id(out), out.grid_key)  # a recipe's layers may replace a quantizer
        if self._integer_cache is None or self._integer_cache[0] != key:
            out_scale = out.scale.detach().double().cpu().numpy()
            out_zero = np.rint(out.zero_point.detach().double().cpu().numpy()) - bt_out.qmin
            self._integer_cache = (key, self.integer_layernorm(out_scale, out_zero, 0, bt_out.qmax - bt_out.qmin))
        ln = self._integer_cache[1]
        if ln is None:
            return None
        codes = torch.round(x / q.broadcast(q.scale, x).double()) + (q.broadcast(q.zero_point, x).double() - bt.qmin)
        out_zero = out.broadcast(out.zero_point, x).double() - bt_out.qmin
        return (ln(codes.to(torch.int64)).double() - out_zero) * out.broadcast(out.scale, x).double()

    def normalize(self, x: Tensor) -> Tensor:
        """LayerNorm of an input that is already quantized (the residual stream in :class:`QuantBlock`),
        in ``x``'s dtype."""
        simulated = self._simulated(x)
        if simulated is not None:
            return simulated
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(self.input_quant(x))


class SmoothedGELU(nn.GELU):
    """``nn.GELU`` whose output can be divided channel by channel: what SmoothQuant's migration of the
    MLP's hidden activation into fc2 (models/ptq/reparam.py, ``mlp_alpha``) leaves in the graph.
    Without factors it is ``nn.GELU``. It quantizes nothing itself: fc2's input quantizer quantizes its
    output. The factors are replayed from the calibrated file, so they are not state.

    With ``integer`` (the recipe's ``integer_gelu``) a quantized run computes what the integer program's
    table does (:mod:`models.integer.gelu`): fc1's output rounded onto the table's index grid, which
    follows the input grid of ``reader`` (the MLP's fc2, linked by the registry's Mlp entry and read
    at run time), then float GELU, wherever fc2's input point is enabled; gradients pass as float GELU's.
    """

    channel_scale: Tensor | None

    @classmethod
    def convert(cls, module: nn.GELU, state: QuantState, *, integer: bool) -> "SmoothedGELU":
        module.__class__ = cls
        module.register_buffer("channel_scale", None, persistent=False)
        module.state = state
        module.integer = integer
        return module

    def set_channel_scale(self, scale: Tensor) -> None:
        # A normal tensor even when set under inference mode (calibration): the Fisher scale search and
        # block reconstruction back-propagate through this division afterwards.
        with torch.inference_mode(False):
            self.channel_scale = scale.detach().clone()

    def table(self) -> GeluTable | None:
        """The index grid of the integer program's GELU table, up to one step above fc2's top level; None
        without a reader (a timm Mlp links fc2) on one static grid."""
        q = _reader_quantizer(self)
        if q is None or not q.enabled or q.per_channel or not q.static_grid:
            return None
        top = q.method.grid_bounds(q.scale_value, q.zero_point_value, q.spec.bit_type)[1]
        return GeluTable.up_to(float(top) + q.scale_value)

    def forward(self, x: Tensor) -> Tensor:
        # The table's entries are fc2's input codes: it is on where that point is.
        table = self.table() if self.integer and self.state.mode is QuantMode.QUANT else None
        if table is None:
            y = super().forward(x)
        else:
            y = table.lookup(x.detach()).to(x.dtype)
            if x.requires_grad:  # the float GELU's gradient passes straight through the table
                smooth = super().forward(x)
                y = smooth + (y - smooth).detach()
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
    8-bit attention scores) and a quantized run computes the integer program's softmax
    (:class:`~models.integer.softmax.IntSoftmax`: i-exp, integer normalisation, the attention map's
    codes) exactly, its gradient that of the float softmax; otherwise the softmax is float.
    ``output_quant`` quantizes the attention map (log2 for LIS, or uniform): on the integer softmax's
    codes it changes nothing, and the profiler sees it as every other point.
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
        self._program: tuple[tuple, IntSoftmax | None] | None = None

    def integer_softmax(self) -> IntSoftmax | None:
        """The integer softmax for the calibrated score and attention grids; None when the attention grid
        has no integer normalisation here (log-sqrt2: its probabilities stay float)."""
        out = self.output_quant
        key = (self.input_quant.scale_value, out.scale_value, out.zero_point_value)
        if self._program is None or self._program[0] != key:
            bt = out.spec.bit_type
            method = out.method
            if method.log_domain and method.power_of_two_scale and method.step == 1.0:
                program = IntSoftmax.log2(key[0], round(math.log2(key[1])), method.max_code(bt) + 1)
            elif method.uniform_levels:
                program = IntSoftmax.uniform(key[0], key[1], round(key[2]) - bt.qmin, bt.qmax - bt.qmin)
            elif method.twin_regions and not bt.symmetric:  # PTQ4ViT's post-softmax twin grid
                program = IntSoftmax.twin(key[0], key[1], float(method.fine_step(key[1], key[2])), method.region_top(bt))
            else:
                program = None
            self._program = (key, program)
        return self._program[1]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask`` (Swin's shifted windows: 0 or -100) is added to the scores after they are quantized, so
        their grid is not stretched over it; a masked score's integer exponential is 0."""
        x = self.input_quant(x)
        if not (self.integer and self.state.mode is QuantMode.QUANT and self.input_quant.enabled):
            return self.output_quant((x if mask is None else x + mask).softmax(dim=-1))
        scale = self.input_quant.scale_value
        codes = torch.round(x.detach() / scale).to(torch.int64)
        if mask is not None:
            codes = codes + torch.round(mask / scale).to(torch.int64)
        d = codes - codes.amax(dim=-1, keepdim=True)
        program = self.integer_softmax() if self.output_quant.enabled else None
        if program is None:
            exp = IExp.for_scale(scale)(d)[0].double()
            probs = (exp / exp.sum(dim=-1, keepdim=True)).to(x.dtype)
        else:
            probs = self._dequantize(program.codes(d), program).to(x.dtype)
        if x.requires_grad:
            exact = probs
            probs = (x if mask is None else x + mask).softmax(dim=-1)
            probs = probs + (exact - probs).detach()
        return self.output_quant(probs)

    def _dequantize(self, codes: Tensor, program: IntSoftmax) -> Tensor:
        out = self.output_quant
        if program.kind == "log2":
            return torch.where(codes >= program.hi, 0.0, out.scale_value * torch.exp2(-codes.double()))
        if program.kind == "twin":
            fine = float(out.method.fine_step(out.scale_value, out.zero_point_value))
            return torch.where(codes > program.top, (codes - program.top - 1).double() * out.scale_value, codes.double() * fine)
        return (codes - (out.zero_point_value - out.spec.bit_type.qmin)).double() * out.scale_value


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
        """Give ``module`` this class's forward, in place (a block has no quantizers of its own), and link
        each LayerNorm to the Linear that reads it (:func:`link_reader`)."""
        module.__class__ = cls
        link_reader(module.norm1, module.attn.qkv)
        link_reader(module.norm2, module.mlp.fc1)
        return module

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        x = self.norm1.input_quant(x)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1.normalize(x), **kwargs)))
        x = self.norm2.input_quant(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2.normalize(x))))
