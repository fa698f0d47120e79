"""ONNX export of a calibrated QVit with QuantizeLinear/DequantizeLinear pairs (TensorRT explicit quantization).

TensorRT 10+ builds INT8 only from Q/DQ in the graph (implicit calibration and the INT8 builder flag are
gone in 11), so the graph carries the precisions: symmetric int8 (zero point 0), per-tensor for
activations, per-channel along axis 0 for weights. The QVit's own quantizers mark where: the inputs of
every Conv/Linear, both attention matmuls' operands (q with the attention scale folded in, k, v) and
the softmax output. Each quantization point gets an export *plan*:

* ``qdq`` - symmetric 8-bit uniform: exported exactly as calibrated;
* ``mapped`` - asymmetric 8-bit uniform per tensor (FQ-ViT's uint8 activations): exported as symmetric
  int8 covering the calibrated range, scale max(|lo|, |hi|) / 127 (coarser than the fake-quant model);
* ``float`` - what TensorRT cannot express (log2 grids, power-of-two-factor or other per-channel
  activation scales, other bit widths): no Q/DQ, the tensor stays in floating point.

The recipe ``trt_int8`` has only ``qdq`` points: its fake-quant model is what deploys.

Export runs the QVit in FP32 mode with a forward hook on every exported quantizer that returns
``torch.fake_quantize_per_{tensor,channel}_affine`` of its input, which ONNX exporters lower to a
QuantizeLinear/DequantizeLinear pair.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.ptq.quantizers import UniformQuantizer
from models.ptq.tensor_quantizer import TensorQuantizer
from models.quant_vit import QVit
from utils.profiler import point_name

__all__ = ["ExportPoint", "check_qdq", "export_onnx", "export_plan", "qdq_hooks", "qdq_scales", "simplify"]

INT8_MIN, INT8_MAX = -128, 127


@dataclass(frozen=True)
class ExportPoint:
    name: str
    plan: str  # "qdq", "mapped" or "float"
    reason: str
    scale: Tensor | None  # float32 scale(s) exported; None for float points
    axis: int | None  # channel axis for per-channel scales

    @property
    def quantized(self) -> bool:
        return self.plan != "float"


def _plan(name: str, q: TensorQuantizer) -> ExportPoint:
    spec = q.spec
    bt = spec.bit_type
    if not q.enabled:
        return ExportPoint(name, "float", "disabled", None, None)
    if name.endswith("softmax.input"):
        return ExportPoint(name, "float", "integer-softmax scores (TensorRT runs the softmax in float)", None, None)
    if not isinstance(q.method, UniformQuantizer):
        return ExportPoint(name, "float", f"{spec.quantizer} grid (TensorRT Q/DQ is uniform)", None, None)
    if bt.bits != 8:
        return ExportPoint(name, "float", f"{bt.bits}-bit (TensorRT Q/DQ is 8-bit)", None, None)
    if q.per_channel and not q.static:
        why = "power-of-two-factor" if spec.power_of_two_factor else "per-channel"
        return ExportPoint(name, "float", f"{why} activation scales (TensorRT activations are per-tensor)", None, None)
    scale = q.scale.detach().float().cpu()
    if bt.symmetric:
        return ExportPoint(name, "qdq", "int8, zero point 0", scale, q.channel_axis if q.per_channel else None)
    if q.per_channel:
        return ExportPoint(name, "float", "asymmetric per-channel weights", None, None)
    lo = (bt.qmin - float(q.zero_point)) * float(scale)
    hi = (bt.qmax - float(q.zero_point)) * float(scale)
    mapped = torch.tensor(max(abs(lo), abs(hi)) / INT8_MAX)
    return ExportPoint(name, "mapped", f"{bt.name} [{lo:.4g}, {hi:.4g}] mapped to symmetric int8", mapped, None)


def export_plan(qvit: QVit) -> list[ExportPoint]:
    """How each quantization point of ``qvit`` (calibrated) is exported, in model order."""
    if not qvit.is_calibrated:
        raise RuntimeError("export needs a calibrated QVit")
    return [_plan(point_name(path), q) for path, q in qvit.quantizers().items()]


@contextlib.contextmanager
def qdq_hooks(qvit: QVit, plan: list[ExportPoint]) -> Iterator[None]:
    """Within: the QVit in FP32 mode with every exported point fake-quantized by torch's Q/DQ ops."""
    by_name = {p.name: p for p in plan}
    handles = []

    def hook(point: ExportPoint):
        def qdq(module: TensorQuantizer, args: tuple, output: Tensor) -> Tensor:
            if module.rounded is not None:
                output = module.rounded.to(output.dtype)  # GPTQ's weight, already on the grid: Q/DQ keeps it
            if point.axis is None:
                return torch.fake_quantize_per_tensor_affine(output, float(point.scale), 0, INT8_MIN, INT8_MAX)
            scale = point.scale.to(output.device)
            zero = torch.zeros(scale.shape, dtype=torch.int32, device=output.device)
            return torch.fake_quantize_per_channel_affine(output, scale, zero, point.axis % output.dim(), INT8_MIN, INT8_MAX)

        return qdq

    for path, q in qvit.quantizers().items():
        point = by_name[point_name(path)]
        if point.quantized:
            handles.append(q.register_forward_hook(hook(point)))
    try:
        with qvit.fp32():
            yield
    finally:
        for h in handles:
            h.remove()


