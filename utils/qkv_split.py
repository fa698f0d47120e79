"""The attention's fused qkv Linear as three Linears, one per part: the layout the CPU runtimes' attention
kernels read without copies.

timm's ViT and Swin attentions compute q, k and v with one Linear, exported as one GEMM, a reshape to
``[B, N, 3, heads, dim]``, one transpose of all three to ``[3, B, heads, N, dim]``, a ``Split`` and a
``Squeeze`` per part (and, for k, a second transpose before ``q @ k^T``). That 5-d transpose is a strided
copy of the whole qkv output that neither CPU runtime fuses: profiled at batch 32, 2 threads, the split
and the transposes were ~100 ms of ~1200 in ONNX Runtime (ViT-B) and 8 ms of ~100 in OpenVINO
(DeiT-tiny), where the copy also sits between the GEMM and the q and k quantizers, which OpenVINO then
cannot fuse into the GEMM's output.

:func:`split_qkv` writes each part as its own Linear on the weight's column blocks (each runtime's form
of a quantized Linear: ``FusedLinear.write_part``), reshaped to ``[B, N, heads, dim]`` and transposed once
to ``[B, heads, N, dim]``, which OpenVINO's attention subgraph takes in. k's own transpose is folded
into that one (to ``[B, heads, dim, N]``) where the runtime gains from it (ONNX Runtime); OpenVINO fuses
k's ``(0, 1, 3, 2)`` transpose into its attention subgraph but not a ``(0, 2, 3, 1)`` one on int8 codes,
so there it stays. Weights are quantized per output channel and activations per tensor, so slicing the
columns and moving a transpose across a Q/DQ pair change no value.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from utils.onnx_graph import GraphEdit, perm

__all__ = ["FusedLinear", "split_qkv"]


@dataclass(frozen=True)
class FusedLinear:
    """A Linear that may be a fused qkv, as a runtime's rewrite writes it."""

    last: Any  # the node whose output is the Linear's (the qkv reshape reads it)
    nodes: tuple  # every node of the Linear (``last`` included), removed when it is split
    columns: int  # output width: parts x part width
    # (part, its output columns, the output tensor's name) -> the nodes computing that part
    write_part: Callable[[int, slice, str], list]


def _five_dim_shape(graph: GraphEdit, name: str) -> list | None:
    """The 5 entries of a Reshape shape ``[b, N, parts, heads, dim]``, each a number or, when computed at run
    time (a ``Concat`` input that is no constant), the name of its 1-element tensor."""
    value = graph.constants.get(name)
    if value is not None:
        return [int(v) for v in value] if value.shape == (5,) else None
    concat = graph.producers.get(name)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 5:
        return None
    entries = [graph.constants.get(i, i) for i in concat.input]
    return [int(e[0]) if isinstance(e, np.ndarray) and e.shape == (1,) else e for e in entries]


def _qkv_pattern(graph: GraphEdit, output: str):
    """(Reshape, Transpose, Split, [Squeeze per part], [b, N, parts, heads, dim]) when ``output`` goes
    ``Reshape [b, N, parts, heads, dim] -> Transpose(2, 0, 3, 1, 4) -> Split(axis 0) -> Squeeze(0)`` per
    part, as timm's ViT and Swin attentions split their fused qkv; else None."""
    reshape = graph.sole_reader(output, "Reshape")
    shape = _five_dim_shape(graph, reshape.input[1]) if reshape is not None else None
    if shape is None or not all(isinstance(v, int) for v in shape[2:]) or max(shape[3:]) < 1:
        return None  # the parts must be known, and heads or dim
    transpose = graph.sole_reader(reshape.output[0], "Transpose")
    if transpose is None or perm(transpose) != [2, 0, 3, 1, 4]:
        return None
    split = graph.sole_reader(transpose.output[0], "Split")
    if split is None or next((a.i for a in split.attribute if a.name == "axis"), 0) != 0 or len(split.output) != shape[2]:
        return None
    squeezes = [graph.sole_reader(out, "Squeeze") for out in split.output]
    if any(s is None or graph.constants.get(s.input[1], np.zeros(0)).tolist() != [0] for s in squeezes):
        return None
    return reshape, transpose, split, squeezes, shape


