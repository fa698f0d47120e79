"""Quantized Swin Transformer (v1) layers, the FQ-ViT way (arXiv 2111.13824, Sec. 3; Swin: arXiv 2103.14030).

FQ-ViT quantizes Swin as it quantizes ViT: every Linear input, both attention matmuls' operands, the
LayerNorm inputs (each block's residual stream, the patch embedding's and each PatchMerging's, with
power-of-two factors) and the softmax output. Swin's window attention adds a learned relative position
bias to the scores, and the shifted-window blocks a mask (0, or -100 between tokens that were not
neighbours before the cyclic shift). The scores the integer softmax quantizes are ``q.k + bias``; the
mask is added after, on their grid's dequantized values: a masked score lands ~100 below its row's
maximum, where the integer exponential is exactly 0, as the float softmax is (to 1e-43). Quantizing
the masked scores instead would spend the 8-bit grid on the -100 (a step of ~0.8).

As in :mod:`models.ptq.layers`, each class subclasses timm's and keeps its attribute names; the window
partition, cyclic shift and PatchMerging's reshaping stay timm's own code. PatchMerging, the patch
embedding and the head need no class here: their LayerNorm and Linear children are converted.
"""
from __future__ import annotations

from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
from torch import Tensor

from models.ptq.layers import QuantAct, QuantBlock, QuantLayerNorm, QuantSoftmax, _device
from models.ptq.tensor_quantizer import QuantState
from quant_config import QuantizerSpec

__all__ = ["QuantWindowAttention", "QuantSwinBlock"]


class QuantWindowAttention(WindowAttention):
    """timm ``WindowAttention`` with its softmax visible and both matmuls' operands quantized (q with the
    attention scale folded in, k, v; the attention map by the softmax's output quantizer)."""

    q_act: QuantAct
    k_act: QuantAct
    v_act: QuantAct
    softmax: QuantSoftmax

    @classmethod
    def convert(cls, module: WindowAttention, state: QuantState, *, activation: QuantizerSpec | None, attention: QuantizerSpec | None,
                integer_softmax: bool) -> "QuantWindowAttention":  # fmt: skip
        module.__class__ = cls
        module.fused_attn = False
        dev = _device(module.qkv)
        head_dim = module.qkv.out_features // (3 * module.num_heads)
        module.q_act = QuantAct(activation, state, num_channels=head_dim, device=dev)
        module.k_act = QuantAct(activation, state, num_channels=head_dim, device=dev)
        module.v_act = QuantAct(activation, state, num_channels=head_dim, device=dev)
        module.softmax = QuantSoftmax(state, scores=activation, attention=attention, integer=integer_softmax, device=dev)
        return module

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, _ = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = self.q_act(q * self.scale) @ self.k_act(k).transpose(-2, -1)
        attn = attn + self._get_rel_pos_bias()
        if mask is None:
            attn = self.softmax(attn)
        else:  # (windows, N, N) over every image of the batch and every head
            windows = mask.shape[0]
            attn = self.softmax(attn.view(-1, windows, self.num_heads, N, N), mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, N, N)
        x = (self.attn_drop(attn) @ self.v_act(v)).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))


class QuantSwinBlock(SwinTransformerBlock):
    """timm ``SwinTransformerBlock`` whose residual stream is quantized once where it enters each
    LayerNorm: the quantized tensor is both the skip path and the LayerNorm input (as :class:`QuantBlock`)."""

    norm1: QuantLayerNorm
    norm2: QuantLayerNorm
    convert = classmethod(QuantBlock.convert.__func__)  # the same in-place re-classing

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = self.norm1.input_quant(x)
        x = x + self.drop_path1(self._attn(self.norm1.normalize(x)))
        x = self.norm2.input_quant(x.reshape(B, -1, C))
        x = x + self.drop_path2(self.mlp(self.norm2.normalize(x)))
        return x.reshape(B, H, W, C)
