"""Whether this CPU's int8 GEMM kernels saturate: probed, not guessed from CPU flags.

x86 CPUs without VNNI (AVX2 only: AMD Zen 1-3, Intel before Cascade Lake) multiply uint8 x int8 with
``vpmaddubsw``, which adds each pair of products into an int16 *with saturation*: two products of
255 x 127 (64770) clip to 32767. ONNX Runtime's uint8 x int8 kernels and OpenVINO's (oneDNN) both take
that path there, so a Q/DQ model's integers differ from the fake-quant model's wherever such pairs
occur (ONNX Runtime's documentation recommends 7-bit weights or uint8 x uint8 on such machines). VNNI
(``vpdpbusd``) and ARM's dot products accumulate in int32 and are exact. ``int_only.onnx`` is exact on
every CPU: its GEMMs are uint8 x uint8.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = ["SATURATION_NOTE", "int8_pairs_saturate"]

SATURATION_NOTE = (
    "this CPU's uint8 x int8 kernels (x86 without VNNI) saturate pairs of products at int16, so ONNX Runtime's "
    "and OpenVINO's INT8 results can drift from the fake-quant model's (docs/deploy.md, 'CPUs without VNNI')"
)


@functools.cache
def int8_pairs_saturate() -> bool:
    """True when ONNX Runtime's uint8 x int8 ``MatMulInteger`` of 255 x 127 pairs is not exact here."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 64
    weight = numpy_helper.from_array(np.full((k, 8), 127, np.int8), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 8])], [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"a": np.full((1, k), 255, np.uint8)})
    return bool((y != 255 * 127 * k).any())
