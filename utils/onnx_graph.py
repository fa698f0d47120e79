"""Lookups over an ONNX graph that the export checks and the runtime-specific rewrites share."""
from __future__ import annotations

import numpy as np

__all__ = ["constants", "consumers", "producers"]


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
