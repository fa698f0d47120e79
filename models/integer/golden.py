"""Golden vectors: every tensor and constant of the integer program on a few images, for checking hardware.

A hardware team implementing FQ-ViT's integer ViT (FQ-ViT, arXiv 2111.13824) compares its own layer
outputs with these, layer by layer. :func:`write_golden` runs the program (the PyTorch executor, the
same integers as ``int_only.onnx``) and writes into a folder:

* ``program.json`` - the index: format ``qvit-golden/1``; the model and recipe; each node in execution
  order (name, operation, input and output tensor names, integer attributes, the keys of its
  constants); each tensor's element type, shape and, where it has one, its grid (``uniform``:
  ``real = (code - zero) * scale``; ``log2``: ``real = scale * 2^-code``, the top code 0) and the
  fake-quant point it realizes; the operations' formulas are in docs/integer.md;
* ``tensors.npz`` - every tensor, keyed by its name (the float images under ``image``, the int32
  logits under ``logits``, their float form under ``logits.float``), stored in its element type;
* ``constants.npz`` - every node's constants, keyed ``<node>/<constant>`` (weights int8 ``[K, N]``,
  multipliers and offsets int64, tables uint8, the LayerNorm's per-channel integers, ...).

Everything is an integer but the input images, the input quantization's scale and the logits' scale.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.integer.program import Node, Program, run
from models.integer.softmax import MANTISSA_LOG2

__all__ = ["FORMAT", "node_record", "write_golden"]

FORMAT = "qvit-golden/1"


def node_record(node: Node) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A node's JSON-ready attributes and all of its arrays (its constants, and the arrays inside its
    LayerNorm / softmax attributes), keyed ``<node>/<name>``."""
    attrs: dict[str, Any] = {}
    arrays = {f"{node.name}/{k}": np.asarray(v) for k, v in node.consts.items()}
    for key, value in node.attrs.items():
        if dataclasses.is_dataclass(value):
            fields = {}
            for f in dataclasses.fields(value):
                v = getattr(value, f.name)
                if isinstance(v, np.ndarray):
                    arrays[f"{node.name}/{f.name}"] = v
                    fields[f.name] = f"constants.npz:{node.name}/{f.name}"
                elif dataclasses.is_dataclass(v):
                    fields[f.name] = dataclasses.asdict(v)
                else:
                    fields[f.name] = v
            attrs[key] = fields
        else:
            attrs[key] = list(value) if isinstance(value, tuple) else value
    return attrs, arrays


def _grid(program: Program, name: str) -> dict | None:
    grid = program.values[name].grid
    if grid is None:
        return None
    out = {"kind": grid.kind, "scale": np.asarray(grid.scale, np.float64).tolist(), "zero": np.asarray(grid.zero, np.float64).tolist()}
    if grid.fine is not None:
        out["fine"] = np.asarray(grid.fine, np.float64).tolist()
    return out


def write_golden(program: Program, images: torch.Tensor, folder: Path) -> dict:
    """Run ``program`` on ``images`` (CPU) and write the three files into ``folder`` (created); returns
    what ``program.json`` says about its size."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {program.input: images.numpy()}

    def record(i, node, inputs, outputs):
        for name, out in zip(node.outputs, outputs):
            tensors[name] = out.cpu().numpy().astype(program.values[name].dtype)

    with torch.no_grad():
        run(program, images.cpu(), record=record)
    constants: dict[str, np.ndarray] = {}
    nodes = []
    for node in program.nodes:
        attrs, arrays = node_record(node)
        constants.update(arrays)
        nodes.append({"name": node.name, "op": node.op, "inputs": node.inputs, "outputs": node.outputs, "attrs": attrs,
                      "constants": sorted(arrays)})  # fmt: skip
    index = {
        "format": FORMAT,
        "meta": program.meta,
        "images": len(images),
        "input": program.input,
        "output": program.output,
        "log2_mantissa_fit": dataclasses.asdict(MANTISSA_LOG2),
        "nodes": nodes,
        "tensors": {name: {"dtype": str(tensors[name].dtype), "shape": list(tensors[name].shape), "grid": _grid(program, name),
                           "point": program.values[name].point} for name in tensors},  # fmt: skip
    }
    np.savez_compressed(folder / "tensors.npz", **tensors)
    np.savez_compressed(folder / "constants.npz", **constants)
    (folder / "program.json").write_text(json.dumps(index, indent=1, default=_json_default))
    return {"images": len(images), "tensors": len(tensors), "constants": len(constants), "nodes": len(nodes)}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")
