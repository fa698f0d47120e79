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

The attention's fused qkv Linear is exported as one GEMM, a reshape to ``[B, N, 3, heads, dim]``, one
transpose of all three to ``[3, B, heads, N, dim]``, a ``Split`` and, for k, a second transpose before
``q @ k^T``. Profiled on ViT-B (batch 32, 2 threads) the split and the transposes were ~100 ms of
~1200. :func:`save_ort_model` writes q, k and v as three ``MatMulIntegerToFloat`` on the weight's
column blocks, each transposed once straight into the layout its matmul reads (k to
``[B, heads, dim, N]``). Quantization is per tensor there, so moving a transpose across its
Q/DQ pair changes no value.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import onnx_graph

__all__ = ["OrtRewrite", "save_ort_model"]

log = logging.getLogger(__name__)

CONTRIB_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class OrtRewrite:
    """What :func:`save_ort_model` changed."""

    linears_fused: int  # quantized Linears now one MatMulIntegerToFloat (with their bias when they had one)
    qkv_split: int  # fused qkv Linears written as three GEMMs, each transposed once into its heads' layout
    activations_shifted: int  # QuantizeLinear/DequantizeLinear nodes moved from int8 to uint8 (+128)


class _Graph:
    """The model's nodes with name lookups, and the edits to apply at the end."""

    def __init__(self, model) -> None:
        self.model = model
        self.constants = onnx_graph.constants(model)
        self.producers = onnx_graph.producers(model)
        self.consumers = onnx_graph.consumers(model)
        self.removed: set[int] = set()  # id() of nodes to drop
        self.replaced: dict[int, list] = {}  # id() of a node -> the nodes written in its place
        self.new_initializers: dict[str, object] = {}
        self.stale: set[str] = set()  # tensors whose recorded type or shape the edits changed

    def initializer(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.new_initializers:
            self.new_initializers[name] = numpy_helper.from_array(value, name)
        return name

    def only_user(self, tensor: str, node) -> bool:
        return [id(n) for n in self.consumers.get(tensor, [])] == [id(node)]

    def sole_reader(self, tensor: str, op_type: str):
        """The one node that reads ``tensor`` when there is exactly one and it is an ``op_type``; else None."""
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def commit(self) -> None:
        nodes = [new for n in self.model.graph.node for new in self.replaced.get(id(n), [] if id(n) in self.removed else [n])]
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)
        self.model.graph.initializer.extend(self.new_initializers.values())
        used = {name for node in nodes for name in node.input}
        kept = [init for init in self.model.graph.initializer if init.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)
        # Shape inference's records of edited tensors are dropped; ONNX Runtime infers them again.
        infos = [info for info in self.model.graph.value_info if info.name not in self.stale]
        del self.model.graph.value_info[:]
        self.model.graph.value_info.extend(infos)


def _shift_activations_to_uint8(graph: _Graph) -> int:
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


def _weight_of(graph: _Graph, matmul):
    """(Transpose, weight DequantizeLinear, int8 codes [out, in]) when the MatMul's second input is the
    exported Linear weight ``int8 [out, in] -> DequantizeLinear(axis 0) -> Transpose``; else None."""
    transpose = graph.producers.get(matmul.input[1])
    if transpose is None or transpose.op_type != "Transpose" or not graph.only_user(transpose.output[0], matmul):
        return None
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    dq = graph.producers.get(transpose.input[0])
    if perm != [1, 0] or dq is None or dq.op_type != "DequantizeLinear" or not graph.only_user(dq.output[0], transpose):
        return None
    codes = graph.constants.get(dq.input[0])
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if codes is None or codes.dtype != np.int8 or codes.ndim != 2 or axis != 0:
        return None
    return transpose, dq, codes


