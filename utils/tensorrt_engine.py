"""TensorRT engines from the exported ONNX models: build, run, time and inspect (convert_tensorrt.py step 4).

Explicit quantization: TensorRT 10+ builds INT8 from the QuantizeLinear/DequantizeLinear pairs in the
graph (utils/onnx_export.py puts them, with the calibrated scales, on the inputs of every Conv/Gemm/
MatMul); implicit calibration is deprecated in 10.x and gone in 11, and no precision flag is needed. Both
engines are built from *strongly typed* networks, on TensorRT 10 and 11 alike (11 ignores the flag:
strong typing is always on), so the ONNX types alone decide every precision:

* INT8: the Q/DQ model as exported; what is not behind a Q/DQ (LayerNorm, Softmax, GELU, residual adds)
  runs in FP32, as in the PyTorch fake-quant model it is checked against;
* FP16: the FP32 model converted to float16 (onnxconverter-common; float32 images in and logits out).
  The FP16/INT8 builder flags of TensorRT 10's weakly typed networks are deprecated and removed in 11, so
  they are not used: one code path, the same engine on either version.

Engines are built with a dynamic batch axis (profile 1 ... ``max_batch``) and DETAILED profiling
verbosity, so the engine inspector reports every layer's tensor formats and the ONNX nodes it covers;
:func:`summarize_layers` turns that JSON into precisions per layer, whether attention was fused, and the
Q/DQ Conv/Gemm/MatMul nodes that TensorRT nevertheless ran in float. :class:`EngineRunner` runs an engine
on torch CUDA tensors (``execute_async_v3`` on a torch stream: no pycuda).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from utils import onnx_export
from utils.onnx_export import ExportPoint
from utils.run_dir import write_bytes_atomic

__all__ = [
    "EngineError",
    "EngineRunner",
    "build_engine",
    "check_deployable",
    "compute_nodes",
    "fp16_onnx",
    "inspect_engine",
    "summarize_layers",
    "unavailable_reason",
]

PRECISIONS = ("int8", "fp16")
# Ops that only move data: a Q/DQ or a constant seen through them still feeds the Conv/Gemm/MatMul.
LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
# Compute precisions, lowest first: a layer's precision is the lowest among its tensors.
ORDER = ("INT4", "FP4", "INT8", "FP8", "FP16", "BF16", "FP32")


class EngineError(RuntimeError):
    """TensorRT could not parse, build or load an engine; the message is one line."""


def unavailable_reason() -> str | None:
    """None where engines can be built here; otherwise why not, in one line."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install -r requirements-trt.txt on a machine with an NVIDIA GPU and driver)"
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"tensorrt does not import ({' '.join(str(exc).split())})"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return None


def check_deployable(plan: Sequence[ExportPoint], recipe: str) -> None:
    """Refuse a recipe whose engine would not be the calibrated model: every point must export as
    symmetric int8 (TensorRT takes zero point 0 only)."""
    onnx_export.check_deployable(list(plan), recipe, "TensorRT", "symmetric int8",
                                 "Calibrate with test_qvit.py --config trt_int8, or pass --onnx-only to stop after the ONNX export")  # fmt: skip


@functools.cache
def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def fp16_onnx(model):
    """The FP32 ONNX model in float16, float32 images in and logits out: what a strongly typed FP16 engine needs."""
    from onnxconverter_common import float16

    return float16.convert_float_to_float16(model, keep_io_types=True)


