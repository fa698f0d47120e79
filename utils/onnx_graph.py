"""Lookups over an ONNX graph, and the edits, that the export checks and the runtime-specific rewrites
(utils/ort_model.py, utils/openvino_model.py) share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GraphEdit", "QuantizedLinear", "constants", "consumers", "perm", "producers", "quantized_linears", "weight_codes"]


def constants(model) -> dict[str, np.ndarray]:
    """Every constant tensor by name: initializers and ``Constant`` nodes' outputs."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def consumers(model) -> dict[str, list]:
    """Tensor name -> the nodes that read it, in graph order."""
    users: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def producers(model) -> dict[str, object]:
    """Tensor name -> the node that writes it."""
    return {out: node for node in model.graph.node for out in node.output}


def perm(node) -> list[int] | None:
    """A ``Transpose`` node's permutation (None when it has no ``perm`` attribute)."""
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


class GraphEdit:
    """A model's nodes with name lookups, and the edits to apply at the end (:meth:`commit`)."""

    def __init__(self, model) -> None:
        self.model = model
        self.constants = constants(model)
        self.producers = producers(model)
        self.consumers = consumers(model)
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
        # Shape inference's records of edited tensors are dropped; the runtimes infer them again.
        infos = [info for info in self.model.graph.value_info if info.name not in self.stale]
        del self.model.graph.value_info[:]
        self.model.graph.value_info.extend(infos)


def weight_codes(graph: GraphEdit, dq, ndim: int) -> np.ndarray | None:
    """The int8 codes of an exported weight (a constant of rank ``ndim`` read by a ``DequantizeLinear``
    per output channel, axis 0), or None when ``dq`` is not one."""
    codes = graph.constants.get(dq.input[0])
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if codes is None or codes.dtype != np.int8 or codes.ndim != ndim or axis != 0:
        return None
    return codes


def _linear_weight(graph: GraphEdit, matmul):
    """(Transpose, weight DequantizeLinear, int8 codes [out, in]) when the MatMul's second input is the
    exported Linear weight ``int8 [out, in] -> DequantizeLinear(axis 0) -> Transpose``; else None."""
    transpose = graph.producers.get(matmul.input[1])
    if transpose is None or transpose.op_type != "Transpose" or not graph.only_user(transpose.output[0], matmul):
        return None
    dq = graph.producers.get(transpose.input[0])
    if perm(transpose) != [1, 0] or dq is None or dq.op_type != "DequantizeLinear" or not graph.only_user(dq.output[0], transpose):
        return None
    codes = weight_codes(graph, dq, ndim=2)
    return None if codes is None else (transpose, dq, codes)


def _linear_bias(graph: GraphEdit, matmul, columns: int):
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


@dataclass(frozen=True)
class QuantizedLinear:
    """An exported quantized Linear: ``DequantizeLinear(x_q) -> MatMul <- Transpose <- DequantizeLinear(W_q)``,
    with its bias ``Add`` when it has one."""

    matmul: Any
    activation: Any  # the input's DequantizeLinear
    transpose: Any  # the weight's Transpose
    weight: Any  # the weight's DequantizeLinear (axis 0)
    codes: np.ndarray  # the int8 weight [out, in]
    bias: tuple | None  # (Add, bias name), or None without a bias

    @property
    def last(self):
        """The node whose output is the Linear's."""
        return self.matmul if self.bias is None else self.bias[0]

    @property
    def nodes(self) -> tuple:
        """The weight's nodes, the MatMul and the bias Add: what a rewrite replaces (the input's
        DequantizeLinear may feed other readers)."""
        return (self.weight, self.transpose, self.matmul, *((self.bias[0],) if self.bias is not None else ()))


def quantized_linears(graph: GraphEdit) -> list[QuantizedLinear]:
    """Every exported quantized Linear of the graph, in graph order."""
    found = []
    for matmul in graph.model.graph.node:
        activation = graph.producers.get(matmul.input[0]) if matmul.op_type == "MatMul" else None
        weight = _linear_weight(graph, matmul) if activation is not None and activation.op_type == "DequantizeLinear" else None
        if weight is not None:
            transpose, dq, codes = weight
            found.append(QuantizedLinear(matmul, activation, transpose, dq, codes, _linear_bias(graph, matmul, codes.shape[0])))
    return found
