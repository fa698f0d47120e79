"""The operations of the integer program, in PyTorch (exact integer arithmetic).

Each entry of :data:`OPS` computes one :class:`~models.integer.program.Node` from its input tensors and
constants; :mod:`utils.integer_onnx` writes the same operation as standard ONNX operators. The
arithmetic, its rounding and its error bounds are in the modules named below; what is here is wiring.

``quantize``      the float image onto its input grid: ``clamp(round_half_even(x / s) + z, lo, hi)``, as
                  ONNX's QuantizeLinear (the program's one float operation on its input);
``im2col``        image codes ``[B, C, H, W]`` cut into patches ``[B, H/kh * W/kw, C*kh*kw]`` (the patch
                  embedding's convolution, whose kernel is its stride, as a GEMM);
``linear``        ``sum_k (x_k - x_zero) W_kn`` into int32 (biases are in the requantization's offset) (:mod:`~models.integer.matmul`);
``matmul``        ``(a - a_zero) @ (b - b_zero)`` of two activations into int32;
``requant``       ``clamp(floor((sum_i M_i x_i + R) / 2^sh), lo, hi)`` (:mod:`~models.integer.dyadic`);
``layernorm``     :mod:`~models.integer.layernorm`;
``softmax``       :mod:`~models.integer.softmax` on ``scores + mask`` (rows: the last axis);
``decode``        log2 attention codes into integer weights ``2^(top - code)`` (0 for the zero code), so
                  that attention x V is a sum of shifted values; twin codes into weights on the fine step;
``lookup``        ``table[x]``: GELU's table, whose entries are fc2's input codes (:mod:`~models.integer.gelu`);
``reshape``, ``transpose``, ``roll``, ``slice``, ``concat_const`` (constant tokens in front), ``sum``
                  move or add integers (ONNX semantics: a 0 in ``reshape`` copies the input's size);
``dequantize``    the int32 logits times their float scale (the program's one float operation on its output).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from models.integer.dyadic import requantize
from models.integer.matmul import linear_int, matmul_int
from models.integer.node import Node

__all__ = ["OPS"]

Op = Callable[[Node, list[Tensor], dict[str, Tensor]], list[Tensor]]
OPS: dict[str, Op] = {}


def op(name: str) -> Callable[[Op], Op]:
    def add(fn: Op) -> Op:
        OPS[name] = fn
        return fn

    return add


@op("quantize")
def _quantize(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    a = node.attrs
    return [(torch.round(inputs[0].float() / c["scale"]) + c["zero"]).clamp_(a["lo"], a["hi"]).to(torch.int64)]


@op("im2col")
def _im2col(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    x = inputs[0]
    kh, kw = node.attrs["kernel"]
    b, ch, h, w = x.shape
    patches = x.reshape(b, ch, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5)
    return [patches.reshape(b, (h // kh) * (w // kw), ch * kh * kw)]


@op("linear")
def _linear(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    return [linear_int(inputs[0], node.attrs["x_zero"], c["weight"])]


@op("matmul")
def _matmul(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    a = node.attrs
    return [matmul_int(inputs[0], a["a_zero"], inputs[1], a["b_zero"], a["bound"])]


@op("requant")
def _requant(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    a = node.attrs
    terms = [(x, c[f"m{i}"]) for i, x in enumerate(inputs)]
    return [requantize(terms, c["r"], a["shift"], a["lo"], a["hi"])]


@op("layernorm")
def _layernorm(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    return [node.attrs["layernorm"](inputs[0])]


@op("softmax")
def _softmax(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    x = inputs[0].to(torch.int64)
    if "mask" in c:  # (windows, N, N) added to (images * windows, heads, N, N), window by window
        windows = c["mask"].shape[0]
        x = (x.view(-1, windows, *x.shape[1:]) + c["mask"].unsqueeze(1)).view(x.shape)
    d = x - x.amax(dim=-1, keepdim=True)
    return [node.attrs["softmax"].codes(d)]


@op("decode")
def _decode(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    a = node.attrs
    codes = inputs[0].to(torch.int64)
    if a["kind"] == "twin":  # fine codes as they are, coarse ones times 2^shift
        return [torch.where(codes > a["top"], torch.bitwise_left_shift(codes - a["top"] - 1, a["shift"]), codes)]
    weights = torch.bitwise_left_shift(torch.ones_like(codes), (a["top"] - codes).clamp_(min=0))
    return [weights.masked_fill_(codes >= a["hi"], 0)]


@op("lookup")
def _lookup(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    return [c["table"][inputs[0].to(torch.int64)]]


@op("reshape")
def _reshape(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    x = inputs[0]
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(node.attrs["shape"])]
    return [x.reshape(shape)]


@op("transpose")
def _transpose(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    return [inputs[0].permute(*node.attrs["perm"]).contiguous()]


@op("roll")
def _roll(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    return [torch.roll(inputs[0], tuple(node.attrs["shifts"]), tuple(node.attrs["dims"]))]


@op("slice")
def _slice(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    a = node.attrs
    return [inputs[0].narrow(a["axis"], a["start"], a["end"] - a["start"])]


@op("concat_const")
def _concat_const(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    x = inputs[0]
    prefix = c["prefix"].to(x.dtype).expand(x.shape[0], *c["prefix"].shape)
    return [torch.cat([prefix, x], dim=1)]


@op("sum")
def _sum(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    return [inputs[0].to(torch.int64).sum(dim=tuple(node.attrs["axes"]), keepdim=bool(node.attrs["keepdims"]))]


@op("dequantize")
def _dequantize(node: Node, inputs: list[Tensor], c: dict[str, Tensor]) -> list[Tensor]:
    return [inputs[0].float() * c["scale"]]
