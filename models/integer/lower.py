"""Lowering a calibrated QVit to its integer program (FQ-ViT, arXiv 2111.13824, Sec. 3; Fig. 2's
fully quantized ViT with every operation in integers).

:func:`lower` picks the lowering of the model's class from :data:`LOWERINGS` (a new architecture is a
new entry, as in :mod:`models.ptq.registry`) after ``QuantRecipe.integer_refusal`` has checked that
the recipe quantizes every point with a grid the program can read. The ViT/DeiT lowering here follows timm's
``VisionTransformer`` stage by stage: the image's codes cut into patches, the patch GEMM with the
position embedding folded into its requantization (prefix tokens - class, distillation, registers -
are integer constants: the fake-quant model's own codes of them), each block (LayerNorm, attention,
residual addition, LayerNorm, MLP, residual addition, every residual addition one ``requant`` of the
two terms on the next LayerNorm's grid), the final LayerNorm on the tokens the head reads, the head
into int32 logits on one power-of-two step.

The program then computes what the fake-quant model simulates: the same points and grids, the same
integer softmax and GELU; the float rounding of the fake-quant model and the program's dyadic
requantization differ only where a value lies within ~2^-20 steps of a rounding boundary.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from timm.layers import LayerScale
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.integer import IntegerUnsupported
from models.integer.builder import Branch, Builder, Codes
from models.integer.lower_swin import lower_swin
from models.integer.program import Program
from models.ptq.layers import QuantLayerNorm
from models.quant_vit import QVit

__all__ = ["LOWERINGS", "lower"]

def lower(qvit: QVit) -> Program:
    """The integer program of a calibrated QVit (CPU constants; run it with :func:`models.integer.program.run`)."""
    refusal = qvit.recipe.integer_refusal()
    if refusal is not None:
        raise IntegerUnsupported(refusal)
    lowering = LOWERINGS.get(type(qvit.model))
    if lowering is None:
        raise IntegerUnsupported(f"{type(qvit.model).__name__} has no integer lowering (ViT, DeiT and Swin have)")
    with torch.no_grad():
        program = lowering(qvit)
    program.meta.update(recipe=qvit.recipe.name, model=type(qvit.model).__name__)
    return program


# -- ViT / DeiT ------------------------------------------------------------------------------------------
def _check_vit(model: VisionTransformer) -> None:
    pe = model.patch_embed
    conv = pe.proj
    if getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False):
        raise IntegerUnsupported("a dynamic image size has no static integer program")
    if not pe.flatten:
        raise IntegerUnsupported("patch_embed: the integer program needs the patches flattened into tokens")
    if not isinstance(pe.norm, nn.Identity):
        raise IntegerUnsupported("patch_embed.norm: a LayerNorm in the patch embedding is not lowered for ViTs")
    if getattr(model, "attn_pool", None) is not None:
        raise IntegerUnsupported("attention pooling (attn_pool) is not in the integer program")
    for i, blk in enumerate(model.blocks):
        for part in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(blk.attn, part, nn.Identity()), nn.Identity):
                raise IntegerUnsupported(f"blocks.{i}.attn.{part}: a normalization inside the attention is not lowered")
        if not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity):
            raise IntegerUnsupported(f"blocks.{i}.mlp.norm: a normalization inside the MLP is not lowered")


def _layer_scale(ls: nn.Module, width: int) -> np.ndarray:
    if isinstance(ls, LayerScale):
        return ls.gamma.detach().double().cpu().numpy()
    return np.ones(width)


def _quantize_constant(x: torch.Tensor, q) -> np.ndarray:
    """Stored codes of a constant float tensor on ``q``'s grid, rounded in float64 as the simulation does."""
    scale = q.broadcast(q.scale, x).double()
    zero = q.broadcast(q.zero_point, x).double()
    bt = q.spec.bit_type
    stored = (x.double() / scale).round().clamp(bt.qmin - zero, bt.qmax - zero) + zero - bt.qmin
    return stored.cpu().numpy().astype(np.int64)


def _residual(b: Builder, name: str, stream: str, branch: Branch, gamma: np.ndarray, out: Codes) -> str:
    """``stream + gamma * branch`` (codes, accumulators) onto ``out``: one requant of every term."""
    terms, offset = branch.onto(out.scale, gamma)
    return b.requant(name, [(stream, b.values[stream].grid.scale / out.scale), *terms], offset, out)


