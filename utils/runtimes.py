"""The CPU runtimes an exported ONNX model is deployed to: ONNX Runtime and OpenVINO, one call each.

Both read the Q/DQ ONNX file (utils/onnx_export.py) and turn the QuantizeLinear/DequantizeLinear
pairs into integer kernels: ONNX Runtime's QDQ transformer (MatMulIntegerToFloat, QLinearMatMul, ...),
OpenVINO's low-precision transformations (the pairs become FakeQuantize, the int8 weights stay int8
constants). :func:`save_deployed` writes each runtime's own form of it, the file that is verified,
timed and shipped: the OpenVINO IR (utils/openvino_model.py: the fused qkv Linear split in three), and
ONNX Runtime's form (utils/ort_model.py: Linear biases inside the integer kernels, qkv split too). A model is a callable ``images (numpy, NCHW float32) -> logits (numpy)``.

OpenVINO is pinned to FP32 inference precision: on CPUs with bfloat16 units its default would run the
float parts of both the FP32 and the INT8 model in bfloat16, which is a different model from the one
PyTorch verified. TensorRT, which needs a GPU, lives in :mod:`utils.tensorrt_engine`.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.openvino_core import openvino_core

__all__ = ["RUNTIMES", "CPU_RUNTIMES", "Model", "load_model", "parse_runtimes", "save_deployed", "unavailable_reason", "ir_constant_types"]

RUNTIMES = ("ort", "openvino", "tensorrt")
CPU_RUNTIMES = ("ort", "openvino")
TITLES = {"ort": "ONNX Runtime", "openvino": "OpenVINO", "tensorrt": "TensorRT"}
_PACKAGES = {"ort": "onnxruntime", "openvino": "openvino"}
DEPLOYED_SUFFIXES = {"ort": ".ort.onnx", "openvino": ".xml"}  # int8.onnx -> int8.ort.onnx, int8.xml

Model = Callable[[np.ndarray], np.ndarray]


def parse_runtimes(text: str) -> list[str]:
    """``"ort,openvino"`` -> ``["ort", "openvino"]``; an unknown name is a one-line error listing the valid ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown or not names:
        what = f"unknown runtime {unknown[0]!r}" if unknown else "no runtime named"
        raise UserError(f"--runtimes {text!r}: {what}; valid: {', '.join(RUNTIMES)}")
    return list(dict.fromkeys(names))


def unavailable_reason(runtime: str) -> str | None:
    """None where the CPU ``runtime`` can run here; otherwise why not, in one line."""
    package = _PACKAGES[runtime]
    if importlib.util.find_spec(package) is None:
        return f"{package} is not installed (pip install -r requirements.txt)"
    try:
        importlib.import_module(package)
    except (ImportError, OSError) as exc:
        return f"{package} does not import ({' '.join(str(exc).split())})"
    return None


def _ort(path: Path, threads: int | None) -> Model:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})[0]


def _openvino(path: Path, threads: int | None) -> Model:
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = openvino_core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    return lambda images, compiled=compiled: request.infer({0: images})[0]  # the request with its compiled model


def load_model(runtime: str, path: Path, threads: int | None = None) -> Model:
    """``path`` (ONNX, or an OpenVINO IR ``.xml``) compiled for ``runtime`` on the CPU."""
    return {"ort": _ort, "openvino": _openvino}[runtime](Path(path), threads)


def ir_constant_types(xml_path: Path) -> Counter:
    """Bytes of the IR's constants by element type (``i8``, ``u8``, ``f32``, ...), read from the ``.xml``."""
    import xml.etree.ElementTree as ET

    sizes: Counter = Counter()
    for layer in ET.parse(xml_path).getroot().iter("layer"):
        if layer.get("type") == "Const":
            data = layer.find("data")
            sizes[data.get("element_type")] += int(data.get("size", 0))
    return sizes


def save_deployed(runtime: str, int8_onnx: Path) -> tuple[Path, dict]:
    """Write ``runtime``'s own form of the Q/DQ model ``int8_onnx`` beside it; returns its path and what it
    holds (for the report): what the runtime's rewrite changed, and the IR's constant bytes by type."""
    import dataclasses

    target = Path(int8_onnx).with_name(Path(int8_onnx).name.removesuffix(".onnx") + DEPLOYED_SUFFIXES[runtime])
    if runtime == "openvino":
        from utils.openvino_model import save_openvino_model

        rewrite = save_openvino_model(int8_onnx, target)
        return target, {"openvino_ir_constant_bytes": dict(ir_constant_types(target)), "openvino_model": dataclasses.asdict(rewrite)}
    from utils.ort_model import save_ort_model

    return target, {"ort_model": dataclasses.asdict(save_ort_model(int8_onnx, target))}
