"""TensorRT step: the engine inspector's JSON, the ONNX facts it is read against, the FP16 ONNX, the refusal
of recipes TensorRT cannot run as calibrated (all on CPU) and, where tensorrt and a GPU are present, real
INT8/FP16 engines of a tiny calibrated ViT and convert_tensorrt.py end to end."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import calibrated, tiny_images
from test_cli import MODEL, assert_user_error, deit_tiny_run
from test_onnx_export import calibrated_run, convert_cli, convert_main  # noqa: F401  (calibrated_run is a fixture)
from utils.errors import UserError
from utils.onnx_export import export_onnx, export_plan, qdq_hooks, simplify
from utils.tensorrt_engine import check_deployable, compute_nodes, fp16_onnx, summarize_layers, unavailable_reason

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

BLOCK = "/model/blocks/blocks.0"
CONV, QKV, FC1, HEAD = "/model/patch_embed/proj/Conv", f"{BLOCK}/attn/qkv/MatMul", f"{BLOCK}/mlp/fc1/MatMul", "/model/head/Gemm"
SCORES, CONTEXT = f"{BLOCK}/attn/MatMul", f"{BLOCK}/attn/MatMul_1"  # q @ k^T and softmax @ v
QUANTIZED = [CONV, QKV, SCORES, CONTEXT, FC1, HEAD]


def tensor(dtype: str, version: int) -> dict:
    """An inspector tensor entry: TensorRT 10 writes one "Format/Datatype" string, 11 splits out "DataType"."""
    described = {"Float": "Row major linear FP32 format", "Half": "Row major linear FP16 format",
                 "Int8": "Thirty-two wide channel vectorized row major Int8 format", "Int64": "Row major linear Int64 format"}  # fmt: skip
    if version == 10:
        return {"Name": "t", "Location": "Device", "Dimensions": [16, 17, 32], "Format/Datatype": described[dtype]}
    return {"Name": "t", "Location": "Device", "Dimensions": [16, 17, 32], "Format": "Row major linear", "DataType": dtype}


def layer(name: str, kind: str, inputs: list[str], outputs: list[str], onnx_nodes: list[str], version: int, tactic: str = "") -> dict:
    return {
        "Name": name,
        "LayerType": kind,
        "Inputs": [tensor(t, version) for t in inputs],
        "Outputs": [tensor(t, version) for t in outputs],
        "Metadata": "\x1f".join(f"[ONNX Layer: {n}]" for n in onnx_nodes),
        "TacticName": tactic,
    }


def engine_json(version: int, fused_attention: bool = True) -> str:
    """An engine's inspector JSON in the documented layout: INT8 conv and qkv GEMM, attention in one fused
    kernel (or three), the head GEMM fallen back to FP32 and a shape layer; fc1 appears in no layer."""
    if fused_attention:
        attention = [layer("_gemm_mha_v2_myl0_3", "kgen", ["Int8", "Int8", "Int8"], ["Float"], [SCORES, f"{BLOCK}/attn/Softmax", CONTEXT], version)]
    else:
        attention = [
            layer(f"{SCORES}_myl0_3", "gemm", ["Int8", "Int8"], ["Float"], [SCORES], version),
            layer("__myl_SoftmaxQuant_myl0_4", "kgen", ["Float"], ["Int8"], [f"{BLOCK}/attn/Softmax"], version),
            layer(f"{CONTEXT}_myl0_5", "gemm", ["Int8", "Int8"], ["Float"], [CONTEXT], version),
        ]
    layers = [
        layer("Reformatting CopyNode for Input Tensor 0 to /model/patch_embed/proj/Conv", "Reformat", ["Float"], ["Int8"], [], version),
        layer(CONV, "CaskConvolution", ["Int8"], ["Float"], [CONV], version, "sm80_xmma_fprop_implicit_gemm_i8f32"),
        layer("__myl_LnQuant_myl0_1", "kgen", ["Float"], ["Int8"], [f"{BLOCK}/norm1/LayerNormalization", f"{BLOCK}/attn/qkv/QuantizeLinear"], version),
        layer(f"{QKV}_myl0_2", "gemm", ["Int8"], ["Float"], [QKV, f"{BLOCK}/attn/qkv/Add"], version),
        *attention,
        layer(HEAD, "CaskGemm", ["Float"], ["Float"], ["/model/head/DequantizeLinear", HEAD], version),
        layer("/model/Shape", "Shape", [], ["Int64"], ["/model/Shape"], version),
    ]
    io = {"Bindings": ["images", "logits"]} if version == 10 else {"I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "Float"}]}
    return json.dumps({"Layers": layers, **io})


@pytest.mark.parametrize("version", [10, 11])
def test_inspector_summary_precisions_fusion_and_fallbacks(version):
    summary = summarize_layers(engine_json(version), QUANTIZED, [SCORES, CONTEXT])
    assert summary["precisions"] == {"INT8": 5, "FP32": 1, "other": 1}
    assert [(r["name"], r["precision"]) for r in summary["layers"]][1] == (CONV, "INT8")
    assert summary["attention_fused"] is True and summary["attention_layers"] == ["_gemm_mha_v2_myl0_3"]
    assert summary["fallbacks"] == [{"onnx": HEAD, "layers": [HEAD], "precision": "FP32"}]
    assert summary["unmatched"] == [FC1]  # in no layer: its precision is unknown, not called a fallback


def test_inspector_summary_unfused_attention_and_names_only():
    unfused = summarize_layers(engine_json(10, fused_attention=False), QUANTIZED, [SCORES, CONTEXT])
    assert unfused["attention_fused"] is False and unfused["attention_layers"] == []
    assert [f["onnx"] for f in unfused["fallbacks"]] == [HEAD]
    # LAYER_NAMES_ONLY verbosity, the whole transformer in one Myelin node: nothing can be told.
    names = json.dumps({"Layers": [CONV, "{ForeignNode[/model/Concat.../model/head/Gemm]}"], "Bindings": ["images", "logits"]})
    summary = summarize_layers(names, QUANTIZED, [SCORES, CONTEXT])
    assert summary["precisions"] == {"unknown": 2} and summary["attention_fused"] is None
    assert summary["fallbacks"] == [] and summary["unmatched"] == QUANTIZED


def test_dynamic_shape_formats_are_unknown_not_float():
    entry = {"Name": CONV, "LayerType": "CaskConvolution", "Inputs": [{"Format/Datatype": "N/A due to dynamic shapes"}],
             "Outputs": [{"Format/Datatype": "N/A due to dynamic shapes"}], "Metadata": f"[ONNX Layer: {CONV}]"}  # fmt: skip
    summary = summarize_layers(json.dumps({"Layers": [entry]}), [CONV], [])
    assert summary["precisions"] == {"unknown": 1} and summary["fallbacks"] == [] and summary["unmatched"] == [CONV]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trt_int8-calibrated ViT and its simplified FP32 and Q/DQ INT8 ONNX exports."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("trt")
    qvit = calibrated("trt_int8")
    for name, quantized in (("fp32", False), ("int8", True)):
        export_onnx(qvit, folder / f"{name}.raw.onnx", (32, 32), quantized=quantized)
        simplify(folder / f"{name}.raw.onnx", folder / f"{name}.onnx")
    return qvit, folder


def test_compute_nodes_find_the_qdq_gemms_and_the_attention_matmuls(exported):
    _, folder = exported
    quantized, attention = compute_nodes(onnx.load(str(folder / "int8.onnx")))
    # patch embedding, per block qkv / q@k^T / softmax@v / proj / fc1 / fc2, and the head
    assert len(quantized) == 1 + 2 * 6 + 1 and CONV in quantized and HEAD in quantized
    assert attention == [SCORES, CONTEXT, SCORES.replace("blocks.0", "blocks.1"), CONTEXT.replace("blocks.0", "blocks.1")]
    assert compute_nodes(onnx.load(str(folder / "fp32.onnx"))) == ([], attention)  # no Q/DQ in the FP32 model


def test_fp16_onnx_keeps_float32_io_and_matches_fp32(exported):
    _, folder = exported
    fp32 = onnx.load(str(folder / "fp32.onnx"))
    half = fp16_onnx(fp32)
    onnx.checker.check_model(half, full_check=True)
    float_type = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in (*half.graph.input, *half.graph.output)] == [float_type, float_type]
    assert {init.data_type for init in half.graph.initializer if init.data_type in (float_type, onnx.TensorProto.FLOAT16)} == {onnx.TensorProto.FLOAT16}
    x = tiny_images(32, seed=21).numpy()
    ref = ort.InferenceSession(str(folder / "fp32.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    out = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 5e-3
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.97


def test_only_recipes_exported_as_calibrated_are_deployable():
    check_deployable(export_plan(calibrated("trt_int8")), "trt_int8")  # every point symmetric int8 Q/DQ
    plan = export_plan(calibrated("fqvit_w8a8_att4"))
    bad = [p for p in plan if p.plan != "qdq"]
    with pytest.raises(UserError) as info:
        check_deployable(plan, "fqvit_w8a8_att4")
    message = str(info.value)
    assert "\n" not in message and f"{len(bad)} of {len(plan)} quantization points" in message
    assert all(f"{p.name} ({p.plan}: {p.reason})" in message for p in bad[:3]) and bad[3].name not in message
    assert f"and {len(bad) - 3} more" in message and "--config trt_int8" in message and "--onnx-only" in message


def test_unavailable_reason_says_what_is_missing():
    reason = unavailable_reason()
    if importlib.util.find_spec("tensorrt") is None:
        assert reason.startswith("tensorrt is not installed (pip install -r requirements-trt.txt")
    elif not torch.cuda.is_available():
        assert reason == "no CUDA GPU visible"


@pytest.mark.slow
def test_convert_refuses_a_recipe_tensorrt_cannot_run_before_writing_anything(tmp_path):
    root = tmp_path / "run"
    checkpoint, run = deit_tiny_run(root, "--config", "fqvit_w8a8_att4", "--no-profile")
    out = tmp_path / "export"
    args = ["--model", MODEL, "--checkpoint", checkpoint, "--calibrated", run / "calibrated.pt", "--out", out, "--verify-images", 2,
            "--batch", 1, "--bench-iters", 1]  # fmt: skip
    pattern = r"recipe fqvit_w8a8_att4 cannot be deployed to TensorRT as calibrated: \d+ of \d+ quantization points .*blocks\.0\..*--config trt_int8.*--onnx-only"
    assert_user_error(convert_main(*args), out, pattern)
    # The CPU runtimes cannot run it as calibrated either; with --allow-fallback the export is made, points mapped or float.
    assert convert_main(*args, "--onnx-only", "--allow-fallback").returncode == 0


# -- real engines: only where tensorrt and a CUDA GPU are present ---------------------------------------------


@pytest.fixture(scope="module")
def engines(exported):
    """INT8 and FP16 engines (batch 1-16) of the tiny ViT, built by build_engine."""
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    from utils.tensorrt_engine import build_engine

    qvit, folder = exported
    infos = {
        "int8": build_engine(folder / "int8.onnx", folder / "int8.engine", "int8", 16, (32, 32)),
        "fp16": build_engine(folder / "fp32.onnx", folder / "fp16.engine", "fp16", 16, (32, 32)),
    }
    return qvit, folder, infos


@pytest.mark.slow
def test_engines_are_written_and_run_any_batch(engines):
    from utils.tensorrt_engine import EngineRunner
    from utils.timing import timed

    _, folder, infos = engines
    for precision, info in infos.items():
        path = folder / f"{precision}.engine"
        assert path.is_file() and info["bytes"] == path.stat().st_size > 0 and info["build_s"] > 0
        assert not list(folder.glob(f".{precision}.engine.*"))  # no temporary file left
        runner = EngineRunner(path)
        assert runner.max_batch == 16 and runner.sample_shape == (3, 32, 32)
        assert runner(tiny_images(3)).shape == (3, 10)
        assert runner(tiny_images(40)).shape == (40, 10)  # more than the profile's maximum: run in chunks
        x = tiny_images(4).cuda()
        assert timed(lambda: runner(x), 3) > 0


@pytest.mark.slow
def test_int8_engine_agrees_with_the_fake_quant_model(engines):
    from utils.tensorrt_engine import EngineRunner

    qvit, folder, _ = engines
    plan = export_plan(qvit)
    int8, fp16 = EngineRunner(folder / "int8.engine"), EngineRunner(folder / "fp16.engine")
    agree = agree16 = total = 0
    for seed in range(4):
        x = tiny_images(16, seed=200 + seed)
        with torch.no_grad():
            with qdq_hooks(qvit, plan):
                fake_quant = qvit(x)
            with qvit.fp32():
                fp32 = qvit(x)
        agree += int((int8(x).float().cpu().argmax(1) == fake_quant.argmax(1)).sum())
        agree16 += int((fp16(x).float().cpu().argmax(1) == fp32.argmax(1)).sum())
        total += len(x)
    assert agree / total >= 0.99
    assert agree16 / total >= 0.97


@pytest.mark.slow
def test_inspector_reports_int8_layers(engines):
    from utils.tensorrt_engine import EngineRunner, inspect_engine

    _, folder, _ = engines
    summary = inspect_engine(EngineRunner(folder / "int8.engine"), onnx.load(str(folder / "int8.onnx")))
    assert summary["precisions"].get("INT8", 0) > 0
    quantized, _ = compute_nodes(onnx.load(str(folder / "int8.onnx")))
    assert len(summary["fallbacks"]) + len(summary["unmatched"]) < len(quantized)
    fp16 = inspect_engine(EngineRunner(folder / "fp16.engine"), onnx.load(str(folder / "fp32.onnx")))
    assert fp16["precisions"].get("FP16", 0) > 0 and "INT8" not in fp16["precisions"]


@pytest.mark.slow
def test_convert_builds_the_engines_end_to_end(calibrated_run, tmp_path):  # noqa: F811
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    root, checkpoint, calibrated_file = calibrated_run
    out = tmp_path / "export"
    result = convert_cli("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--out", out, "--fp16-engine",
                         "--val-dir", root / "data" / "val", "--verify-images", 6, "--batch", "1,4", "--bench-iters", 2)  # fmt: skip
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in folder.iterdir()) == ["conversion.json", "fp16.engine", "fp32.onnx", "int8.engine", "int8.onnx"]
    trt = json.loads((folder / "conversion.json").read_text())["tensorrt"]
    assert trt["built"] is True and trt["max_batch"] == 4 and set(trt["engines"]) == {"int8", "fp16"}
    for precision, engine in trt["engines"].items():
        assert engine["bytes"] == (folder / f"{precision}.engine").stat().st_size
        assert 0 <= engine["verify"]["top1_agreement"] <= 1 and 0 <= engine["verify"]["top1"] <= 100
        assert engine["inspection"]["layers"]
    assert trt["engines"]["int8"]["inspection"]["precisions"].get("INT8", 0) > 0
    assert [row["batch"] for row in trt["benchmark"]] == [1, 4] and all(row["int8_ms"] > 0 and row["fp16_ms"] > 0 for row in trt["benchmark"])
    assert "INT8 engine layers:" in result.stdout and "attention fused:" in result.stdout


# -- Swin (v1): what TensorRT is given -------------------------------------------------------------------


@pytest.fixture(scope="module")
def swin_exported(tmp_path_factory):
    """A tiny trt_int8-calibrated two-stage Swin and its simplified FP32 and Q/DQ INT8 ONNX exports."""
    from conftest import SWIN_SIZE, make_tiny_swin

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("trt_swin")
    qvit = calibrated("trt_int8", model=make_tiny_swin(), size=SWIN_SIZE)
    for name, quantized in (("fp32", False), ("int8", True)):
        export_onnx(qvit, folder / f"{name}.raw.onnx", (SWIN_SIZE, SWIN_SIZE), quantized=quantized)
        simplify(folder / f"{name}.raw.onnx", folder / f"{name}.onnx")
    return qvit, folder


def test_swin_is_deployable_to_tensorrt_with_every_matmul_quantized(swin_exported):
    qvit, folder = swin_exported
    check_deployable(export_plan(qvit), "trt_int8")  # nothing mapped or left float
    quantized, attention = compute_nodes(onnx.load(str(folder / "int8.onnx")))
    # Per block qkv, q@k^T, attention@v, proj, fc1, fc2 (4 blocks); PatchMerging's reduction; patch embedding; head.
    assert len(quantized) == 6 * 4 + 1 + 1 + 1
    assert len(attention) == 2 * 4 and set(attention) <= set(quantized)


@pytest.mark.slow
def test_swin_int8_engine_agrees_with_the_fake_quant_model(swin_exported):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    from conftest import SWIN_SIZE
    from utils.tensorrt_engine import EngineRunner, build_engine

    qvit, folder = swin_exported
    build_engine(folder / "int8.onnx", folder / "int8.engine", "int8", 16, (SWIN_SIZE, SWIN_SIZE))
    engine = EngineRunner(folder / "int8.engine")
    x = torch.cat([tiny_images(16, seed=220 + i, size=SWIN_SIZE) for i in range(2)])
    with torch.no_grad(), qdq_hooks(qvit, export_plan(qvit)):
        fake_quant = qvit(x)
    assert (engine(x).float().cpu().argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.95
