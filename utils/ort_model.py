"""ONNX Runtime's own form of the Q/DQ INT8 model: the same integers, fewer float passes.

The portable ``int8.onnx`` (utils/onnx_export.py) is what TensorRT and OpenVINO read. ONNX Runtime's
CPU provider turns each ``DequantizeLinear(x_q) -> MatMul <- Transpose <- DequantizeLinear(W_q)`` into
an integer ``MatMulIntegerToFloat`` but leaves the Linear's bias as a separate float ``Add`` over the
whole output (fc1's becomes a ``BiasGelu``); profiled on ViT-B, batch 32, 2 threads, those adds were
~8% of the INT8 run. ``MatMulIntegerToFloat`` (a ``com.microsoft`` operator, the one ONNX Runtime's
own quantizer emits) takes the bias as an input, so :func:`save_ort_model` writes each quantized
Linear as that one node:

    MatMulIntegerToFloat(x_q, W_q^T, x_scale, w_scale, x_zero_point, w_zero_point, bias)

which computes ``(x_q - x_zp)(W_q - w_zp)^T * x_scale * w_scale + bias`` - what the Q/DQ pattern
computes, with the bias added in the integer kernel's epilogue.

ONNX Runtime's x86 integer GEMMs want unsigned activations (its own graph pass shifts int8 Q/DQ pairs
to uint8 before fusing; an ``int8 x int8`` ``MatMulIntegerToFloat`` built directly ran 6x slower here),
so every int8 activation pair is written as uint8 with its zero point + 128: ``q_u8 = q_s8 + 128``
on the same grid, the same clamp, the same dequantized values. Weights stay int8.

The attention's fused qkv Linear is written as three ``MatMulIntegerToFloat`` on the weight's column
blocks, each transposed once straight into the layout its matmul reads (k to ``[B, heads, dim, N]``):
utils/qkv_split.py, which says why.

Two exact moves then take float passes out of the attention:

* a ``Transpose`` or ``Reshape`` that feeds only a per-tensor quantizer (or a Mul by a scalar on its
  way there) is moved after it: one scale and zero point commute with any layout change, and the
  heads' transposes of q and k and the transpose back before ``proj`` then move 1-byte codes instead of
  4-byte floats;
* the ``q * head_dim ** -0.5`` Mul is folded into the q GEMM's weight scales and bias when that factor is
  a power of two (head_dim 64 or 16: exact, a power of two only moves the exponent), so q leaves its
  GEMM already scaled.

Last, ``q @ k^T`` (and attention x v where a recipe quantizes it): ONNX Runtime's own Q/DQ pass turns
that ``DequantizeLinear`` pair -> ``MatMul`` into an integer matmul, but of two uint8 operands, which its
x86 kernels run slower than uint8 x int8. Written directly as ``MatMulIntegerToFloat`` with the second
operand's codes int8 (zero point - 128, the same values), ViT-B at batch 32 ran 1.3% faster (paired,
2 threads) with the same logits bit for bit. And a patch embedding (a Conv whose kernel is its stride),
which ONNX Runtime runs as a float Conv of dequantized values, becomes what it is: the image's codes cut
into patches times the weight, one more ``MatMulIntegerToFloat`` (ViT-B batch 32: 0.7-1.3% faster).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.onnx_graph import GraphEdit, quantized_linears, weight_codes
from utils.qkv_split import FusedLinear, split_qkv

__all__ = ["OrtRewrite", "save_ort_model"]

log = logging.getLogger(__name__)

CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class OrtRewrite:
    """What :func:`save_ort_model` changed."""

    linears_fused: int  # quantized Linears now one MatMulIntegerToFloat (with their bias when they had one)
    qkv_split: int  # fused qkv Linears written as three GEMMs, each transposed once into its heads' layout
    activations_shifted: int  # QuantizeLinear/DequantizeLinear nodes moved from int8 to uint8 (+128)
    layout_moves: int  # Transpose/Reshape nodes moved after the per-tensor quantizer (or scalar Mul) they fed
    scales_folded: int  # power-of-two scalar Muls folded into the GEMM before them (q's head_dim ** -0.5)
    activation_matmuls: int  # float MatMuls of two quantized activations (q @ k^T) now MatMulIntegerToFloat
    patch_embeddings: int  # Convs with kernel = stride now patches x weight as MatMulIntegerToFloat


def _shift_activations_to_uint8(graph: GraphEdit) -> int:
    """int8 activation Q/DQ nodes (not weights: their input is no constant) -> uint8, zero point + 128."""
    shifted = 0
    for node in graph.model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.input[0] in graph.constants or len(node.input) < 3:
            continue
        zero = graph.constants.get(node.input[2])
        if zero is None or zero.dtype != np.int8:
            continue
        node.input[2] = graph.initializer(f"{node.input[2]}.uint8", (zero.astype(np.int16) + 128).astype(np.uint8))
        if node.op_type == "QuantizeLinear":
            graph.stale.add(node.output[0])  # recorded as int8
        shifted += 1
    return shifted


def _fuse_linears(graph: GraphEdit) -> int:
    from onnx import helper

    linears = quantized_linears(graph)
    for linear in linears:
        activation, weight_dq, last = linear.activation, linear.weight, linear.last
        codes_t = graph.initializer(f"{weight_dq.input[0]}.transposed", np.ascontiguousarray(linear.codes.T))
        zero = lambda node: node.input[2] if len(node.input) > 2 else ""  # noqa: E731
        inputs = [activation.input[0], codes_t, activation.input[1], weight_dq.input[1], zero(activation), zero(weight_dq)]
        if linear.bias is not None:
            inputs.append(linear.bias[1])
        # The new node takes the last replaced node's place: its inputs all exist by then.
        graph.replaced[id(last)] = [helper.make_node("MatMulIntegerToFloat", inputs, [last.output[0]], name=f"{linear.matmul.name}.integer", domain=CONTRIB_DOMAIN)]
        graph.removed.update(map(id, linear.nodes))
        if graph.only_user(activation.output[0], linear.matmul):
            graph.removed.add(id(activation))
    return len(linears)


def _split_qkv(graph: GraphEdit) -> int:
    """Each fused qkv ``MatMulIntegerToFloat`` -> one per part on its column block (utils/qkv_split.py, k's
    transpose folded). Per-output-channel inputs (weight scale and zero point, bias) are sliced alike."""
    from onnx import helper

    def linear(gemm) -> FusedLinear:
        columns = graph.constants[gemm.input[1]].shape[1]

        def write_part(part: int, block: slice, out: str) -> list:
            inputs = list(gemm.input)
            for i, name in enumerate(inputs):  # the weight [in, out], and every per-output-channel vector
                value = graph.constants.get(name) if i in (1, 3, 5, 6) else None
                if value is not None and value.ndim >= 1 and value.shape[-1] == columns:
                    inputs[i] = graph.initializer(f"{name}.part{part}", np.ascontiguousarray(value[..., block]))
            return [helper.make_node("MatMulIntegerToFloat", inputs, [out], name=f"{gemm.name}.part{part}", domain=CONTRIB_DOMAIN)]

        return FusedLinear(gemm, (gemm,), columns, write_part)

    gemms = [n for n in graph.model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    return split_qkv(graph, map(linear, gemms), fold_k_transpose=True)


def _per_tensor(graph: GraphEdit, node) -> bool:
    """Every input after the first (a Q/DQ node's scale and zero point, a Mul's factor) is one constant value."""
    # At most 1-d: a [1, 1, 1, 1] factor would broadcast a lower-rank input up to rank 4.
    one = lambda name: name in graph.constants and graph.constants[name].size == 1 and graph.constants[name].ndim <= 1  # noqa: E731
    return all(one(name) for name in node.input[1:])


def _elementwise_with_one_value(graph: GraphEdit, node) -> bool:
    """A QuantizeLinear with one scale (and zero point), or a Mul of its first input by a constant scalar:
    nodes that commute with any change of layout of their first input."""
    return (node.op_type == "QuantizeLinear" or node.op_type == "Mul" and len(node.input) == 2) and _per_tensor(graph, node)


def _sink_layout_ops(model) -> int:
    """Move each Transpose/Reshape read only by a per-tensor quantizer or a scalar Mul to after that node,
    until none is left; returns the number of moves. Values are unchanged bit for bit."""
    graph_outputs = {out.name for out in model.graph.output}
    moves = 0
    while True:
        graph = GraphEdit(model)
        taken: set[int] = set()
        for layout in model.graph.node:
            readers = graph.consumers.get(layout.output[0], [])
            if layout.op_type not in ("Transpose", "Reshape") or len(readers) != 1 or layout.output[0] in graph_outputs:
                continue
            node = readers[0]
            if node.input[0] != layout.output[0] or not _elementwise_with_one_value(graph, node) or taken & {id(layout), id(node)}:
                continue
            # x -> layout -> a -> node -> b   becomes   x -> node -> a -> layout -> b, each in the other's place.
            x, a, b = layout.input[0], layout.output[0], node.output[0]
            node.input[0], node.output[0], layout.input[0], layout.output[0] = x, a, a, b
            graph.replaced[id(layout)], graph.replaced[id(node)] = [node], [layout]
            graph.stale.update([a, b])
            taken.update([id(layout), id(node)])
        if not taken:
            return moves
        moves += len(taken) // 2
        graph.commit()


def _fold_power_of_two_scales(graph: GraphEdit) -> int:
    """A Mul by a power-of-two scalar that alone reads a ``MatMulIntegerToFloat`` goes into that GEMM's
    weight scales and bias: ``(acc * s_x * s_w + bias) * 2^e == acc * s_x * (s_w * 2^e) + bias * 2^e``
    exactly in floating point."""
    folded = 0
    for mul in graph.model.graph.node:
        # Only a Mul: a per-tensor QuantizeLinear also commutes with layouts, but its scale divides.
        if mul.op_type != "Mul" or not _elementwise_with_one_value(graph, mul):
            continue
        gemm = graph.producers.get(mul.input[0])
        if gemm is None or gemm.op_type != "MatMulIntegerToFloat" or not graph.only_user(gemm.output[0], mul):
            continue
        factor = graph.constants[mul.input[1]].astype(np.float32).reshape(())
        if abs(np.frexp(factor)[0]) != 0.5:  # not a power of two: the fold would round
            continue
        for index in (3, 6):  # the weight scales, and the bias when there is one
            if len(gemm.input) > index and gemm.input[index]:
                name = gemm.input[index]
                gemm.input[index] = graph.initializer(f"{name}.times{factor:g}", (graph.constants[name] * factor).astype(np.float32))
        gemm.output[0] = mul.output[0]
        graph.removed.add(id(mul))
        folded += 1
    return folded


def _codes_source(graph: GraphEdit, codes: str):
    """(QuantizeLinear, [layout nodes]) when ``codes`` is a per-tensor QuantizeLinear's output moved only
    by Transposes/Reshapes, each the only reader of what it reads; else None."""
    layouts = []
    node = graph.producers.get(codes)
    while node is not None and node.op_type in ("Transpose", "Reshape") and len(graph.consumers.get(node.output[0], [])) == 1:
        layouts.append(node)
        node = graph.producers.get(node.input[0])
    if node is None or node.op_type != "QuantizeLinear" or len(graph.consumers.get(node.output[0], [])) != 1 or not _per_tensor(graph, node):
        return None
    return node, layouts


def _integer_activation_matmuls(graph: GraphEdit) -> int:
    """Each float ``MatMul`` of two per-tensor dequantized activations (``q @ k^T``) -> one integer
    ``MatMulIntegerToFloat``. Its x86 kernel wants the second operand signed, so that operand's
    QuantizeLinear goes from uint8 to int8 with its zero point - 128: the same grid and clamp, every
    code 128 lower."""
    from onnx import helper

    fused = 0
    for matmul in graph.model.graph.node:
        if matmul.op_type != "MatMul":
            continue
        dqs = [graph.producers.get(name) for name in matmul.input]
        if not all(dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) == 3 and dq.input[0] not in graph.constants
                   and _per_tensor(graph, dq) for dq in dqs):  # fmt: skip
            continue
        a, b = dqs
        zero = lambda dq: graph.constants[dq.input[2]]  # noqa: E731
        source = _codes_source(graph, b.input[0]) if zero(b).dtype == np.uint8 else None
        if zero(a).dtype != np.uint8 or source is None or not graph.only_user(b.output[0], matmul):
            continue
        quantize, layouts = source
        if list(quantize.input[1:]) != list(b.input[1:]):  # the pair must share its scale and zero point tensors
            continue
        signed = graph.initializer(f"{b.input[2]}.int8", (zero(b).astype(np.int16) - 128).astype(np.int8))
        quantize.input[2] = signed
        graph.stale.update([quantize.output[0], *(n.output[0] for n in layouts)])  # recorded as uint8
        inputs = [a.input[0], b.input[0], a.input[1], b.input[1], a.input[2], signed]
        graph.replaced[id(matmul)] = [helper.make_node("MatMulIntegerToFloat", inputs, [matmul.output[0]], name=f"{matmul.name}.integer", domain=CONTRIB_DOMAIN)]
        graph.removed.add(id(b))
        if graph.only_user(a.output[0], matmul):
            graph.removed.add(id(a))
        fused += 1
    return fused


def _recorded_shape(model, name: str) -> list | None:
    """A tensor's shape as the model records it (ints, or None for a symbolic dim); None if unrecorded."""
    for info in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    return None