def export_onnx(qvit: QVit, path: Path, image_size: tuple[int, int], quantized: bool = True, opset: int = 17) -> list[ExportPoint]:
    """Write ``qvit`` (FP32, or with Q/DQ per :func:`export_plan`) to ``path`` with a dynamic batch axis.

    TorchScript-based exporter: torch.export has no rule for the fake-quantize ops (their autograd
    form), while the TorchScript exporter lowers them to QuantizeLinear/DequantizeLinear directly.
    """
    plan = export_plan(qvit) if quantized else []
    example = torch.randn(2, 3, *image_size, device=next(qvit.parameters()).device)
    context = qdq_hooks(qvit, plan) if quantized else qvit.fp32()
    with context, torch.no_grad():
        torch.onnx.export(
            qvit,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    return plan


def simplify(source: Path, target: Path) -> str:
    """Simplify with onnxsim (onnxslim where onnxsim is not installed), check, save; returns the tool used."""
    import onnx

    model = onnx.load(str(source))
    try:
        import onnxsim

        model, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified model")
        tool = f"onnxsim {getattr(onnxsim, '__version__', '')}".strip()
    except ImportError:
        import onnxslim

        model = onnxslim.slim(model)
        tool = f"onnxslim {onnxslim.__version__}"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))
    return tool


def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def check_qdq(model) -> list[str]:
    """Problems with the Q/DQ layout: a QuantizeLinear not feeding DequantizeLinear nodes only, a
    DequantizeLinear not fed by a QuantizeLinear or an int8 constant, a non-zero zero point."""
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = _constants(model)
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) > 2 and constants.get(node.input[2]) is not None and constants[node.input[2]].any():
            problems.append(f"{node.name or node.output[0]}: non-zero zero point")
        if node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users):
                problems.append(f"{node.name or node.output[0]}: QuantizeLinear feeds {[u.op_type for u in users]}, not DequantizeLinear")
        else:
            source = producers.get(node.input[0])
            if source is not None and source.op_type != "QuantizeLinear":
                problems.append(f"{node.name or node.output[0]}: DequantizeLinear fed by {source.op_type}")
    return problems


def qdq_scales(model) -> list[tuple[np.ndarray, int]]:
    """(scale, axis) of every DequantizeLinear, in graph order."""
    constants = _constants(model)
    result = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            result.append((constants[node.input[1]], axis))
    return result
