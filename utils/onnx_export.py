"""ONNX export of a calibrated QVit with QuantizeLinear/DequantizeLinear pairs (explicit quantization).

TensorRT 10+ builds INT8 only from Q/DQ in the graph (implicit calibration and the INT8 builder flag are
gone in 11), and ONNX Runtime's and OpenVINO's CPU plugins turn the same Q/DQ pairs into integer
kernels, so the graph carries the precisions. The QVit's own quantizers mark where: the inputs of
every Conv/Linear, both attention matmuls' operands (q with the attention scale folded in, k, v) and
the softmax output. Each quantization point gets an export *plan*:

* ``qdq`` - 8-bit uniform, exported exactly as calibrated: symmetric int8 (zero point 0), per tensor
  for activations, per output channel (axis 0) for weights; and, for the CPU runtimes
  (``zero_points=True``), asymmetric uint8 activations with their zero point;
* ``mapped`` - asymmetric 8-bit uniform per tensor (FQ-ViT's uint8 activations) for TensorRT, which
  takes zero point 0 only: exported as symmetric int8 covering the calibrated range, scale
  max(|lo|, |hi|) / 127 (coarser than the fake-quant model);
* ``float`` - what Q/DQ cannot express (log2 grids, power-of-two-factor or other per-channel
  activation scales, other bit widths): no Q/DQ, the tensor stays in floating point.

The recipes ``trt_int8*`` and ``cpu_int8`` have only ``qdq`` points: their fake-quant model is what deploys.

Export runs the QVit in FP32 mode with a forward hook on every exported quantizer that returns
``torch.fake_quantize_per_{tensor,channel}_affine`` of its input, which ONNX exporters lower to a
QuantizeLinear/DequantizeLinear pair. :func:`store_int8_weights` then replaces each weight's
float initializer and QuantizeLinear by the int8 initializer it computes (ModelOpt's and ONNX
Runtime's quantizer's form: int8 weight -> DequantizeLinear(axis 0)), a quarter of the bytes.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.ptq.quantizers import uniform_fake_quant
from models.ptq.tensor_quantizer import TensorQuantizer
from models.quant_vit import QVit
from utils.errors import UserError
from utils import onnx_graph
from utils.profiler import point_name

__all__ = [
    "ExportPoint", "check_qdq", "export_onnx", "export_plan", "qdq_hooks", "qdq_scales", "simplify",
    "check_deployable", "store_int8_weights", "weight_initializers",
]

INT8_MIN, INT8_MAX = -128, 127
UINT8_MIN, UINT8_MAX = 0, 255


@dataclass(frozen=True)
class ExportPoint:
    name: str
    plan: str  # "qdq", "mapped" or "float"
    reason: str
    scale: Tensor | None  # float32 scale(s) exported; None for float points
    axis: int | None  # channel axis for per-channel scales
    zero_point: int = 0  # of an asymmetric uint8 activation (CPU runtimes; may be 0, e.g. a softmax output)
    unsigned: bool = False  # uint8 grid (asymmetric, CPU runtimes) rather than int8

    @property
    def quantized(self) -> bool:
        return self.plan != "float"

    @property
    def qrange(self) -> tuple[int, int]:
        """The integer range of the exported grid: int8, or uint8 for an asymmetric point."""
        return (UINT8_MIN, UINT8_MAX) if self.unsigned else (INT8_MIN, INT8_MAX)


def _plan(name: str, q: TensorQuantizer, zero_points: bool) -> ExportPoint:
    spec = q.spec
    bt = spec.bit_type
    if not q.enabled:
        return ExportPoint(name, "float", "disabled", None, None)
    if name.endswith("softmax.input"):
        return ExportPoint(name, "float", "integer-softmax scores (the runtimes run the softmax in float)", None, None)
    if not q.static_grid:
        return ExportPoint(name, "float", "dynamic per-token scale (Q/DQ scales are static)", None, None)
    if not q.method.qdq_exportable:
        return ExportPoint(name, "float", f"{spec.quantizer} grid (Q/DQ is uniform)", None, None)
    if bt.bits != 8:
        return ExportPoint(name, "float", f"{bt.bits}-bit (Q/DQ is 8-bit)", None, None)
    if q.per_channel and not q.is_weight:
        why = "power-of-two-factor" if spec.power_of_two_factor else "per-channel"
        return ExportPoint(name, "float", f"{why} activation scales (Q/DQ activations are per-tensor)", None, None)
    scale = q.scale.detach().float().cpu()
    if bt.symmetric:
        return ExportPoint(name, "qdq", "int8, zero point 0", scale, q.channel_axis if q.per_channel else None)
    if q.per_channel:
        return ExportPoint(name, "float", "asymmetric per-channel weights", None, None)
    zero_point = int(q.zero_point)
    if zero_points:
        return ExportPoint(name, "qdq", f"uint8, zero point {zero_point}", scale, None, zero_point, unsigned=True)
    lo = (bt.qmin - zero_point) * float(scale)
    hi = (bt.qmax - zero_point) * float(scale)
    mapped = torch.tensor(max(abs(lo), abs(hi)) / INT8_MAX)
    return ExportPoint(name, "mapped", f"{bt.name} [{lo:.4g}, {hi:.4g}] mapped to symmetric int8", mapped, None)


def export_plan(qvit: QVit, zero_points: bool = False) -> list[ExportPoint]:
    """How each quantization point of ``qvit`` (calibrated) is exported, in model order.

    ``zero_points``: the target runtimes take uint8 activations with a zero point (ONNX Runtime,
    OpenVINO); without, asymmetric points are mapped to symmetric int8 (TensorRT).
    """
    if not qvit.is_calibrated:
        raise RuntimeError("export needs a calibrated QVit")
    return [_plan(point_name(path), q, zero_points) for path, q in qvit.quantizers().items()]


def check_deployable(plan: list[ExportPoint], recipe: str, runtime: str, grid: str, hint: str) -> None:
    """Refuse a recipe whose deployed model would not be the calibrated one, naming the points:
    ``mapped`` points would run on a coarser grid than was calibrated and evaluated, ``float`` ones
    unquantized; either way the runtime would not run the model whose accuracy test_qvit.py reported."""
    bad = [p for p in plan if p.plan != "qdq"]
    if not bad:
        return
    named = "; ".join(f"{p.name} ({p.plan}: {p.reason})" for p in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise UserError(
        f"recipe {recipe} cannot be deployed to {runtime} as calibrated: {len(bad)} of {len(plan)} quantization points "
        f"are not {grid} Q/DQ: {named}{more}. {hint}"
    )


@contextlib.contextmanager
def qdq_hooks(qvit: QVit, plan: list[ExportPoint]) -> Iterator[None]:
    """Within: the QVit in export mode (quantizers pass through, layers compute what deploys) with every
    exported point fake-quantized by torch's Q/DQ ops."""
    by_name = {p.name: p for p in plan}
    handles = []

    def hook(point: ExportPoint):
        qmin, qmax = point.qrange

        def qdq(module: TensorQuantizer, args: tuple, output: Tensor) -> Tensor:
            if module.rounded is not None:
                output = module.rounded.to(output.dtype)  # GPTQ's weight, already on the grid: Q/DQ keeps it
            if torch.onnx.is_in_onnx_export():  # torch's fake_quantize ops export as a QuantizeLinear/DequantizeLinear pair
                if point.axis is None:
                    return torch.fake_quantize_per_tensor_affine(output, float(point.scale), point.zero_point, qmin, qmax)
                scale = point.scale.to(output.device)
                zero = torch.zeros(scale.shape, dtype=torch.int32, device=output.device)
                return torch.fake_quantize_per_channel_affine(output, scale, zero, point.axis % output.dim(), qmin, qmax)
            # Run in PyTorch, the pair rounds as the fake-quant model does (torch's ops would not: DeiT-tiny
            # cpu_int8 gave other logits on 62 of 96 images).
            if point.axis is None:
                return uniform_fake_quant(output, float(point.scale), point.zero_point, qmin, qmax)
            axis = point.axis % output.dim()
            scale = point.scale.to(output.device).reshape([-1 if d == axis else 1 for d in range(output.dim())])
            return uniform_fake_quant(output, scale, 0, qmin, qmax)

        return qdq

    for path, q in qvit.quantizers().items():
        point = by_name[point_name(path)]
        if point.quantized:
            handles.append(q.register_forward_hook(hook(point)))
    try:
        with qvit.exporting():
            yield
    finally:
        for h in handles:
            h.remove()