def _patch_conv(graph: GraphEdit, conv):
    """(image DequantizeLinear, weight DequantizeLinear, int8 codes [out, c, kh, kw], patch rows, patch
    columns) when ``conv`` is a 2-d Conv of a per-tensor uint8 activation by an exported weight whose kernel
    is its stride and whose patches tile its recorded input exactly; else None."""
    from onnx import helper

    x_dq, w_dq = (graph.producers.get(name) for name in conv.input[:2])
    if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    codes = weight_codes(graph, w_dq, ndim=4)
    if codes is None or not graph.only_user(w_dq.output[0], conv) or len(x_dq.input) < 3 or not _per_tensor(graph, x_dq):
        return None
    if graph.constants[x_dq.input[2]].dtype != np.uint8:  # the zero point as the integer kernel wants it
        return None
    _, channels, kh, kw = codes.shape
    attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    if (list(attrs.get("kernel_shape", [kh, kw])) != [kh, kw] or list(attrs.get("strides", [])) != [kh, kw] or any(attrs.get("pads", [0]))
            or attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1])) or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"):  # fmt: skip
        return None
    out_shape, in_shape = _recorded_shape(graph.model, conv.output[0]), _recorded_shape(graph.model, conv.input[0])
    if out_shape is None or len(out_shape) != 4 or None in out_shape[2:]:
        return None
    ph, pw = out_shape[2:]
    if in_shape is None or in_shape[1:] != [channels, ph * kh, pw * kw]:  # rows or columns the Conv drops
        return None
    return x_dq, w_dq, codes, ph, pw