def _k_transpose(graph: GraphEdit, part: str):
    """(DequantizeLinear, Transpose) when the part goes ``QuantizeLinear -> DequantizeLinear -> Transpose
    (0, 1, 3, 2)`` into its matmul, as k does for ``q @ k^T``; else None."""
    quantize = graph.sole_reader(part, "QuantizeLinear")
    dequantize = graph.sole_reader(quantize.output[0], "DequantizeLinear") if quantize is not None else None
    transpose = graph.sole_reader(dequantize.output[0], "Transpose") if dequantize is not None else None
    if transpose is None or perm(transpose) != [0, 1, 3, 2] or len(graph.consumers.get(transpose.output[0], [])) != 1:
        return None
    return dequantize, transpose


def _fold_k_transpose(graph: GraphEdit, part: str) -> bool:
    """Drop k's own transpose (its part is then transposed straight to ``[b, heads, dim, N]``)."""
    k = _k_transpose(graph, part)
    if k is None:
        return False
    dequantize, transpose = k
    reader = graph.consumers[transpose.output[0]][0]
    reader.input[list(reader.input).index(transpose.output[0])] = dequantize.output[0]
    graph.removed.add(id(transpose))
    graph.stale.update([part, graph.producers[dequantize.input[0]].output[0], dequantize.output[0]])
    return True


def split_qkv(graph: GraphEdit, linears: Iterable[FusedLinear], fold_k_transpose: bool) -> int:
    """Each of ``linears`` whose output is split as a fused qkv -> one Linear per part, reshaped to
    ``[b, N, heads, dim]`` and transposed once to ``[b, heads, N, dim]`` (with ``fold_k_transpose``, k to
    ``[b, heads, dim, N]``, its own transpose dropped). Returns how many were split; commit the edit after."""
    from onnx import helper

    split_count = 0
    for linear in linears:
        pattern = _qkv_pattern(graph, linear.last.output[0])
        if pattern is None:
            continue
        reshape, transpose, split, squeezes, (batch, tokens, parts, heads, dim) = pattern
        width = linear.columns // parts
        dim = width // heads if dim < 1 else dim  # the reshape may leave heads or dim as -1
        heads_shape, nodes = f"{reshape.input[1]}.heads", []
        entries = [batch, tokens, width // dim, dim]
        if all(isinstance(v, int) for v in entries):
            graph.initializer(heads_shape, np.array(entries, dtype=np.int64))
        else:  # batch or tokens computed at run time: a Concat like the one it replaces
            inputs = [v if isinstance(v, str) else graph.initializer(f"{heads_shape}.{i}", np.array([v], dtype=np.int64)) for i, v in enumerate(entries)]
            nodes.append(helper.make_node("Concat", inputs, [heads_shape], name=f"{reshape.name}.heads_shape", axis=0))
        for part, squeeze in enumerate(squeezes):
            out = f"{linear.last.output[0]}.part{part}"
            folded = fold_k_transpose and _fold_k_transpose(graph, squeeze.output[0])
            nodes += [
                *linear.write_part(part, slice(part * width, (part + 1) * width), out),
                helper.make_node("Reshape", [out, heads_shape], [f"{out}.heads"], name=f"{reshape.name}.part{part}"),
                helper.make_node("Transpose", [f"{out}.heads"], [squeeze.output[0]], name=f"{transpose.name}.part{part}",
                                 perm=[0, 2, 3, 1] if folded else [0, 2, 1, 3]),  # fmt: skip
            ]
        graph.replaced[id(linear.last)] = nodes  # where the Linear's output was: every input of the parts exists by then
        graph.removed.update({*map(id, linear.nodes), id(reshape), id(transpose), id(split), *map(id, squeezes)})
        old_shape = graph.producers.get(reshape.input[1])
        if old_shape is not None and graph.only_user(reshape.input[1], reshape):
            graph.removed.add(id(old_shape))
        split_count += 1
    return split_count
