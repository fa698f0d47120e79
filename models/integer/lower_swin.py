"""Lowering a calibrated Swin Transformer (v1) to its integer program (FQ-ViT, arXiv 2111.13824, Sec. 3;
Swin: arXiv 2103.14030).

timm's ``SwinTransformer`` stage by stage, on the integer pieces of :mod:`models.integer.builder`:

* the patch embedding: the image's codes cut into 4x4 patches, one GEMM, its LayerNorm (a PTF input
  point) written straight onto the first block's LayerNorm grid;
* each block: LayerNorm onto qkv's input codes, the cyclic shift and the window partition as moves of
  those codes, window attention with the relative position bias added to the scores before their
  quantization (a per-head, per-pair offset of that requantization) and the shift mask after it (an
  integer offset that sends a masked score 100 / s below its row: i-exp gives it exactly 0), the
  windows merged and shifted back as moves of proj's int32 accumulator, the residual addition onto
  norm2's grid, the MLP, the residual addition onto the next LayerNorm's grid;
* PatchMerging: the last block of a stage adds its residual directly in the merged layout (both terms
  moved first), onto the merging LayerNorm's 4C-channel grid; LayerNorm, the reduction GEMM;
* the final LayerNorm onto a fine fixed-point grid (2^-12 of the head's input step), the average over
  the tokens as a sum whose 1/N goes into the head input's requantization, the head into int32 logits.

Window sizes that do not tile the feature map (timm pads them) are refused.
"""
from __future__ import annotations

import math

import numpy as np
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from models.integer import IntegerUnsupported
from models.integer.builder import Builder, Codes
from models.integer.program import Grid, Program
from models.quant_vit import QVit

__all__ = ["lower_swin"]

POOL_FRACTION = 12  # the final LayerNorm's output step: the head input's over 2^12


