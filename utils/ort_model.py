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
    activations_shifted: int  # QuantizeLinear/DequantizeLinear nodes moved from int8 to uint8 (+128)


class _Graph:
    """The model's nodes with name lookups, and the edits to apply at the end."""

    def __init__(self, model) -> None:
        self.model = model
        self.constants = onnx_graph.constants(model)
        self.producers = onnx_graph.producers(model)
        self.consumers = onnx_graph.consumers(model)
        self.removed: set[int] = set()  # id() of nodes to drop
        self.replaced: dict[int, object] = {}  # id() of a node -> the node written in its place
        self.new_initializers: dict[str, object] = {}

    def initializer(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        if name not in self.new_initializers:
            self.new_initializers[name] = numpy_helper.from_array(value, name)
        return name

    def only_user(self, tensor: str, node) -> bool:
        return [id(n) for n in self.consumers.get(tensor, [])] == [id(node)]

    def commit(self) -> None:
        nodes = [self.replaced.get(id(n), n) for n in self.model.graph.node if id(n) not in self.removed or id(n) in self.replaced]
        del self.model.graph.node[:]
        self.model.graph.node.extend(nodes)
        self.model.graph.initializer.extend(self.new_initializers.values())
        used = {name for node in nodes for name in node.input}
        kept = [init for init in self.model.graph.initializer if init.name in used]
        del self.model.graph.initializer[:]
        self.model.graph.initializer.extend(kept)


def _shift_activations_to_uint8(graph: _Graph) -> int:
    """int8 activation Q/DQ nodes (not weights: their input is no constant) -> uint8, zero point + 128."""
    shifted = 0
    retyped: set[str] = set()
    for node in graph.model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.input[0] in graph.constants or len(node.input) < 3:
            continue
        zero = graph.constants.get(node.input[2])
        if zero is None or zero.dtype != np.int8:
            continue
        node.input[2] = graph.initializer(f"{node.input[2]}.uint8", (zero.astype(np.int16) + 128).astype(np.uint8))
        if node.op_type == "QuantizeLinear":
            retyped.add(node.output[0])
        shifted += 1
    # Shape inference recorded those outputs as int8: drop the stale entries (ONNX Runtime re-infers them).
    kept = [info for info in graph.model.graph.value_info if info.name not in retyped]
    del graph.model.graph.value_info[:]
    graph.model.graph.value_info.extend(kept)
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
        graph.replaced[id(last)] = helper.make_node("MatMulIntegerToFloat", inputs, [last.output[0]], name=f"{matmul.name}.integer", domain=CONTRIB_DOMAIN)
        graph.removed.update({id(matmul), id(transpose), id(weight_dq), id(last)})
        if graph.only_user(activation.output[0], matmul):
            graph.removed.add(id(activation))
        fused += 1
    return fused


def save_ort_model(source: Path, target: Path) -> OrtRewrite:
    """Write ``source`` (a Q/DQ INT8 ONNX model from utils.onnx_export) to ``target`` in ONNX Runtime's
    form: int8 activations as uint8 (+128) and each quantized Linear with its bias as one
    ``MatMulIntegerToFloat``. Everything else - convolution, the q.k matmul, LayerNorm, softmax - is left
    to ONNX Runtime's own Q/DQ fusions. The outputs equal ``source``'s in ONNX Runtime up to the order of
    float additions."""
    import onnx
    from onnx import helper

    model = onnx.load(str(source))
    graph = _Graph(model)
    shifted = _shift_activations_to_uint8(graph)
    fused = _fuse_linears(graph)
    graph.commit()
    if fused and not any(op.domain == CONTRIB_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    onnx.save(model, str(target))
    log.info("ONNX Runtime form: %d Linears as MatMulIntegerToFloat, %d activation Q/DQ nodes as uint8", fused, shifted)
    return OrtRewrite(linears_fused=fused, activations_shifted=shifted)
