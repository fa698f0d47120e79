"""The integer program: a list of integer operations on named tensors, and its PyTorch executor.

A :class:`Program` is what :mod:`models.integer.lower` makes of a calibrated QVit (FQ-ViT, arXiv
2111.13824, every operation in integers): :class:`Node` s in execution order, each an operation of
:data:`models.integer.ops.OPS` with integer constants and attributes, reading and writing named
:class:`Value` s. Every value is an integer tensor (uint8, int8, uint16, int16, int32) except the
program's input (the float image, quantized by the first node) and output (the int32 logits times one
float scale, by the last). Each value records its bounds and, where it has one, its grid - what its
integers mean, ``(code - zero) * scale`` - and the quantization point of the fake-quant model it
realizes, so that the profiler and the golden vectors can compare it with float32.

:func:`run` executes a program on images in PyTorch (CPU or CUDA) with exact integer arithmetic: the
same integers as :mod:`utils.integer_onnx`'s ONNX form, which tests check on every node.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from models.integer.node import Node
from models.integer.ops import OPS

__all__ = ["Grid", "Node", "Program", "Value", "run", "TORCH_STORAGE"]

# How each integer type of the program is held in PyTorch (uint16 as int32: few ops take torch.uint16).
TORCH_STORAGE = {
    "uint8": torch.uint8, "int8": torch.int8, "uint16": torch.int32, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "float32": torch.float32,
}  # fmt: skip


@dataclass
class Grid:
    """What a value's integers mean. ``uniform`` (and ``fixed``): ``(code - zero) * scale``, both per
    channel (the last axis) or scalars; ``log2``: ``scale * 2^-code``, the code ``zero`` meaning 0;
    ``twin_signed`` (PTQ4ViT's post-GELU grid): ``(code - zero)`` times ``scale`` at or above ``zero``,
    times ``fine`` below; ``twin_unsigned`` (its post-softmax grid): ``code * fine`` below ``zero``,
    ``(code - zero) * scale`` from it."""

    kind: str
    scale: np.ndarray
    zero: np.ndarray
    fine: np.ndarray | None = None

    def dequantize(self, codes: Tensor) -> Tensor:
        dev = codes.device
        scale = torch.as_tensor(self.scale, dtype=torch.float64, device=dev)
        zero = torch.as_tensor(self.zero, dtype=torch.float64, device=dev)
        c = codes.to(torch.float64)
        if self.kind == "log2":
            return torch.where(c >= zero, 0.0, scale * torch.exp2(-c)).float()
        if self.kind.startswith("twin"):
            fine = torch.as_tensor(self.fine, dtype=torch.float64, device=dev)
            low = (c - zero) * fine if self.kind == "twin_signed" else c * fine
            return torch.where(c >= zero, (c - zero) * scale, low).float()
        return ((c - zero) * scale).float()


@dataclass
class Value:
    """A tensor of the program: its ONNX element type, the bounds of its elements, and its grid and
    fake-quant point where it has them."""

    name: str
    dtype: str
    lo: int | float
    hi: int | float
    grid: Grid | None = None
    point: str | None = None


@dataclass
class Program:
    """An integer program: nodes in execution order, the values they read and write, the float image
    ``input`` and the float logits ``output``; ``stages`` name the index of the first node of each
    stage (the embedding, each block of ``QVit.block_sequence()``, the head) for lock-step profiling."""

    nodes: list[Node]
    values: dict[str, Value]
    input: str
    output: str
    stages: list[tuple[str, int]]
    meta: dict[str, Any] = field(default_factory=dict)

    def last_uses(self) -> dict[str, int]:
        """The index of the last node reading each value (values read by none: their producer's)."""
        last: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for name in (*node.inputs, *node.outputs):
                last[name] = i
        return last

    def constants(self, device: torch.device) -> list[dict[str, Tensor]]:
        """Every node's constants as tensors on ``device``: int8 weights as they are, other integers as
        int64 (the arithmetic's type), float ones as they are."""
        out = []
        for node in self.nodes:
            out.append({k: torch.as_tensor(v if v.dtype.kind == "f" or v.dtype == np.int8 else v.astype(np.int64), device=device)
                        for k, v in node.consts.items()})  # fmt: skip
        return out


Recorder = Callable[[int, Node, list[Tensor], list[Tensor]], None]


def run(program: Program, images: Tensor, record: Recorder | None = None, stop: int | None = None,
        env: dict[str, Tensor] | None = None, start: int = 0, constants: list[dict[str, Tensor]] | None = None) -> dict[str, Tensor]:  # fmt: skip
    """Execute nodes ``start .. stop`` of ``program`` (all by default) on ``images`` (float, on the device
    that runs it) and return the values still live; ``record(index, node, inputs, outputs)`` sees every
    node. ``env`` carries live values between partial runs (the profiler's stages)."""
    device = images.device
    constants = constants if constants is not None else program.constants(device)
    env = {program.input: images} if env is None else env
    last = program.last_uses()
    stop = len(program.nodes) if stop is None else stop
    keep = {program.output}
    for i in range(start, stop):
        node = program.nodes[i]
        inputs = [env[name] for name in node.inputs]
        outputs = OPS[node.op](node, inputs, constants[i])
        for name, out in zip(node.outputs, outputs):
            env[name] = out.to(TORCH_STORAGE[program.values[name].dtype])
        if record is not None:
            record(i, node, inputs, [env[name] for name in node.outputs])
        for name in (*node.inputs, *node.outputs):
            if last[name] <= i and name not in keep:
                env.pop(name, None)
    return env
