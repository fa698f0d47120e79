"""OpenVINO's own form of the Q/DQ INT8 model, saved as IR: the same integers, no copy of the qkv output.

The portable ``int8.onnx`` (utils/onnx_export.py) splits the attention's fused qkv output with a 5-d
transpose that OpenVINO's CPU plugin runs as a plain strided copy, between the qkv GEMM and the q and k
quantizers. :func:`save_openvino_model` writes each fused qkv Linear as three Q/DQ Linears on the
weight's column blocks (utils/qkv_split.py): OpenVINO then takes each part's transpose into its
attention subgraph and the q and k quantizers into the GEMMs' outputs. Profiled on DeiT-tiny
``cpu_int8`` (batch 32, 2 threads) the transposes (8.4 ms of ~100) and 24 of the 38 ``FakeQuantize``
passes are gone; paired against the unsplit IR, 1.04x / 1.10x on DeiT-tiny at batch 1 / 32 and 1.01x /
1.04x on ViT-B (docs/deploy.md). The values are those of ``int8.onnx`` up to where OpenVINO rounds a
fused quantizer's input (a few ties the other way).

The IR is read through OpenVINO's ONNX frontend (``Core.read_model``), not ``ov.convert_model``, which
rewrites the Q/DQ pattern into one the CPU plugin ran 1.6x slower here (it fuses the quantized q.k
matmul and softmax into a float ``ScaledDotProductAttention``): DeiT-tiny ``cpu_int8``, batch 32,
210 against 340 images/s. Weights stay as stored in the ONNX model: int8 weights stay int8, and the
float ones are not compressed to FP16.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.onnx_graph import GraphEdit, QuantizedLinear, quantized_linears
from utils.openvino_core import openvino_core
from utils.qkv_split import FusedLinear, split_qkv

__all__ = ["OpenVinoRewrite", "save_openvino_model"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpenVinoRewrite:
    """What :func:`save_openvino_model` changed."""

    qkv_split: int  # fused qkv Linears written as three Q/DQ Linears, each transposed once into its heads' layout


def _splittable(graph: GraphEdit, linear: QuantizedLinear) -> FusedLinear:
    """A quantized Linear whose parts keep its Q/DQ form, each on its rows of ``W`` (and of the per-channel
    scale and zero point, and of the bias)."""
    from onnx import helper

    rows = linear.codes.shape[0]

    def sliced(name: str, part: int, block: slice) -> str:  # a per-tensor scale or zero point stays as it is
        value = graph.constants[name]
        return graph.initializer(f"{name}.part{part}", np.ascontiguousarray(value[block])) if value.ndim and value.shape[0] == rows else name

    def write_part(part: int, block: slice, out: str) -> list:
        name = f"{linear.matmul.name}.part{part}"
        product = out if linear.bias is None else f"{out}.matmul"
        nodes = [
            helper.make_node("DequantizeLinear", [sliced(i, part, block) for i in linear.weight.input], [f"{name}.weight"], name=f"{name}.weight", axis=0),
            helper.make_node("Transpose", [f"{name}.weight"], [f"{name}.weight_t"], name=f"{name}.weight_t", perm=[1, 0]),
            helper.make_node("MatMul", [linear.matmul.input[0], f"{name}.weight_t"], [product], name=name),
        ]
        if linear.bias is not None:
            nodes.append(helper.make_node("Add", [product, sliced(linear.bias[1], part, block)], [out], name=f"{name}.bias"))
        return nodes

    return FusedLinear(linear.last, linear.nodes, rows, write_part)


def save_openvino_model(source: Path, xml: Path) -> OpenVinoRewrite:
    """Write ``source`` (a Q/DQ INT8 ONNX model from utils.onnx_export) as OpenVINO IR at ``xml`` (and the
    ``.bin`` beside it), each fused qkv Linear as three. Returns what changed."""
    import onnx
    import openvino as ov

    model = onnx.load(str(source))
    graph = GraphEdit(model)
    qkv = split_qkv(graph, [_splittable(graph, linear) for linear in quantized_linears(graph)], fold_k_transpose=False)
    graph.commit()
    ov.save_model(openvino_core().read_model(model.SerializeToString()), str(xml), compress_to_fp16=False)
    log.info("OpenVINO form: %d qkv Linears split in three", qkv)
    return OpenVinoRewrite(qkv_split=qkv)
