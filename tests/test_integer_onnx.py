"""int_only.onnx: standard operators, integer tensors only, and the same integers as the PyTorch executor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SWIN_SIZE, calibrated, make_tiny_swin, make_tiny_vit, tiny_images
from models.integer.lower import lower
from models.integer.program import Node, run
from models.integer.softmax import IntSoftmax
from utils import integer_onnx
from utils.integer_onnx import float_tensors, write_int_only
from utils.onnx_export import simplify

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CASES = {
    "vit-att8": ("fqvit_w8a8_att8", lambda: make_tiny_vit(), 32),
    "vit-att4-layerscale-registers": ("fqvit_w8a8_att4", lambda: make_tiny_vit(init_values=0.5, no_embed_class=True, reg_tokens=2), 32),
    "swin-att8": ("fqvit_w8a8_att8", make_tiny_swin, SWIN_SIZE),
    "swin-att4": ("fqvit_w8a8_att4", make_tiny_swin, SWIN_SIZE),
    "vit-plus-r10": ("fqvit_plus_w8a8_r10", lambda: make_tiny_vit(), 32),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_onnx_runtime_gives_the_pytorch_integers_after_simplification(case, tmp_path):
    recipe, model, size = CASES[case]
    program = lower(calibrated(recipe, model=model(), size=size, integer_gelu=True))
    write_int_only(program, tmp_path / "raw.onnx")
    simplify(tmp_path / "raw.onnx", tmp_path / "int_only.onnx")
    model_proto = onnx.load(str(tmp_path / "int_only.onnx"))
    assert float_tensors(model_proto) == []  # the simplifier kept it integer-only
    assert {n.domain for n in model_proto.graph.node} <= {""}  # standard operators only (no com.microsoft)
    session = ort.InferenceSession(str(tmp_path / "int_only.onnx"), providers=["CPUExecutionProvider"])
    x = tiny_images(8, seed=21, size=size)
    with torch.no_grad():
        expected = run(program, x)[program.output].numpy()
    got = session.run(None, {"images": x.numpy()})[0]
    assert np.array_equal(got, expected)  # the logits' scale is a power of two: equal floats, equal int32 logits
    assert np.array_equal(session.run(None, {"images": x[:1].numpy()})[0], expected[:1])  # dynamic batch


def test_gemms_are_uint8_by_uint8_and_exact_at_the_extremes(tmp_path):
    """Every MatMulInteger of int_only.onnx takes two uint8 operands (the int8 weight + 128, zero point 128):
    uint8 x int8 kernels saturate pairs of products on x86 CPUs without VNNI (utils/int8_kernels.py).
    A GEMM of the extreme codes (255 against weights 127 and -128) gives the exact integers here."""
    program = lower(calibrated())
    model = write_int_only(program, tmp_path / "int_only.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    weights = [n for n in gemms if n.input[1] in inits]
    assert weights and all(inits[n.input[1]].data_type == onnx.TensorProto.UINT8 for n in weights)
    assert all(onnx.numpy_helper.to_array(inits[n.input[3]]) == integer_onnx.WEIGHT_ZERO for n in weights)
    weight = np.tile(np.array([[127], [127], [-128], [-128]], np.int8), (16, 8))  # [64, 8]
    g = integer_onnx._Graph()
    y = integer_onnx.EMITTERS["linear"](g, Node("gemm", "linear", ["x"], ["y"], {"x_zero": 0}, {"weight": weight}), ["x"], program)[0]
    graph = onnx.helper.make_graph(g.nodes, "gemm", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [2, 64])],
                                   [onnx.helper.make_tensor_value_info(y, onnx.TensorProto.INT32, None)], g.initializers)  # fmt: skip
    gemm = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", integer_onnx.OPSET)])
    gemm.ir_version = 8
    x = np.full((2, 64), 255, np.uint8)
    got = ort.InferenceSession(gemm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(got, x.astype(np.int64) @ weight.astype(np.int64))


def test_float_tensors_finds_a_float_inside(tmp_path):
    program = lower(calibrated())
    model = write_int_only(program, tmp_path / "int_only.onnx")
    assert float_tensors(model) == []
    node = next(n for n in model.graph.node if n.op_type == "MatMulInteger")
    cast = onnx.helper.make_node("Cast", [node.output[0]], ["as_float"], to=onnx.TensorProto.FLOAT)
    back = onnx.helper.make_node("Cast", ["as_float"], ["back"], to=onnx.TensorProto.INT32)
    model.graph.node.extend([cast, back])
    assert "as_float" in float_tensors(model)


@pytest.mark.parametrize("case", ["vit-att8", "swin-att4", "vit-plus-r10"])
def test_softmax_tables_and_arithmetic_give_the_same_integers(case, monkeypatch):
    """The i-exp as a table on the scores (the default) and computed op by op (finer score grids)."""
    recipe, model, size = CASES[case]
    program = lower(calibrated(recipe, model=model(), size=size, integer_gelu=True))
    x = tiny_images(4, seed=5, size=size)
    with torch.no_grad():
        expected = run(program, x)[program.output].numpy()
    gathers, default = {}, integer_onnx.EXP_TABLE_MAX
    for limit in (default, 0):
        monkeypatch.setattr(integer_onnx, "EXP_TABLE_MAX", limit)
        model_proto = integer_onnx.to_onnx(program)
        gathers[limit] = sum(n.op_type == "GatherElements" for n in model_proto.graph.node)
        session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        assert np.array_equal(session.run(None, {"images": x.numpy()})[0], expected)
    softmaxes = sum(n.op == "softmax" for n in program.nodes)
    assert gathers[default] >= gathers[0] + softmaxes  # the tables were used


@pytest.mark.parametrize("scale", [0.003, 0.02, 0.16, 0.31, 1.7])
def test_exp_span_is_where_the_iexp_stops_changing(scale):
    sm = IntSoftmax.uniform(scale, 1 / 255, 0, 255)
    span = integer_onnx._exp_span(sm)
    exp_int, _, _ = sm.iexp(torch.arange(-span - 300, 1, dtype=torch.int64))
    assert torch.all(exp_int[:301] == exp_int[300])  # constant at and below -span
    assert exp_int[299 + 1] != exp_int[-1]


@pytest.mark.parametrize("limit,path", [(2**31, "Mul"), (2**23, "Reshape"), (1, "Cast")], ids=["int32", "runs", "int64"])
def test_layernorm_sums_of_squares_in_int32_runs_or_int64_give_the_same_integers(limit, path, monkeypatch):
    monkeypatch.setattr(integer_onnx, "INT32_SUMS", limit)
    program = lower(calibrated("fqvit_plus_w8a8_r10", integer_gelu=True))
    x = tiny_images(4, seed=6)
    with torch.no_grad():
        expected = run(program, x)[program.output].numpy()
    model_proto = integer_onnx.to_onnx(program)
    squares = [n for n in model_proto.graph.node if n.op_type == "ReduceSumSquare"]
    assert len(squares) == sum(n.op == "layernorm" for n in program.nodes)
    producer = {out: n.op_type for n in model_proto.graph.node for out in n.output}
    assert {producer[n.input[0]] for n in squares} == {path}  # X itself (int32), its runs, or its int64 cast
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(session.run(None, {"images": x.numpy()})[0], expected)