def build_engine(onnx_path: Path, engine_path: Path, precision: str, max_batch: int, image_size: tuple[int, int]) -> dict:
    """Build a ``precision`` engine (``int8``: from the Q/DQ model; ``fp16``: from the FP32 model) for batches
    1 ... ``max_batch``, write it atomically to ``engine_path``; returns the build time and engine size."""
    import onnx
    import tensorrt as trt

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    model = onnx.load(str(onnx_path))
    has_qdq = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    if has_qdq != (precision == "int8"):
        raise ValueError(f"{onnx_path.name}: an {precision} engine needs {'a Q/DQ' if precision == 'int8' else 'an FP32'} model")
    if precision == "fp16":
        model = fp16_onnx(model)
    builder = trt.Builder(_logger())
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, _logger())
    if not parser.parse(model.SerializeToString()):
        first = " ".join(str(parser.get_error(0)).split()) if parser.num_errors else "no error reported"
        raise EngineError(f"TensorRT cannot parse {onnx_path.name}: {first} ({parser.num_errors} parser errors)")
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then reports formats and ONNX nodes
    profile = builder.create_optimization_profile()
    source = network.get_input(0)  # "images", (batch, channels, height, width) with a dynamic batch
    channels = source.shape[1]
    profile.set_shape(source.name, (1, channels, *image_size), (max_batch, channels, *image_size), (max_batch, channels, *image_size))
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineError(f"TensorRT could not build the {precision} engine from {onnx_path.name} (its log above says why)")
    write_bytes_atomic(engine_path, memoryview(serialized))
    return {"precision": precision, "source": onnx_path.name, "tensorrt": trt.__version__, "build_s": seconds, "bytes": engine_path.stat().st_size}


class EngineRunner:
    """A deserialized engine and one execution context; ``runner(images)`` returns the logits on the GPU.

    Device buffers are torch CUDA tensors (their ``data_ptr`` bound with ``set_tensor_address``), and the
    engine runs on a torch stream ordered after the caller's stream and before the caller's next work,
    so the returned tensor is used like any other.
    """

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt

        self._runtime = trt.Runtime(_logger())
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT cannot load {engine_path} (built by another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise EngineError(f"{engine_path}: expected one input tensor, found {inputs}")
        self.input = inputs[0]
        self.outputs = [n for n in names if n != self.input]
        self.dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input, 0)[2][0])
        self.sample_shape = tuple(self.engine.get_tensor_shape(self.input))[1:]
        self.stream = torch.cuda.Stream()

    def __call__(self, images: Tensor) -> Tensor:
        """Logits of ``images`` (any batch size: split into chunks of at most ``max_batch``)."""
        if len(images) > self.max_batch:
            return torch.cat([self(chunk) for chunk in images.split(self.max_batch)])
        caller = torch.cuda.current_stream()
        x = images.to("cuda", self.dtypes[self.input]).contiguous()
        if not self.context.set_input_shape(self.input, tuple(x.shape)):
            raise EngineError(f"input shape {tuple(x.shape)} is outside the engine's profile (batch 1-{self.max_batch}, {self.sample_shape})")
        self.context.set_tensor_address(self.input, x.data_ptr())
        outputs = {}
        for name in self.outputs:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        # Buffers belong to the caller's stream: the engine waits for them, the caller waits for the engine.
        self.stream.wait_stream(caller)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError("TensorRT execution failed (its log above says why)")
        caller.wait_stream(self.stream)
        return outputs[self.outputs[0]]

    def layer_information(self) -> str:
        """The engine inspector's JSON, for this context at the largest batch (so formats are resolved)."""
        import tensorrt as trt

        self.context.set_input_shape(self.input, (self.max_batch, *self.sample_shape))
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def _torch_dtype(trt_dtype) -> torch.dtype:
    import numpy as np
    import tensorrt as trt

    return torch.from_numpy(np.empty(0, dtype=trt.nptype(trt_dtype))).dtype


def compute_nodes(model) -> tuple[list[str], list[str]]:
    """Of an ONNX graph: the Conv/Gemm/MatMul nodes whose two data inputs both come through a
    DequantizeLinear (those TensorRT should run in INT8), and the MatMuls of two activations (attention)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = {init.name for init in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}

    def source(name: str):
        node = producers.get(name)
        while node is not None and node.op_type in LAYOUT_OPS:
            node = producers.get(node.input[0])
        return node

    def is_weight(name: str) -> bool:
        while name not in constants:
            node = producers.get(name)
            if node is None or node.op_type not in LAYOUT_OPS | {"QuantizeLinear", "DequantizeLinear"}:
                return False
            name = node.input[0]
        return True

    quantized, attention = [], []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        data = node.input[:2]
        if all((s := source(name)) is not None and s.op_type == "DequantizeLinear" for name in data):
            quantized.append(node.name)
        if node.op_type == "MatMul" and not any(is_weight(name) for name in data):
            attention.append(node.name)
    return quantized, attention


def _dtype(text: str) -> str | None:
    """A tensor's data type from its inspector description; "other" for integer/bool, None when unknown."""
    lowered = text.lower()
    for keys, name in (
        (("uint8", "int32", "int64", "bool"), "other"),
        (("int8",), "INT8"),
        (("fp8", "e4m3"), "FP8"),
        (("int4",), "INT4"),
        (("fp4", "e2m1"), "FP4"),
        (("bf16", "bfloat16"), "BF16"),
        (("fp16", "half"), "FP16"),
        (("fp32", "float"), "FP32"),
    ):
        if any(k in lowered for k in keys):
            return name
    return None  # e.g. "N/A due to dynamic shapes"