def _merged(b: Builder, name: str, x: str, h: int, w: int, c: int) -> str:
    """PatchMerging's layout change ``[B, H*W, C] -> [B, H/2, W/2, 4C]`` (timm's reshape, permute,
    flatten); the value keeps its grid, laid over the merged channels."""
    grid = b.values[x].grid
    x = b.reshape(f"{name}.split", x, [-1, h // 2, 2, w // 2, 2, c], grid_kept=False)
    x = b.transpose(f"{name}.permute", x, [0, 1, 3, 4, 2, 5])
    x = b.reshape(f"{name}.merged", x, [-1, h // 2, w // 2, 4 * c], grid_kept=False)
    b.values[x].grid = Grid(grid.kind, _merge_channels(grid.scale, c), _merge_channels(grid.zero, c))
    return x


def _merge_channels(values: np.ndarray, c: int) -> np.ndarray:
    """Per-channel values of C channels laid out over the 4C merged channels (channel c' reads c' % C)."""
    return np.tile(np.broadcast_to(np.asarray(values, np.float64), (c,)), 4)


def _windows(b: Builder, name: str, x: str, h: int, w: int, ws: int, c: int, point: str) -> str:
    """timm's window partition of ``[B, H, W, C]`` codes into ``[B * windows, ws * ws, C]``: ``point``'s layout."""
    x = b.reshape(f"{name}.split", x, [-1, h // ws, ws, w // ws, ws, c])
    x = b.transpose(f"{name}.permute", x, [0, 1, 3, 2, 4, 5], grid_kept=True)
    return b.reshape(name, x, [-1, ws * ws, c], point=point)


def _unwindows(b: Builder, name: str, x: str, h: int, w: int, ws: int, c: int) -> str:
    x = b.reshape(f"{name}.split", x, [-1, h // ws, w // ws, ws, ws, c], grid_kept=False)
    x = b.transpose(f"{name}.permute", x, [0, 1, 3, 2, 4, 5])
    return b.reshape(name, x, [-1, h, w, c], grid_kept=False)


def _block(b: Builder, prefix: str, blk: nn.Module, stream: str, next_ln: nn.Module | None, merge: bool) -> str:
    """One Swin block from codes ``[B, H, W, C]`` on its norm1 grid to codes on ``next_ln``'s input grid
    (``[B, H, W, C]``, or the merged ``[B, H/2, W/2, 4C]`` when ``merge``)."""
    h, w = blk.input_resolution
    ws, shift = blk.window_size, blk.shift_size
    if h % ws[0] or w % ws[1] or ws[0] != ws[1]:
        raise IntegerUnsupported(f"{prefix}: windows {ws} that do not tile {h}x{w} (padding) are not lowered")
    ws = ws[0]
    c = blk.norm1.normalized_shape[-1]
    attn = blk.attn
    qkv = b.codes(attn.qkv.input_quant)
    x = b.layernorm(f"{prefix}.norm1", stream, blk.norm1, qkv, layout=False)
    if any(shift):
        x = b.roll(f"{prefix}.shift", x, [-shift[0], -shift[1]], [1, 2], [h, w])
    x = _windows(b, f"{prefix}.windows", x, h, w, ws, c, qkv.point)
    bias = attn._get_rel_pos_bias()[0].detach().double().cpu().numpy()  # [heads, N, N]
    mask = None if blk.attn_mask is None else blk.attn_mask.detach().double().cpu().numpy()
    branch = b.attention(f"{prefix}.attn", x, attn, attn.num_heads, ws * ws, bias=bias, mask=mask)

    def back(acc):  # windows merged, shifted back, as tokens: moves of the accumulator
        if not isinstance(acc, str):
            return acc
        acc = _unwindows(b, f"{acc}.merge", acc, h, w, ws, c)
        if any(shift):
            acc = b.roll(f"{acc}.unshift", acc, [shift[0], shift[1]], [1, 2], [h, w])
        return b.reshape(f"{acc}.tokens", acc, [-1, h * w, c], grid_kept=False)

    branch = branch.map(back)
    tokens = b.reshape(f"{prefix}.tokens", stream, [-1, h * w, c])
    n2 = b.codes(blk.norm2.input_quant)
    terms, offset = branch.onto(n2.scale)
    stream = b.requant(f"{prefix}.norm2.input", [(tokens, b.values[tokens].grid.scale / n2.scale), *terms], offset, n2)
    h2 = b.layernorm(f"{prefix}.norm2", stream, blk.norm2, b.codes(blk.mlp.fc1.input_quant))
    branch = b.mlp(f"{prefix}.mlp", h2, blk.mlp)
    if merge:
        stream = _merged(b, f"{prefix}.output.stream", stream, h, w, c)
        branch = branch.map(lambda v: _merged(b, f"{v}.merged", v, h, w, c) if isinstance(v, str) else _merge_channels(v, c))
    nc = b.codes(next_ln.input_quant)
    terms, offset = branch.onto(nc.scale)
    out = b.requant(f"{prefix}.output", [(stream, b.values[stream].grid.scale / nc.scale), *terms], offset, nc, layout=False)
    shape = [-1, h // 2, w // 2, 4 * c] if merge else [-1, h, w, c]
    return b.reshape(f"{prefix}.output.layout", out, shape, point=nc.point)


def _patch_merging(b: Builder, prefix: str, pm: nn.Module, stream: str, next_ln: nn.Module) -> str:
    """LayerNorm over the merged 4C channels onto the reduction's input codes, the reduction, and its
    accumulator onto the next block's norm1 grid."""
    x = b.layernorm(f"{prefix}.norm", stream, pm.norm, b.codes(pm.reduction.input_quant))
    nc = b.codes(next_ln.input_quant)
    terms, offset = b.linear(f"{prefix}.reduction", x, pm.reduction).onto(nc.scale)
    return b.requant(f"{prefix}.output", terms, offset, nc)


def lower_swin(qvit: QVit) -> Program:
    model: SwinTransformer = qvit.model
    pe = model.patch_embed
    conv = pe.proj
    if getattr(pe, "dynamic_img_pad", False):
        raise IntegerUnsupported("patch_embed: a dynamic image padding has no static integer program")
    if getattr(model, "absolute_pos_embed", None) is not None:
        raise IntegerUnsupported("an absolute position embedding (ape) is not lowered for Swin")
    if model.head.global_pool.pool_type != "avg":
        raise IntegerUnsupported(f"head pooling {model.head.global_pool.pool_type!r}: the integer program averages the tokens")
    b = Builder(qvit)
    b.stage("embed")
    image = b.value("image", "float32", -math.inf, math.inf)
    patch = b.patches(image.name, conv)
    gh, gw = pe.grid_size
    c = conv.out_channels
    pc = b.codes(pe.norm.input_quant)
    terms, offset = b.linear("patch_embed.proj", patch, conv).onto(pc.scale)
    x = b.requant("patch_embed.norm.input", terms, offset, pc, layout=False)
    x = b.reshape("patch_embed.norm.input.layout", x, [-1, gh, gw, c], point=pc.point)
    sequence = qvit.block_sequence()
    first = sequence[0][1]
    x = b.layernorm("patch_embed.norm", x, pe.norm, b.codes((first.norm if hasattr(first, "reduction") else first.norm1).input_quant))
    for i, (name, module) in enumerate(sequence):
        b.stage(name)
        following = sequence[i + 1][1] if i + 1 < len(sequence) else None
        if hasattr(module, "reduction"):  # PatchMerging
            x = _patch_merging(b, name, module, x, following.norm1)
        else:
            merge = following is not None and hasattr(following, "reduction")
            next_ln = model.norm if following is None else (following.norm if merge else following.norm1)
            x = _block(b, name, module, x, next_ln, merge)
    b.stage("head")
    fc = model.head.fc
    hc = b.codes(fc.input_quant)
    h, w = model.layers[-1].blocks[-1].input_resolution
    fine = Codes.fixed(float(hc.scale) / 2**POOL_FRACTION)
    limit = 2**31 // (h * w) - 1  # the token sum stays in int32
    x = b.layernorm("norm", x, model.norm, fine, -limit, limit)
    total = b.value("head.pool", "int32", -limit * h * w, limit * h * w, fine.grid)
    b.emit(total.name, "sum", [x], [total], {"axes": [1, 2], "keepdims": 0})
    x = b.requant("head.fc.input", [(total.name, np.asarray(float(fine.scale) / (h * w) / float(hc.scale)))], 0.0, hc)
    output = b.logits([b.linear("head.fc", x, fc)])
    return b.program(image.name, output, {"input_shape": [conv.in_channels, *pe.img_size], "classes": model.num_classes})