def export_onnx(qvit: QVit, path: Path, image_size: tuple[int, int], quantized: bool = True, opset: int = 17,
                zero_points: bool = False) -> list[ExportPoint]:  # fmt: skip
    """Write ``qvit`` (FP32, or with Q/DQ per :func:`export_plan` and int8 weights) to ``path`` with a dynamic batch axis.

    TorchScript-based exporter: torch.export has no rule for the fake-quantize ops (their autograd
    form), while the TorchScript exporter lowers them to QuantizeLinear/DequantizeLinear directly.
    """
    plan = export_plan(qvit, zero_points) if quantized else []
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
    if quantized:
        import onnx

        model = onnx.load(str(path))
        store_int8_weights(model)
        onnx.save(model, str(path))
    return plan


def store_int8_weights(model) -> int:
    """Replace every QuantizeLinear of a constant (a weight) by the integer initializer it computes.

    ``Q(W) -> DQ`` becomes ``W_quantized -> DQ`` with the same scale, zero point and axis: the values
    are ONNX's QuantizeLinear of ``W`` (round half to even of ``W / scale``, plus the zero point,
    saturated), which is the PyTorch quantizer's rounding, so the dequantized weight is unchanged bit
    for bit; a GPTQ-rounded weight is already on the grid and is stored exactly. The float weight is
    dropped where nothing else reads it. Returns the number of weights stored.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    constants = onnx_graph.constants(model)
    consumers = onnx_graph.consumers(model)
    stored = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        users = consumers.get(node.output[0], [])
        if not users or any(u.op_type != "DequantizeLinear" for u in users):
            continue
        weight = constants[node.input[0]].astype(np.float32)
        scale = constants[node.input[1]].astype(np.float32)
        zero = constants[node.input[2]] if len(node.input) > 2 else np.zeros((), np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[axis % weight.ndim] = -1
        info = np.iinfo(zero.dtype)
        codes = np.rint(weight / scale.reshape(shape)) + zero.astype(np.float32).reshape(shape)
        name = f"{node.input[0]}_quantized"
        model.graph.initializer.append(numpy_helper.from_array(np.clip(codes, info.min, info.max).astype(zero.dtype), name))
        for user in users:
            user.input[0] = name
        stored.append(node)
    for node in stored:
        model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    return len(stored)


def weight_initializers(model) -> dict[str, np.ndarray]:
    """The integer initializers read by a DequantizeLinear (the stored weights), by name."""
    constants = onnx_graph.constants(model)
    integer = (np.int8, np.uint8)
    return {
        node.input[0]: constants[node.input[0]] for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in constants and constants[node.input[0]].dtype in integer
    }  # fmt: skip


def simplify(source: Path, target: Path) -> str:
    """Simplify with onnxslim, check, save; returns the tool used.

    onnxslim and onnxsim both keep the int8 weights behind their DequantizeLinear and every Q next to
    its DQ (tests/test_onnx_export.py checks both where installed); onnxslim is the one required:
    a pure-Python wheel for every Python and onnx version, where onnxsim is a compiled extension
    built against one onnx release, and it turns constants into initializers, which is how the
    runtimes and TensorRT's parser read weights.
    """
    import onnx
    import onnxslim

    model = onnxslim.slim(onnx.load(str(source)))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(target))
    return f"onnxslim {onnxslim.__version__}"


def check_qdq(model, zero_points: bool = False) -> list[str]:
    """Problems with the Q/DQ layout: a QuantizeLinear not feeding DequantizeLinear nodes only, a
    DequantizeLinear not fed by a QuantizeLinear or an integer constant, a QuantizeLinear of a constant
    (a weight not stored as integers), a uint8 or non-zero zero point (allowed with ``zero_points``:
    uint8 activations for the CPU runtimes)."""
    producers = onnx_graph.producers(model)
    consumers = onnx_graph.consumers(model)
    constants = onnx_graph.constants(model)
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zero = constants.get(node.input[2]) if len(node.input) > 2 else None
        if not zero_points and zero is not None and (zero.any() or zero.dtype != np.int8):
            problems.append(f"{node.name or node.output[0]}: {zero.dtype} zero point {zero.flat[0]} (TensorRT takes int8, zero point 0)")
        if node.op_type == "QuantizeLinear" and node.input[0] in constants:
            problems.append(f"{node.name or node.output[0]}: QuantizeLinear of the constant {node.input[0]} (store it as integers)")
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
    constants = onnx_graph.constants(model)
    result = []
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            result.append((constants[node.input[1]], axis))
    return result