def _integer_patch_embedding(graph: GraphEdit) -> int:
    """Each 2-d ``Conv`` of quantized codes whose kernel equals its stride (a ViT's or Swin's patch
    embedding) -> the image codes cut into patches, one ``MatMulIntegerToFloat`` with the weight as
    ``[in, out]`` and the bias, and a transpose back to the Conv's NCHW output. Such a Conv is a matmul of
    non-overlapping patches; ONNX Runtime runs it in float from dequantized values."""
    from onnx import helper

    rewritten = 0
    for conv in graph.model.graph.node:
        patch = _patch_conv(graph, conv) if conv.op_type == "Conv" else None
        if patch is None:
            continue
        x_dq, w_dq, codes, ph, pw = patch
        (out, channels, kh, kw), name = codes.shape, conv.output[0]
        label = conv.name or name
        w_zero = graph.constants[w_dq.input[2]] if len(w_dq.input) > 2 else np.zeros(1, np.int8)
        inputs = [f"{name}.patches", graph.initializer(f"{w_dq.input[0]}.patches", np.ascontiguousarray(codes.reshape(out, -1).T)),
                  x_dq.input[1], w_dq.input[1], x_dq.input[2], graph.initializer(f"{w_dq.input[0]}.zero", np.broadcast_to(w_zero, (out,)).astype(np.int8))]  # fmt: skip
        if len(conv.input) > 2 and conv.input[2]:
            inputs.append(conv.input[2])
        # [b, c, ph*kh, pw*kw] -> [b, c, ph, kh, pw, kw] -> [b, ph, pw, c, kh, kw]: each patch's codes in the weight's (c, kh, kw) order
        six = graph.initializer(f"{name}.six_shape", np.array([0, channels, ph, kh, pw, kw], np.int64))
        rows = graph.initializer(f"{name}.rows_shape", np.array([0, ph, pw, channels * kh * kw], np.int64))
        graph.replaced[id(conv)] = [
            helper.make_node("Reshape", [x_dq.input[0], six], [f"{name}.six"], name=f"{label}.six"),
            helper.make_node("Transpose", [f"{name}.six"], [f"{name}.cut"], name=f"{label}.cut", perm=[0, 2, 4, 1, 3, 5]),
            helper.make_node("Reshape", [f"{name}.cut", rows], [inputs[0]], name=f"{label}.patches"),
            helper.make_node("MatMulIntegerToFloat", inputs, [f"{name}.nhwc"], name=f"{label}.integer", domain=CONTRIB_DOMAIN),
            helper.make_node("Transpose", [f"{name}.nhwc"], [name], name=f"{label}.nchw", perm=[0, 3, 1, 2]),
        ]
        graph.removed.add(id(w_dq))
        if graph.only_user(x_dq.output[0], conv):
            graph.removed.add(id(x_dq))
        rewritten += 1
    return rewritten


