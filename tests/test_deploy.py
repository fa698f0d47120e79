"""Deployment to the CPU runtimes: int8 weights in the ONNX export, uint8 activations with zero points,
ONNX Runtime and OpenVINO against the PyTorch fake-quant model, the OpenVINO IR, bias correction."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import calibrated, exact_int8_kernels, make_tiny_vit, tiny_images
from test_cli import MODEL, assert_user_error
from test_onnx_export import calibrated_run, convert_cli, convert_main  # noqa: F401 (module fixture)
from utils.onnx_export import check_qdq, export_onnx, export_plan, simplify, weight_initializers
from utils.onnx_graph import producers as producers_of

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# cpu_int8 with its attention map quantized too, on a uint8 grid: a softmax output's zero point is 0.
UINT8_ATTENTION = {"attention": {"bit_type": {"bits": 8, "symmetric": False}, "observer": "minmax", "calibration_mode": "layer_wise", "quantizer": "uniform"},
                   "layers": {"blocks.*.mlp.fc2.input_quant": {"bit_type": {"bits": 8, "symmetric": False}}}}  # fmt: skip
MLP_SMOOTHING = {"reparam": {"alpha": 1.0, "mlp_alpha": 0.5}}  # a Div after each GELU, in front of fc2's QuantizeLinear
RUNTIMES = ["ort", pytest.param("openvino", marks=pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed"))]


def exported(qvit, folder: Path, zero_points: bool):
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    plan = export_onnx(qvit, folder / "raw.onnx", (32, 32), zero_points=zero_points)
    simplify(folder / "raw.onnx", folder / "int8.onnx")
    return plan, onnx.load(str(folder / "int8.onnx"))


def integer_weights(qvit) -> dict[str, np.ndarray]:
    """Every quantized weight's integer codes, from the PyTorch quantizer (GPTQ's rounding included)."""
    codes = {}
    for name, module in qvit.model.named_modules():
        q = getattr(module, "weight_quant", None)
        if q is None or q.spec is None:
            continue
        scale = q.scale.view(-1, *([1] * (module.weight.dim() - 1)))
        codes[name] = torch.round(q.fake_quant(module.weight) / scale).to(torch.int8).numpy()
    return codes


@pytest.mark.parametrize("recipe,overrides", [("trt_int8", {}), ("trt_int8", {"gptq": {}}), ("cpu_int8", {})], ids=["trt_int8", "gptq", "cpu_int8"])
def test_weights_are_stored_as_the_pytorch_integers(tmp_path, recipe, overrides):
    qvit = calibrated(recipe, **overrides)
    plan, model = exported(qvit, tmp_path, zero_points=True)
    assert check_qdq(model, zero_points=True) == []  # includes: no QuantizeLinear reads a constant
    constants = {init.name for init in model.graph.initializer}
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in constants for n in model.graph.node)
    stored = list(weight_initializers(model).values())
    expected = integer_weights(qvit)
    assert len(stored) == len(expected) == sum(p.name.endswith(".weight") for p in plan)
    assert all(w.dtype == np.int8 for w in stored)
    unmatched = list(stored)
    for name, codes in expected.items():  # each weight equals exactly one stored initializer, bit for bit
        hits = [i for i, w in enumerate(unmatched) if w.shape == codes.shape and np.array_equal(w, codes)]
        assert len(hits) == 1, name
        unmatched.pop(hits[0])
    if overrides:  # GPTQ moved some codes away from round-to-nearest, and those are what is stored
        nearest = {n: torch.round(m.weight / m.weight_quant.scale.view(-1, *([1] * (m.weight.dim() - 1)))).to(torch.int8).numpy()
                   for n, m in qvit.gptq_layers().items()}  # fmt: skip
        assert any(not np.array_equal(expected[n], codes) for n, codes in nearest.items())


def test_uint8_activations_keep_their_zero_points(tmp_path):
    qvit = calibrated("cpu_int8", **UINT8_ATTENTION)
    plan, model = exported(qvit, tmp_path, zero_points=True)
    points = {p.name: p for p in plan}
    fc2 = points["blocks.0.mlp.fc2.input"]
    q = qvit.quantizers()["blocks.0.mlp.fc2.input_quant"]
    assert fc2.plan == "qdq" and fc2.qrange == (0, 255) and fc2.zero_point == int(q.zero_point) > 0
    # A softmax output starts at 0: its zero point is 0, and it is still the uint8 grid it was calibrated on.
    attention = points["blocks.0.attn.softmax.output"]
    assert int(qvit.quantizers()["blocks.0.attn.softmax.output_quant"].zero_point) == 0
    assert attention.plan == "qdq" and attention.zero_point == 0 and attention.qrange == (0, 255)
    from onnx import numpy_helper

    zero_points = [numpy_helper.to_array(node.attribute[0].t) for node in model.graph.node if node.op_type == "Constant"]
    zero_points += [numpy_helper.to_array(init) for init in model.graph.initializer if init.data_type == onnx.TensorProto.UINT8]
    assert sum(z.dtype == np.uint8 for z in zero_points) >= 1
    activations = [p for p in plan if not p.name.endswith(".weight")]
    quantize_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) == len(activations)  # one uint8 Q/DQ per activation point
    assert check_qdq(model) != [] and check_qdq(model, zero_points=True) == []
    # For TensorRT (no zero points) the same points are mapped onto symmetric int8 instead.
    mapped = {p.name for p in export_plan(qvit, zero_points=False) if p.plan == "mapped"}
    assert mapped == {p.name for p in plan if p.unsigned} and "blocks.1.mlp.fc2.input" in mapped


def test_int8_onnx_is_under_a_third_of_fp32(tmp_path):
    model = make_tiny_vit(embed_dim=192, num_heads=3)  # weights dominate, as in every real ViT
    qvit = calibrated("cpu_int8", model=model)
    export_onnx(qvit, tmp_path / "fp32.raw.onnx", (32, 32), quantized=False)
    simplify(tmp_path / "fp32.raw.onnx", tmp_path / "fp32.onnx")
    exported(qvit, tmp_path, zero_points=True)
    ratio = (tmp_path / "int8.onnx").stat().st_size / (tmp_path / "fp32.onnx").stat().st_size
    assert 0.2 < ratio <= 0.30


@pytest.mark.parametrize("tool", ["onnxslim", "onnxsim"])
def test_simplifiers_keep_int8_weights_and_adjacent_pairs(tmp_path, tool):
    """Why onnxslim: both keep the int8 weights behind their DequantizeLinear and every Q beside its DQ."""
    pytest.importorskip(tool)
    qvit = calibrated("cpu_int8")
    export_onnx(qvit, tmp_path / "raw.onnx", (32, 32), zero_points=True)
    raw = onnx.load(str(tmp_path / "raw.onnx"))
    if tool == "onnxsim":
        import onnxsim

        model, ok = onnxsim.simplify(raw)
        assert ok
    else:
        import onnxslim

        model = onnxslim.slim(raw)
    assert check_qdq(model, zero_points=True) == []
    before, after = weight_initializers(raw), weight_initializers(model)
    assert len(after) == len(before) and all(w.dtype == np.int8 for w in after.values())
    assert sorted(w.tobytes() for w in after.values()) == sorted(w.tobytes() for w in before.values())


@exact_int8_kernels
@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("recipe,overrides", [("trt_int8", {}), ("cpu_int8", {}), ("cpu_int8", UINT8_ATTENTION), ("trt_int8", MLP_SMOOTHING)],
                         ids=["trt_int8", "cpu_int8", "uint8_attention", "mlp_smoothing"])  # fmt: skip
def test_runtime_agrees_with_the_fake_quant_model(tmp_path, recipe, overrides, runtime):
    from utils.runtimes import load_model, save_deployed

    qvit = calibrated(recipe, **overrides)
    plan, _ = exported(qvit, tmp_path, zero_points=recipe == "cpu_int8")
    assert {p.plan for p in plan} == {"qdq"}  # exported exactly as calibrated: the fake-quant model is what deploys
    model = load_model(runtime, save_deployed(runtime, tmp_path / "int8.onnx")[0], threads=1)  # the form that ships to it
    x = torch.cat([tiny_images(16, seed=300 + i) for i in range(4)])
    with torch.no_grad():
        reference = qvit(x).numpy()  # the quantized PyTorch model itself, not the export hooks
        with qvit.fp32():
            fp32 = qvit(x).numpy()
    out = model(x.numpy())
    assert (out.argmax(1) == reference.argmax(1)).mean() >= 0.99
    # Integer kernels sum in another order and round a few values the other way at ties: a small
    # fraction of what quantization itself moves the logits.
    assert np.abs(out - reference).mean() < 0.1 * np.abs(reference - fp32).mean()


# Without a qkv bias: trt_int8 without reparam (its shift, and cpu_int8's bias correction, give every Linear one).
@exact_int8_kernels
@pytest.mark.parametrize("recipe,overrides,qkv_bias", [("trt_int8", {}, True), ("trt_int8", {"reparam": None}, False), ("cpu_int8", {}, True), ("cpu_int8", UINT8_ATTENTION, True)],
                         ids=["trt_int8", "trt_int8_no_qkv_bias", "cpu_int8", "uint8_attention"])  # fmt: skip
def test_ort_form_runs_the_same_integers_with_fewer_nodes(tmp_path, recipe, overrides, qkv_bias):
    from onnx import numpy_helper

    from utils.ort_model import save_ort_model
    from utils.runtimes import load_model

    vit = make_tiny_vit(qkv_bias=qkv_bias)
    with torch.no_grad():  # timm starts biases at 0, and the simplifier drops an Add of zeros
        for module in vit.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.05)
    qvit = calibrated(recipe, model=vit, **overrides)
    _, source = exported(qvit, tmp_path, zero_points=recipe == "cpu_int8")
    rewrite = save_ort_model(tmp_path / "int8.onnx", tmp_path / "int8.ort.onnx")
    model = onnx.load(str(tmp_path / "int8.ort.onnx"))
    onnx.checker.check_model(model)
    depth = len(vit.blocks)
    constant = {i.name for i in model.graph.initializer}
    integer = [n for n in model.graph.node if n.op_type == "MatMulIntegerToFloat" and n.domain == "com.microsoft"]
    patch_embedding = [n for n in integer if n.name.endswith("Conv.integer")]
    fused = [n for n in integer if n.input[1] in constant and n not in patch_embedding]  # the Linears, with their integer weights
    assert rewrite.linears_fused == 4 * depth and rewrite.qkv_split == depth  # qkv, proj, fc1, fc2 of every block
    assert rewrite.patch_embeddings == len(patch_embedding) == 1 and "Conv" not in {n.op_type for n in model.graph.node}
    assert len(fused) == 6 * depth  # qkv as q, k and v
    # Every float matmul of two dequantized activations (q @ k^T; attention x v too where it is quantized)
    # is an integer one, its second operand signed: no MatMul reads two DequantizeLinears any more.
    source_producers, source_constants = producers_of(source), {w.name for w in source.graph.initializer}

    def dequantized_activation(name: str) -> bool:  # through k's transpose
        node = source_producers.get(name)
        if node is not None and node.op_type == "Transpose":
            return dequantized_activation(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear" and node.input[0] not in source_constants

    activation_matmuls = [n for n in source.graph.node if n.op_type == "MatMul" and all(map(dequantized_activation, n.input))]
    assert rewrite.activation_matmuls == len(integer) - len(fused) - 1 == len(activation_matmuls) >= depth
    biased = 4 * depth - (0 if qkv_bias else depth)
    assert sum(len(n.input) == 7 for n in fused) == biased + (2 * depth if qkv_bias else 0)  # each with its bias, if it has one
    assert [n.op_type for n in model.graph.node].count("Add") == [n.op_type for n in source.graph.node].count("Add") - biased
    # No Split is left, and k is transposed once, from the GEMM's [b, N, heads, dim] straight to [b, heads, dim, N].
    assert "Split" not in {n.op_type for n in model.graph.node}
    perms = [list(onnx.helper.get_attribute_value(n.attribute[0])) for n in model.graph.node if n.op_type == "Transpose"]
    assert perms.count([0, 2, 3, 1]) == depth and [0, 1, 3, 2] not in perms
    # Layout changes come after the per-tensor quantizers, so they move codes: no quantizer reads a
    # Transpose or Reshape, and k's transpose reads k's codes. q's scale (head_dim 16: 0.25, a power of
    # two) is in its GEMM: no Mul reads a GEMM.
    producers = producers_of(model)

    def origin(name: str):  # the node a tensor comes from, through layout changes
        node = producers[name]
        return origin(node.input[0]) if node.op_type in ("Transpose", "Reshape") else node

    assert rewrite.layout_moves > 0 and rewrite.scales_folded == depth
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear" and getattr(producers.get(n.input[0]), "op_type", "") in ("Transpose", "Reshape")]
    k_transposes = [n for n in model.graph.node if n.op_type == "Transpose" and list(n.attribute[0].ints) == [0, 2, 3, 1]]
    assert [origin(n.input[0]).op_type for n in k_transposes] == ["QuantizeLinear"] * depth
    assert not [n for n in model.graph.node if n.op_type == "Mul" and n.input[1] in constant and producers[n.input[0]].op_type == "MatMulIntegerToFloat"]
    # Weights reach a float kernel only in the head's Gemm; every activation pair is uint8 (but the
    # activation matmuls' second operands), and the shifted ones are the source's int8 activation pairs.
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node.op_type)
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in values]
    assert {op for n in weight_dqs for op in users[n.output[0]]} == {"Gemm"}
    signed = {n.input[5] for n in integer if n.input[1] not in constant}  # the activation matmuls' second operands
    zeros = {n.input[2]: values[n.input[2]].dtype for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in values}
    assert zeros and {dtype for name, dtype in zeros.items() if name not in signed} == {np.dtype(np.uint8)}
    assert {values[name].dtype for name in signed} == {np.dtype(np.int8)}
    source_values = {i.name: numpy_helper.to_array(i) for i in source.graph.initializer}
    assert rewrite.activations_shifted == sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[0] not in source_values
                                              and source_values[n.input[2]].dtype == np.int8 for n in source.graph.node)  # fmt: skip
    # The integer weights are the exported ones, transposed to [in, out], bit for bit.
    stored = [w.T.tobytes() for w in weight_initializers(source).values() if w.ndim == 2]
    by_name = {n.name: values[n.input[1]] for n in fused}
    for name, weight in by_name.items():
        if name.endswith(".part0"):  # the qkv weight is its three column blocks side by side
            stored.remove(np.concatenate([by_name[name[:-1] + str(i)] for i in range(3)], axis=1).tobytes())
        elif ".part" not in name:
            stored.remove(weight.tobytes())
    assert len(stored) == 1  # the head's, which stays a Gemm
    # The patch embedding's integer weight is the exported [out, c, kh, kw] one as [c * kh * kw, out].
    conv_weight = next(w for w in weight_initializers(source).values() if w.ndim == 4)
    assert np.array_equal(values[patch_embedding[0].input[1]], conv_weight.reshape(len(conv_weight), -1).T)
    x = torch.cat([tiny_images(16, seed=500 + i) for i in range(2)]).numpy()
    before, after = load_model("ort", tmp_path / "int8.onnx", 1)(x), load_model("ort", tmp_path / "int8.ort.onnx", 1)(x)
    np.testing.assert_allclose(after, before, atol=1e-5 * np.abs(before).max())


def test_layout_changes_move_after_per_tensor_quantizers_only(tmp_path):
    """x -> Transpose -> Mul(0.5) -> QuantizeLinear (one scale) becomes x -> Mul -> Q -> Transpose, bit for
    bit; a Transpose before a per-channel QuantizeLinear, or before a Mul whose [1, 1, 1] factor would
    broadcast its input to another rank, stays where it is."""
    from onnx import TensorProto, helper, numpy_helper

    import onnxruntime as ort

    from utils.ort_model import _sink_layout_ops

    def init(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    nodes = [helper.make_node("Transpose", ["images"], ["t1"], perm=[0, 2, 1]), helper.make_node("Mul", ["t1", "half"], ["m1"]),
             helper.make_node("QuantizeLinear", ["m1", "s", "z"], ["q1"]), helper.make_node("DequantizeLinear", ["q1", "s", "z"], ["y1"]),
             helper.make_node("Transpose", ["images"], ["t2"], perm=[0, 2, 1]),  # per channel (axis 2): stays
             helper.make_node("QuantizeLinear", ["t2", "s3", "z3"], ["q2"], axis=2), helper.make_node("DequantizeLinear", ["q2", "s3", "z3"], ["y2"], axis=2),
             helper.make_node("Transpose", ["images"], ["t3"], perm=[0, 2, 1]), helper.make_node("Mul", ["t3", "half3d"], ["y3"])]  # fmt: skip
    inits = [init("half", np.float32(0.5)), init("s", np.float32(0.02)), init("z", np.uint8(128)), init("s3", np.float32([0.01, 0.02, 0.03])),
             init("z3", np.uint8([120, 128, 136])), init("half3d", np.full((1, 1, 1), 0.5, np.float32))]  # fmt: skip
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 4, 3]) for name in ("y1", "y2", "y3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [2, 3, 4])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "before.onnx")
    assert _sink_layout_ops(model) == 2  # the first Transpose past the Mul, then past the QuantizeLinear
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "after.onnx")
    assert [n.op_type for n in model.graph.node][:4] == ["Mul", "QuantizeLinear", "Transpose", "DequantizeLinear"]
    assert [n.op_type for n in model.graph.node][4:] == ["Transpose", "QuantizeLinear", "DequantizeLinear", "Transpose", "Mul"]
    x = {"images": np.random.default_rng(0).normal(0, 1, (2, 3, 4)).astype(np.float32)}
    before, after = (ort.InferenceSession(tmp_path / name, providers=["CPUExecutionProvider"]).run(None, x) for name in ("before.onnx", "after.onnx"))
    for old, new in zip(before, after):
        assert np.array_equal(old, new)


@pytest.mark.parametrize("size,kernel,stride,pad,rewritten", [pytest.param(8, 4, 4, 0, True, marks=exact_int8_kernels), (9, 4, 4, 0, False), (8, 3, 1, 1, False)],
                         ids=["patches", "drops_a_row", "overlapping"])  # fmt: skip
def test_only_a_conv_over_whole_patches_becomes_an_integer_matmul(tmp_path, size, kernel, stride, pad, rewritten):
    """Q/DQ image -> Conv(int8 weight per channel, bias): with kernel = stride over an image the patches
    tile exactly, the ONNX Runtime form computes it as patches x weight, equal to a direct convolution of
    the dequantized values; any other Conv is left as it is."""
    from onnx import TensorProto, helper, numpy_helper, shape_inference

    import onnxruntime as ort

    from utils.ort_model import save_ort_model

    rng = np.random.default_rng(1)
    codes = rng.integers(-127, 128, (5, 3, kernel, kernel)).astype(np.int8)
    w_scale, bias, x_scale, x_zero = rng.uniform(0.01, 0.02, 5).astype(np.float32), rng.normal(0, 1, 5).astype(np.float32), np.float32(0.05), np.uint8(120)
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in
             (("w", codes), ("ws", w_scale), ("wz", np.zeros(5, np.int8)), ("b", bias), ("xs", x_scale), ("xz", x_zero))]  # fmt: skip
    nodes = [helper.make_node("QuantizeLinear", ["images", "xs", "xz"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["x"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
             helper.make_node("Conv", ["x", "wf", "b"], ["y"], kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4)]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    onnx.save(shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])), tmp_path / "int8.onnx")
    rewrite = save_ort_model(tmp_path / "int8.onnx", tmp_path / "int8.ort.onnx")
    model = onnx.load(str(tmp_path / "int8.ort.onnx"))
    onnx.checker.check_model(model)
    assert rewrite.patch_embeddings == int(rewritten) and ("Conv" in {n.op_type for n in model.graph.node}) != rewritten
    images = rng.normal(0, 2, (2, 3, size, size)).astype(np.float32)
    out = ort.InferenceSession(tmp_path / "int8.ort.onnx", providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    # The reference: a direct convolution of the dequantized image and weight, in float64.
    x = (np.clip(np.round(images / x_scale) + x_zero, 0, 255) - float(x_zero)) * float(x_scale)
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    w = codes * w_scale[:, None, None, None].astype(np.float64)
    side = (x.shape[-1] - kernel) // stride + 1
    expected = np.empty((2, 5, side, side))
    for i in range(side):
        for j in range(side):
            window = x[:, :, i * stride:i * stride + kernel, j * stride:j * stride + kernel]
            expected[:, :, i, j] = np.einsum("bchw,ochw->bo", window, w) + bias
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_openvino_ir_keeps_int8_weights_and_splits_qkv(tmp_path):
    pytest.importorskip("openvino")
    import xml.etree.ElementTree as ET
    from collections import Counter

    from utils.runtimes import load_model, save_deployed

    qvit = calibrated("cpu_int8")
    exported(qvit, tmp_path, zero_points=True)
    xml, report = save_deployed("openvino", tmp_path / "int8.onnx")
    sizes = report["openvino_ir_constant_bytes"]
    weights = sum(m.weight.numel() for m in qvit.model.modules() if getattr(m, "weight_quant", None) is not None)
    assert sizes["i8"] >= weights  # every weight element one byte
    assert sizes["f32"] < 4 * weights / 2  # what stays float: biases, scales, LayerNorm, embeddings
    depth = len(qvit.model.blocks)
    assert report["openvino_model"] == {"qkv_split": depth}
    # The IR keeps the quantized q.k matmul and softmax as they are (ov.convert_model fused them into a
    # float ScaledDotProductAttention, which ran 1.6x slower), and every activation Q/DQ as a FakeQuantize
    # (q, k and v read one quantized input). The qkv output is no longer split by a copy.
    layers = Counter(layer.get("type") for layer in ET.parse(xml).getroot().iter("layer"))
    activations = [p for p in export_plan(qvit, zero_points=True) if not p.name.endswith(".weight")]
    assert "ScaledDotProductAttention" not in layers and layers["FakeQuantize"] == len(activations)
    assert "Split" not in layers and "VariadicSplit" not in layers
    assert layers["MatMul"] == (3 + 3 + 2) * depth + 1  # q, k, v; q.k, attention x v; proj, fc1, fc2 (every block); the head
    # Each part's codes are its rows of the fused weight's: the IR stores exactly the PyTorch integers
    # (the 1-d int8 constants are zero points).
    import openvino as ov

    stored = sorted(op.get_data().tobytes() for op in ov.Core().read_model(str(xml)).get_ops()
                    if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8 and len(op.get_shape()) >= 2)  # fmt: skip
    expected = [part for name, w in integer_weights(qvit).items() for part in (np.split(w, 3) if name.endswith("attn.qkv") else [w])]
    assert stored == sorted(w.tobytes() for w in expected)
    x = torch.cat([tiny_images(16, seed=77 + i) for i in range(2)]).numpy()
    ir, onnx_model = load_model("openvino", xml, 1)(x), load_model("openvino", tmp_path / "int8.onnx", 1)(x)
    with torch.no_grad():
        reference = qvit(torch.from_numpy(x)).numpy()
    # OpenVINO now fuses q's and k's quantizers into the GEMM outputs and rounds a few ties the other way.
    assert (ir.argmax(1) == onnx_model.argmax(1)).mean() >= 0.99
    assert np.abs(ir - reference).mean() <= 1.5 * np.abs(onnx_model - reference).mean() + 1e-6


# -- bias correction -----------------------------------------------------------------------------------


def layer_inputs_fp32(qvit, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every corrected layer's FP32 input over ``images``, as rows (tokens, or unfolded patches)."""
    from models.ptq.bias_correction import _rows

    seen: dict[str, list] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(_rows(mod, args[0])))
               for n, m in qvit.bias_layers().items()]  # fmt: skip
    with torch.no_grad(), qvit.fp32():
        for x in images:
            qvit(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def test_bias_correction_never_raises_the_calibration_output_error():
    qvit = calibrated("trt_int8", bias_correction={})
    calibration_images = [tiny_images(8, seed=10 + i) for i in range(3)]  # what calibrated() calibrates on
    inputs = layer_inputs_fp32(qvit, calibration_images)
    assert set(inputs) == set(qvit.bias_layers()) and len(inputs) == 10
    improved = 0
    for name, module in qvit.bias_layers().items():
        x = inputs[name]
        w = module.weight.detach().double().reshape(module.weight.shape[0], -1)
        wq = module.weight_quant.fake_quant(module.weight).detach().double().reshape(w.shape)
        xq = module.input_quant.fake_quant(x.float()).double() if not isinstance(module, torch.nn.Conv2d) else None
        if xq is None:  # a convolution's input is quantized per image, before unfolding
            xq = inputs_quantized_conv(qvit, module, calibration_images)
        error = x @ w.T - xq @ wq.T  # output error of the layer alone, before correction
        correction = module.bias_correction.double()
        # Independent reference: the mean of the output error over every calibration token.
        torch.testing.assert_close(correction, error.mean(0), rtol=1e-4, atol=1e-7)
        before, after = error.pow(2).mean(), (error - correction).pow(2).mean()
        assert after <= before + 1e-12
        improved += bool(after < before * (1 - 1e-6))
    assert improved >= 8


def inputs_quantized_conv(qvit, module, images: list[torch.Tensor]) -> torch.Tensor:
    from models.ptq.bias_correction import _rows

    return torch.cat([_rows(module, module.input_quant.fake_quant(x)) for x in images]).double()


def test_bias_correction_changes_only_the_quantized_model_and_survives_saving(tmp_path):
    from models.quant_vit import QVit
    from utils.checkpoint import load_calibrated, read_calibrated, save_calibrated, weights_sha256

    model = make_tiny_vit()
    qvit = calibrated("trt_int8", model=model, bias_correction={"images": 16})
    plain = calibrated("trt_int8")
    x = tiny_images(8, seed=42)
    with torch.no_grad():
        with qvit.fp32():
            fp32 = qvit(x)
        corrected, uncorrected = qvit(x), plain(x)
    qvit_fresh = QVit(make_tiny_vit(), qvit.recipe).eval()
    with torch.no_grad(), qvit_fresh.fp32():
        torch.testing.assert_close(fp32, qvit_fresh(x), rtol=0, atol=1e-5)  # FP32 mode: the original model
    assert not torch.allclose(corrected, uncorrected, atol=1e-6)
    for q in qvit.quantizers().values():  # every quantizer switched off (the profiler's switch): no correction either
        q.enabled = False
    with torch.no_grad():
        torch.testing.assert_close(qvit(x), fp32, rtol=0, atol=0)
    for q in qvit.quantizers().values():
        q.enabled = True
    save_calibrated(qvit, tmp_path / "c.pt", "tiny", weights_sha256(make_tiny_vit()), None)
    record, recipe = read_calibrated(tmp_path / "c.pt")
    assert sum(k.endswith(".bias_correction") for k in record["quantizers"]) == 10
    loaded = QVit(make_tiny_vit(), recipe).eval()
    load_calibrated(loaded, record, tmp_path / "c.pt", weights_sha256(make_tiny_vit()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), corrected, rtol=0, atol=0)


def test_bias_correction_is_exported(tmp_path):
    from utils.runtimes import load_model

    qvit = calibrated("cpu_int8")
    assert all(m.bias_correction is not None for m in qvit.bias_layers().values())
    exported(qvit, tmp_path, zero_points=True)
    x = tiny_images(16, seed=9)
    with torch.no_grad():
        reference = qvit(x).numpy()
        for m in qvit.bias_layers().values():
            m.bias_correction = torch.zeros_like(m.bias_correction)
        without = qvit(x).numpy()
    out = load_model("ort", tmp_path / "int8.onnx", 1)(x.numpy())
    assert np.abs(out - reference).max() < np.abs(out - without).max()


# -- convert_tensorrt.py with the CPU runtimes ----------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """A DeiT-tiny (random weights) calibrated with cpu_int8 by test_qvit.py."""
    from test_cli import deit_tiny_run

    root = tmp_path_factory.mktemp("cpu")
    checkpoint, run = deit_tiny_run(root, "--config", "cpu_int8", "--no-profile")
    return root, checkpoint, run / "calibrated.pt"


def test_unknown_runtime_is_refused_with_the_valid_names(calibrated_run, tmp_path):  # noqa: F811
    _, checkpoint, calibrated_file = calibrated_run
    result = convert_main("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--out", tmp_path / "export",
                          "--runtimes", "ort,onnxruntime")  # fmt: skip
    assert_user_error(result, tmp_path / "export", "--runtimes 'ort,onnxruntime': unknown runtime 'onnxruntime'; valid: ort, openvino, tensorrt")


def test_cpu_recipe_is_refused_for_tensorrt_and_deployed_to_the_cpu_runtimes(cpu_run, tmp_path):
    root, checkpoint, calibrated_file = cpu_run
    out = tmp_path / "export"
    refused = convert_main("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--out", out)
    assert_user_error(refused, out, "recipe cpu_int8 cannot be deployed to TensorRT as calibrated")
    assert "(mapped: uint8" in refused.stderr and "blocks.0." in refused.stderr
    result = convert_main("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--out", out, "--runtimes", "ort,openvino",
                          "--val-dir", root / "data" / "val", "--verify-images", 8, "--batch", 1, "--bench-iters", 1)  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    report = json.loads((folder / "conversion.json").read_text())
    assert {p["plan"] for p in report["points"]} == {"qdq"} and report["runtimes"] == ["ort", "openvino"]
    assert report["tensorrt"]["built"] is False and report["tensorrt"]["reason"]  # not installed here, or not requested
    assert report["bytes"]["int8"] <= 0.30 * report["bytes"]["fp32"]
    for runtime in ("ort", "openvino"):  # random weights: near-flat logits, so agreement is no test here (test_runtime_agrees_... is)
        check = report["verify"][runtime]["int8"]
        assert 0 <= check["top1_agreement"] <= 1 and check["logit_cosine_with_fp32"] > 0.9 and "top1" in check
    assert report["openvino_ir_constant_bytes"]["i8"] > 5_000_000  # DeiT-tiny's 5.5M weights as int8
    assert (folder / "int8.xml").is_file() and (folder / "int8.bin").is_file() and report["openvino_model"]["qkv_split"] == 12
    assert "OpenVINO IR int8.xml/.bin: 12 qkv as q, k, v; constants i8" in result.stdout
    assert (folder / "int8.ort.onnx").is_file() and report["ort_model"]["linears_fused"] == 4 * 12  # DeiT-tiny: 12 blocks
    assert "ONNX Runtime form int8.ort.onnx: 48 Linears with their bias" in result.stdout
    assert report["ort_model"]["scales_folded"] == 12 and ", 12 q scales folded" in result.stdout  # head_dim 64: 1/8
    assert report["ort_model"]["activation_matmuls"] == 12 and report["ort_model"]["patch_embeddings"] == 1  # q @ k^T (attention x v stays float)
    assert ", 12 activation matmuls and 1 patch embedding integer" in result.stdout


def test_missing_openvino_is_one_line_and_the_rest_runs(calibrated_run, tmp_path):  # noqa: F811
    _, checkpoint, calibrated_file = calibrated_run
    shadow = tmp_path / "shadow" / "openvino"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named openvino (removed for this test)')\n")
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, str(ROOT / "convert_tensorrt.py"), "--model", MODEL, "--checkpoint", str(checkpoint), "--calibrated", str(calibrated_file),
           "--out", str(tmp_path / "export"), "--runtimes", "ort,openvino", "--verify-images", "2", "--batch", "1", "--bench-iters", "1"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)
    assert result.returncode == 0, result.stderr
    skipped = [line for line in result.stdout.splitlines() if line.strip().startswith("OpenVINO")]
    assert len(skipped) == 1 and "skipped (openvino does not import" in skipped[0]
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert not (folder / "int8.xml").exists()
    report = json.loads((folder / "conversion.json").read_text())
    assert "ort" in report["verify"] and "openvino" not in report["verify"] and list(report["benchmark"]) == ["ort"]


def test_fqvit_recipe_is_refused_for_the_cpu_runtimes_unless_fallback_is_allowed():
    from convert_tensorrt import plan_export
    from utils.errors import UserError

    qvit = calibrated("fqvit_w8a8_att8")
    with pytest.raises(UserError, match=r"cannot be deployed to ONNX Runtime and OpenVINO as calibrated: \d+ of \d+ quantization points") as info:
        plan_export(qvit, ["ort", "openvino"], allow_fallback=False)
    assert "blocks.0.norm1.input (float: power-of-two-factor" in str(info.value) and "--allow-fallback" in str(info.value)
    plan = plan_export(qvit, ["ort"], allow_fallback=True)
    assert {p.plan for p in plan} == {"qdq", "float"}  # uint8 kept for the CPU runtimes; log2 and PTF in float


@pytest.mark.parametrize("value,message", [({"images": 0}, r"bias_correction.images must be an integer from 1"),
                                           ({"rows": 5}, r"bias_correction: unknown key 'rows'; valid keys: images")])  # fmt: skip
def test_bad_bias_correction_values_are_refused(value, message):
    from quant_config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=message):
        load_recipe("trt_int8", {"bias_correction": value})