def _bias_of(graph: _Graph, matmul, columns: int):
    """(Add, bias name) when the MatMul's only reader adds a constant vector of its output width; else None."""
    users = graph.consumers.get(matmul.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = [name for name in add.input if name != matmul.output[0]]
    bias = graph.constants.get(other[0]) if len(other) == 1 else None
    if bias is None or bias.dtype != np.float32 or bias.shape != (columns,):
        return None
    return add, other[0]


def _fuse_linears(graph: _Graph) -> int:
    from onnx import helper

    fused = 0
    for matmul in list(graph.model.graph.node):
        if matmul.op_type != "MatMul":
            continue
        activation = graph.producers.get(matmul.input[0])
        weight = _weight_of(graph, matmul)
        if activation is None or activation.op_type != "DequantizeLinear" or weight is None:
            continue
        transpose, weight_dq, codes = weight
        bias = _bias_of(graph, matmul, codes.shape[0])
        codes_t = graph.initializer(f"{weight_dq.input[0]}.transposed", np.ascontiguousarray(codes.T))
        zero = lambda node: node.input[2] if len(node.input) > 2 else ""  # noqa: E731
        inputs = [activation.input[0], codes_t, activation.input[1], weight_dq.input[1], zero(activation), zero(weight_dq)]
        last = matmul if bias is None else bias[0]  # the new node takes the last replaced node's place: its inputs all exist by then
        if bias is not None:
            inputs.append(bias[1])
        graph.replaced[id(last)] = [helper.make_node("MatMulIntegerToFloat", inputs, [last.output[0]], name=f"{matmul.name}.integer", domain=CONTRIB_DOMAIN)]
        graph.removed.update({id(matmul), id(transpose), id(weight_dq), id(last)})
        if graph.only_user(activation.output[0], matmul):
            graph.removed.add(id(activation))
        fused += 1
    return fused


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _five_dim_shape(graph: _Graph, name: str) -> list | None:
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


def _qkv_pattern(graph: _Graph, gemm):
    """(Reshape, Transpose, Split, [Squeeze per part], [b, N, parts, heads, dim]) when ``gemm``'s
    output goes ``Reshape [b, N, parts, heads, dim] -> Transpose(2, 0, 3, 1, 4) -> Split(axis 0) ->
    Squeeze(0)`` per part, as timm's ViT and Swin attentions split their fused qkv; else None."""
    reshape = graph.sole_reader(gemm.output[0], "Reshape")
    shape = _five_dim_shape(graph, reshape.input[1]) if reshape is not None else None
    if shape is None or not all(isinstance(v, int) for v in shape[2:]) or max(shape[3:]) < 1:
        return None  # the parts must be known, and heads or dim
    transpose = graph.sole_reader(reshape.output[0], "Transpose")
    if transpose is None or _perm(transpose) != [2, 0, 3, 1, 4]:
        return None
    split = graph.sole_reader(transpose.output[0], "Split")
    if split is None or next((a.i for a in split.attribute if a.name == "axis"), 0) != 0 or len(split.output) != shape[2]:
        return None
    squeezes = [graph.sole_reader(out, "Squeeze") for out in split.output]
    if any(s is None or graph.constants.get(s.input[1], np.zeros(0)).tolist() != [0] for s in squeezes):
        return None
    return reshape, transpose, split, squeezes, shape


def _k_transpose(graph: _Graph, part):
    """(DequantizeLinear, Transpose) when the part goes ``QuantizeLinear -> DequantizeLinear -> Transpose
    (0, 1, 3, 2)`` into its matmul, as k does for ``q @ k^T``; else None."""
    quantize = graph.sole_reader(part, "QuantizeLinear")
    dequantize = graph.sole_reader(quantize.output[0], "DequantizeLinear") if quantize is not None else None
    transpose = graph.sole_reader(dequantize.output[0], "Transpose") if dequantize is not None else None
    if transpose is None or _perm(transpose) != [0, 1, 3, 2] or len(graph.consumers.get(transpose.output[0], [])) != 1:
        return None
    return dequantize, transpose


def _split_qkv(graph: _Graph) -> int:
    """Each fused qkv ``MatMulIntegerToFloat`` -> one per part on its column block, reshaped to
    ``[b, N, heads, dim]`` and transposed once to ``[b, heads, N, dim]`` (k: ``[b, heads, dim, N]``, its
    own transpose dropped). Per-output-channel inputs (weight scale and zero point, bias) are sliced alike."""
    from onnx import helper

    split_count = 0
    for gemm in [n for n in graph.model.graph.node if n.op_type == "MatMulIntegerToFloat"]:
        pattern = _qkv_pattern(graph, gemm)
        if pattern is None:
            continue
        reshape, transpose, split, squeezes, (batch, tokens, parts, heads, dim) = pattern
        width = graph.constants[gemm.input[1]].shape[1] // parts
        dim = width // heads if dim < 1 else dim  # the reshape may leave heads or dim as -1
        heads_shape, nodes = f"{reshape.input[1]}.heads", []
        entries = [batch, tokens, width // dim, dim]
        if all(isinstance(v, int) for v in entries):
            graph.initializer(heads_shape, np.array(entries, dtype=np.int64))
        else:  # batch or tokens computed at run time: a Concat like the one it replaces
            inputs = [v if isinstance(v, str) else graph.initializer(f"{heads_shape}.{i}", np.array([v], dtype=np.int64)) for i, v in enumerate(entries)]
            nodes.append(helper.make_node("Concat", inputs, [heads_shape], name=f"{reshape.name}.heads_shape", axis=0))
        for part, squeeze in enumerate(squeezes):
            columns = slice(part * width, (part + 1) * width)
            inputs = list(gemm.input)
            for i, name in enumerate(inputs):  # the weight [in, out], and every per-output-channel vector
                value = graph.constants.get(name) if i in (1, 3, 5, 6) else None
                if value is not None and value.ndim >= 1 and value.shape[-1] == parts * width:
                    inputs[i] = graph.initializer(f"{name}.part{part}", np.ascontiguousarray(value[..., columns]))
            out = f"{gemm.output[0]}.part{part}"
            perm = [0, 2, 1, 3]
            k = _k_transpose(graph, squeeze.output[0])
            if k is not None:
                dequantize, k_transpose = k
                reader = graph.consumers[k_transpose.output[0]][0]
                reader.input[list(reader.input).index(k_transpose.output[0])] = dequantize.output[0]
                graph.removed.add(id(k_transpose))
                graph.stale.update([squeeze.output[0], graph.producers[dequantize.input[0]].output[0], dequantize.output[0]])
                perm = [0, 2, 3, 1]
            nodes += [
                helper.make_node("MatMulIntegerToFloat", inputs, [out], name=f"{gemm.name}.part{part}", domain=CONTRIB_DOMAIN),
                helper.make_node("Reshape", [out, heads_shape], [f"{out}.heads"], name=f"{reshape.name}.part{part}"),
                helper.make_node("Transpose", [f"{out}.heads"], [squeeze.output[0]], name=f"{transpose.name}.part{part}", perm=perm),
            ]
        graph.replaced[id(gemm)] = nodes
        graph.removed.update({id(gemm), id(reshape), id(transpose), id(split), *map(id, squeezes)})
        old_shape = graph.producers.get(reshape.input[1])
        if old_shape is not None and graph.only_user(reshape.input[1], reshape):
            graph.removed.add(id(old_shape))
        split_count += 1
    return split_count


def save_ort_model(source: Path, target: Path) -> OrtRewrite:
    """Write ``source`` (a Q/DQ INT8 ONNX model from utils.onnx_export) to ``target`` in ONNX Runtime's
    form: int8 activations as uint8 (+128), each quantized Linear with its bias as one
    ``MatMulIntegerToFloat``, and each fused qkv Linear as three, one per attention input. Everything
    else - convolution, the q.k matmul, LayerNorm, softmax - is left to ONNX Runtime's own Q/DQ fusions. The outputs equal ``source``'s in ONNX Runtime up to the order of
    float additions."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    graph = _Graph(model)
    shifted = _shift_activations_to_uint8(graph)
    fused = _fuse_linears(graph)
    graph.commit()
    graph = _Graph(model)  # the qkv split reads the fused nodes
    qkv = _split_qkv(graph)
    graph.commit()
    if fused and not any(op.domain == CONTRIB_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    onnx.save(model, str(target))
    log.info("ONNX Runtime form: %d Linears as MatMulIntegerToFloat (%d qkv split in three), %d activation Q/DQ nodes as uint8", fused, qkv, shifted)
    return OrtRewrite(linears_fused=fused, qkv_split=qkv, activations_shifted=shifted)