def save_ort_model(source: Path, target: Path) -> OrtRewrite:
    """Write ``source`` (a Q/DQ INT8 ONNX model from utils.onnx_export) to ``target`` in ONNX Runtime's
    form: int8 activations as uint8 (+128), each quantized Linear with its bias as one
    ``MatMulIntegerToFloat``, each fused qkv Linear as three, one per attention input, the layout
    changes around per-tensor quantizers on their codes, q's power-of-two scale in its GEMM, each
    matmul of two quantized activations as uint8 x int8, and the patch embedding as a GEMM of patches.
    Everything else - LayerNorm, softmax, the head - is left to ONNX Runtime's own Q/DQ fusions. The
    outputs equal ``source``'s in ONNX Runtime up to the order of float additions."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    graph = GraphEdit(model)
    shifted = _shift_activations_to_uint8(graph)
    fused = _fuse_linears(graph)
    graph.commit()
    graph = GraphEdit(model)  # the qkv split reads the fused nodes
    qkv = _split_qkv(graph)
    graph.commit()
    moves = _sink_layout_ops(model)
    graph = GraphEdit(model)  # the fold reads the GEMM -> Mul pairs the moves left
    folded = _fold_power_of_two_scales(graph)
    graph.commit()
    graph = GraphEdit(model)  # after the moves, q's and k's DequantizeLinear read their codes directly
    matmuls = _integer_activation_matmuls(graph)
    patches = _integer_patch_embedding(graph)
    graph.commit()
    if any(n.domain == CONTRIB_DOMAIN for n in model.graph.node) and not any(op.domain == CONTRIB_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    onnx.save(model, str(target))
    log.info("ONNX Runtime form: %d Linears as MatMulIntegerToFloat (%d qkv split in three), %d activation Q/DQ nodes as uint8, "
             "%d layout moves after quantizers, %d scales folded, %d activation matmuls and %d patch embeddings integer",
             fused, qkv, shifted, moves, folded, matmuls, patches)  # fmt: skip
    return OrtRewrite(linears_fused=fused, qkv_split=qkv, activations_shifted=shifted, layout_moves=moves, scales_folded=folded,
                      activation_matmuls=matmuls, patch_embeddings=patches)