def _block(b: Builder, prefix: str, blk: nn.Module, stream: str, tokens: int, next_codes: Codes) -> str:
    """One ViT block from the codes on its norm1 grid to the codes on ``next_codes``."""
    width = blk.norm1.normalized_shape[-1]
    h = b.layernorm(f"{prefix}.norm1", stream, blk.norm1, b.codes(blk.attn.qkv.input_quant))
    branch = b.attention(f"{prefix}.attn", h, blk.attn, blk.attn.num_heads, tokens)
    stream = _residual(b, f"{prefix}.norm2.input", stream, branch, _layer_scale(blk.ls1, width), b.codes(blk.norm2.input_quant))
    h = b.layernorm(f"{prefix}.norm2", stream, blk.norm2, b.codes(blk.mlp.fc1.input_quant))
    branch = b.mlp(f"{prefix}.mlp", h, blk.mlp)
    return _residual(b, f"{prefix}.output", stream, branch, _layer_scale(blk.ls2, width), next_codes)


def lower_vit(qvit: QVit) -> Program:
    model = qvit.model
    _check_vit(model)
    pool = model.global_pool
    distilled = isinstance(model, VisionTransformerDistilled)
    if not distilled and pool != "token":
        raise IntegerUnsupported(f"global_pool {pool!r}: the integer program reads the class token (global_pool 'token')")
    if not isinstance(model.fc_norm, nn.Identity) or not isinstance(model.norm, QuantLayerNorm):
        raise IntegerUnsupported("the integer program needs the final norm before the head and no fc_norm")
    b = Builder(qvit)
    b.stage("embed")
    image = b.value("image", "float32", -math.inf, math.inf)
    pe = model.patch_embed
    patch = b.patches(image.name, pe.proj)
    kh, kw = pe.proj.kernel_size
    ch, dim = pe.proj.in_channels, pe.proj.out_channels
    image_size = pe.img_size
    patches_n = (image_size[0] // kh) * (image_size[1] // kw)
    proj = b.linear("patch_embed.proj", patch, pe.proj)
    # What _pos_embed adds: prefix tokens (class, distillation, registers) and the position embedding.
    # In float64, as the simulation adds them (the class token and position embedding are float32).
    embed = model._pos_embed(torch.zeros(1, patches_n, dim, dtype=torch.float64, device=pe.proj.weight.device))[0]
    prefix = embed.shape[0] - patches_n
    first = model.norm_pre if isinstance(model.norm_pre, QuantLayerNorm) else model.blocks[0].norm1
    fc = b.codes(first.input_quant)
    terms, offset = proj.onto(fc.scale)
    tokens = b.requant("embed.patches", terms, offset + embed[prefix:].double().cpu().numpy() / fc.scale, fc)
    stream = tokens
    if prefix:
        constants = _quantize_constant(embed[:prefix], first.input_quant)
        out = b.coded("embed", fc)
        stream = b.emit(out.name, "concat_const", [tokens], [out], consts={"prefix": constants.astype(np.uint16 if fc.hi > 255 else np.uint8)})[0]
    n = embed.shape[0]
    if first is not model.blocks[0].norm1:
        stream = b.layernorm("norm_pre", stream, first, b.codes(model.blocks[0].norm1.input_quant))
    for i, blk in enumerate(model.blocks):
        b.stage(f"blocks.{i}")
        last = i == len(model.blocks) - 1
        next_codes = b.codes(model.norm.input_quant if last else model.blocks[i + 1].norm1.input_quant)
        stream = _block(b, f"blocks.{i}", blk, stream, n, next_codes)
    b.stage("head")
    heads = [(model.head, 0)] + ([(model.head_dist, 1)] if distilled else [])
    accs = []
    for head, token in heads:
        name = "head" if token == 0 else "head_dist"
        x = b.slice(f"{name}.token", stream, 1, token, token + 1)
        x = b.layernorm(f"norm.{name}" if distilled else "norm", x, model.norm, b.codes(head.input_quant))
        x = b.reshape(f"{name}.input.flat", x, [-1, dim])
        accs.append(b.linear(name, x, head))
    output = b.logits(accs)
    return b.program(image.name, output, {"input_shape": [ch, *image_size], "classes": model.num_classes})


LOWERINGS: dict[type[nn.Module], Callable[[QVit], Program]] = {
    VisionTransformer: lower_vit,
    VisionTransformerDistilled: lower_vit,
    SwinTransformer: lower_swin,
}