def _layer(entry) -> dict:
    """Name, type, precision and covered ONNX nodes of one inspector layer entry."""
    if isinstance(entry, str):  # LAYER_NAMES_ONLY verbosity: names only
        return {"name": entry, "type": "", "tactic": "", "precision": "unknown", "onnx": set(entry.split(" + "))}
    tensors = [*entry.get("Inputs", []), *entry.get("Outputs", [])]
    # TensorRT 10: "Format/Datatype" ("Row major linear FP32 format", "Int8", ...); 11: "DataType" split out.
    types = {_dtype(str(t.get("DataType", t.get("Format/Datatype", "")))) for t in tensors if isinstance(t, dict)}
    compute = [p for p in ORDER if p in types]
    precision = compute[0] if compute else ("other" if "other" in types else "unknown")
    name = str(entry.get("Name", ""))
    onnx_nodes = set(re.findall(r"\[ONNX Layer: ([^\]]+)\]", str(entry.get("Metadata", "")))) | set(name.split(" + "))
    return {"name": name, "type": str(entry.get("LayerType", "")), "tactic": str(entry.get("TacticName", "")), "precision": precision, "onnx": onnx_nodes}


def summarize_layers(information: str, quantized: Sequence[str], attention: Sequence[str]) -> dict:
    """Summary of the inspector's engine JSON (``get_engine_information(LayerInformationFormat.JSON)``).

    ``quantized``/``attention`` are the ONNX nodes of :func:`compute_nodes`. Layers are matched to ONNX
    nodes through their ``[ONNX Layer: name]`` metadata or their (fused, " + "-joined) names. A layer's
    precision is the lowest compute type among its input and output tensors (an INT8 GEMM reads int8 and
    may write float). Returns ``layers`` (name, type, precision), ``precisions`` (layer counts),
    ``attention_fused`` (True: the attention matmuls ran inside fused layers covering both, or layers
    named MHA/attention; False: a matmul ran on its own; None: the JSON does not say), ``fallbacks``
    (Q/DQ Conv/Gemm/MatMul nodes whose layers all ran in float) and ``unmatched`` (Q/DQ nodes no layer
    names, so their precision is unknown).
    """
    entries = json.loads(information).get("Layers", [])
    layers = [_layer(e) for e in entries]
    wanted = set(attention)
    fused = [r for r in layers if len(r["onnx"] & wanted) >= 2 or re.search(r"mha|attention", f"{r['name']} {r['type']} {r['tactic']}", re.I)]
    alone = [r for r in layers if len(r["onnx"] & wanted) == 1 and r not in fused]
    attention_fused = None if not wanted or not (fused or alone) else bool(fused) and not alone
    fallbacks, unmatched = [], []
    for node in quantized:
        covering = [r for r in layers if node in r["onnx"] and r["precision"] not in ("unknown", "other")]
        if not covering:
            unmatched.append(node)
        elif not any(ORDER.index(r["precision"]) <= ORDER.index("FP8") for r in covering):
            fallbacks.append({"onnx": node, "layers": [r["name"] for r in covering], "precision": covering[0]["precision"]})
    return {
        "layers": [{"name": r["name"], "type": r["type"], "precision": r["precision"]} for r in layers],
        "precisions": dict(Counter(r["precision"] for r in layers).most_common()),
        "attention_fused": attention_fused,
        "attention_layers": [r["name"] for r in fused],
        "fallbacks": fallbacks,
        "unmatched": unmatched,
    }


def inspect_engine(runner: EngineRunner, model) -> dict:
    """:func:`summarize_layers` of ``runner``'s engine, built from the ONNX ``model``."""
    quantized, attention = compute_nodes(model)
    return summarize_layers(runner.layer_information(), quantized, attention)
