"""ONNX export with Q/DQ: calibrated scales in the graph, TensorRT's layout, ONNX Runtime vs PyTorch."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, exact_int8_kernels, run_in_process, tiny_images
from test_cli import MODEL, assert_user_error, deit_tiny_run
from test_profiler import calibrated
from utils.onnx_export import check_qdq, export_onnx, export_plan, qdq_hooks, qdq_scales, simplify
from utils.tensorrt_engine import check_deployable

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    folder = tmp_path_factory.mktemp("onnx")
    qvit = calibrated("trt_int8")
    plan = export_onnx(qvit, folder / "raw.onnx", (32, 32))
    tool = simplify(folder / "raw.onnx", folder / "model.onnx")
    return qvit, plan, onnx.load(str(folder / "model.onnx")), folder / "model.onnx", tool


def test_trt_recipe_exports_every_point_as_symmetric_int8(exported):
    qvit, plan, _, _, _ = exported
    assert [p.plan for p in plan] == ["qdq"] * len(qvit.quantizers())
    weights = [p for p in plan if p.name.endswith(".weight")]
    assert weights and all(p.axis == 0 and p.scale.numel() > 1 for p in weights)
    assert all(p.axis is None and p.scale.dim() == 0 for p in plan if not p.name.endswith(".weight"))


def test_graph_carries_the_calibrated_scales_in_adjacent_pairs(exported):
    qvit, plan, model, _, tool = exported
    assert tool.startswith(("onnxsim", "onnxslim"))
    assert check_qdq(model) == []  # every Q feeds only DQs, every DQ reads a Q or an int8 weight, zero points 0
    ops = Counter(n.op_type for n in model.graph.node)
    weights = [p for p in plan if p.name.endswith(".weight")]
    # Activations: QuantizeLinear -> DequantizeLinear; weights: int8 initializer -> DequantizeLinear.
    assert ops["DequantizeLinear"] == len(plan) and ops["QuantizeLinear"] == len(plan) - len(weights)
    in_graph = qdq_scales(model)
    # Per-channel weight scales along axis 0, per-tensor scalars for activations: the PyTorch buffers exactly.
    expected = sorted((tuple(np.atleast_1d(q.scale.numpy()).tolist()) for q in qvit.quantizers().values()))
    assert sorted(tuple(np.atleast_1d(s).tolist()) for s, _ in in_graph) == expected
    assert all(axis == 0 for s, axis in in_graph if np.size(s) > 1)


def test_qdq_emulation_is_the_fake_quant_model_bit_for_bit():
    """convert_tensorrt.py's "PyTorch fake-quant" (the export's Q/DQ pairs emulated in PyTorch) and
    test_qvit.py's model round every value alike, half steps included: on a million values per point,
    a reciprocal multiply (torch's fake_quantize ops) would send some to the neighbouring code."""
    from models.quant_vit import point_name

    qvit = calibrated("cpu_int8")
    plan = {p.name: p for p in export_plan(qvit, zero_points=True)}
    generator = torch.Generator().manual_seed(0)
    checked = 0
    for path, q in qvit.quantizers().items():
        point = plan[point_name(path)]
        if q.is_weight or not point.quantized or point.axis is not None:
            continue
        x = (torch.rand(1000, 1000, generator=generator) * 300 - 150) * float(point.scale)
        with torch.no_grad():
            fake_quant = q(x)
            with qdq_hooks(qvit, list(plan.values())):
                emulated = q(x)
        assert torch.equal(emulated, fake_quant), path
        checked += 1
    assert checked >= 10


@exact_int8_kernels
def test_onnx_runtime_agrees_with_the_fake_quant_model(exported):
    qvit, _, _, path, _ = exported
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    agree = total = 0
    worst = 0.0
    for seed in range(4):
        x = tiny_images(16, seed=100 + seed)
        out = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = qvit(x).numpy()
        agree += int((out.argmax(1) == ref.argmax(1)).sum())
        total += len(x)
        worst = max(worst, float(np.abs(out - ref).max()))
    assert agree / total >= 0.99
    assert worst < 1e-3  # the same arithmetic, up to float summation order
    one = session.run(None, {"images": tiny_images(1, seed=7).numpy()})[0]  # dynamic batch axis
    assert one.shape == (1, 10)


def test_fp32_export_matches_pytorch(tmp_path):
    qvit = calibrated("trt_int8")
    export_onnx(qvit, tmp_path / "fp32.onnx", (32, 32), quantized=False)
    model = onnx.load(str(tmp_path / "fp32.onnx"))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    x = tiny_images(8, seed=3)
    out = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad(), qvit.fp32():
        ref = qvit(x).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_fqvit_recipes_say_what_falls_back_and_what_is_mapped():
    plan = {p.name: p for p in export_plan(calibrated("fqvit_w8a8_att4"))}
    assert plan["blocks.0.norm1.input"].plan == "float" and "power-of-two-factor" in plan["blocks.0.norm1.input"].reason
    assert plan["blocks.0.attn.softmax.output"].plan == "float" and "log2" in plan["blocks.0.attn.softmax.output"].reason
    assert plan["blocks.0.attn.softmax.input"].plan == "float"
    mapped = plan["blocks.0.mlp.fc1.input"]
    assert mapped.plan == "mapped" and "uint8" in mapped.reason
    qz = dict(calibrated("fqvit_w8a8_att4").quantizers())["blocks.0.mlp.fc1.input_quant"]
    lo, hi = -float(qz.zero_point) * float(qz.scale), (255 - float(qz.zero_point)) * float(qz.scale)
    assert float(mapped.scale) == pytest.approx(max(abs(lo), abs(hi)) / 127)
    assert plan["blocks.0.mlp.fc1.weight"].plan == "qdq"
    twin = {"blocks.*.mlp.fc2.input_quant": {"quantizer": "twin_uniform", "bit_type": {"symmetric": True}}}
    plan = {p.name: p for p in export_plan(calibrated("trt_int8", layers=twin))}
    assert plan["blocks.1.mlp.fc2.input"].plan == "float" and "twin_uniform grid" in plan["blocks.1.mlp.fc2.input"].reason
    assert plan["blocks.1.mlp.fc1.input"].plan == "qdq"


# -- convert_tensorrt.py as users run it -------------------------------------------------------------------


def convert_cli(*args: object) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "convert_tensorrt.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)


def convert_main(*args: object) -> subprocess.CompletedProcess:
    """convert_tensorrt.py's main in this process, for its error paths (the end-to-end test's missing
    engine runs a real process)."""
    return run_in_process("convert_tensorrt", *args)


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    """A DeiT-tiny (random weights) calibrated with trt_int8 by test_qvit.py, and its generated images."""
    root = tmp_path_factory.mktemp("convert")
    checkpoint, run = deit_tiny_run(root, "--config", "trt_int8", "--no-profile")
    return root, checkpoint, run / "calibrated.pt"


def test_convert_onnx_only_end_to_end(calibrated_run, tmp_path):
    root, checkpoint, calibrated_file = calibrated_run
    out = tmp_path / "export"
    result = convert_cli("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--onnx-only", "--out", out,
                         "--val-dir", root / "data" / "val", "--verify-images", 4, "--batch", 1, "--bench-iters", 1)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for step in ("[1/4] export", "[2/4] simplify", "[3/4] verify", "[4/4] TensorRT"):
        assert step in result.stdout
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder.parent == out
    assert sorted(p.name for p in folder.iterdir()) == ["conversion.json", "fp32.onnx", "int8.bin", "int8.onnx", "int8.ort.onnx", "int8.xml"]
    report = json.loads((folder / "conversion.json").read_text())
    assert report["verify"]["images"] == 4
    # Each step ends with its seconds, printed and kept.
    assert list(report["seconds"]) == ["export", "simplify", "verify", "benchmark"] and all(s > 0 for s in report["seconds"].values())
    assert f"      verify: {report['seconds']['verify']:.1f} s" in result.stdout.splitlines()
    for runtime in ("ort", "openvino"):
        check = report["verify"][runtime]
        assert check["fp32_max_abs_diff"] < 1e-4
        assert 0 <= check["int8"]["top1_agreement"] <= 1 and 0 <= check["int8"]["top1_agreement_with_fp32"] <= 1
        rows = report["benchmark"][runtime]
        assert [r["batch"] for r in rows] == [1] and rows[0]["int8_ms"] > 0 and rows[0]["speedup"] > 0
    assert {p["plan"] for p in report["points"]} == {"qdq"}
    assert check_qdq(onnx.load(str(folder / "int8.onnx"))) == []
    if importlib.util.find_spec("tensorrt") is None:
        assert report["tensorrt"]["built"] is False and "tensorrt is not installed" in report["tensorrt"]["reason"]
        # Without --onnx-only the missing engine is an error, but the finished ONNX folder stays.
        again = convert_cli("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--out", out, "--verify-images", 2,
                            "--batch", 1, "--bench-iters", 1)  # fmt: skip
        assert again.returncode == 2 and "Traceback" not in again.stderr
        assert again.stderr.strip().splitlines()[-1].startswith("error: no TensorRT engine: tensorrt is not installed")
        assert len(list(out.iterdir())) == 2


@pytest.mark.parametrize(
    "make_args,pattern",
    [
        (lambda r, c, k, t: ["--calibrated", t / "none.pt"], "none.pt: no such file"),
        (lambda r, c, k, t: ["--calibrated", k, "--batch", "0"], "--batch '0': expected positive integers"),
        (lambda r, c, k, t: ["--calibrated", k, "--model", "vit_base_patch16_224"], "was made for deit_tiny_patch16_224"),
        (lambda r, c, k, t: ["--calibrated", c], "not written by test_qvit.py"),
        (lambda r, c, k, t: ["--calibrated", k, "--val-dir", t / "nope"], "no such directory"),
        (lambda r, c, k, t: ["--calibrated", k, "--out", [(t / "file").write_text("x"), t / "file"][1]], "not a directory"),
    ],
)
def test_convert_bad_input(calibrated_run, tmp_path, make_args, pattern):
    root, checkpoint, calibrated_file = calibrated_run
    args = ["--model", MODEL, "--checkpoint", checkpoint, "--out", tmp_path / "export", *make_args(root, checkpoint, calibrated_file, tmp_path)]
    assert_user_error(convert_main(*args), tmp_path / "export", pattern)


def test_convert_refuses_an_unwritable_output_folder(calibrated_run, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere")
    root, checkpoint, calibrated_file = calibrated_run
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = convert_main("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--out", locked)
    assert_user_error(result, locked, "not writable")


def test_scale_searched_trt_recipe_is_deployable_as_is():
    qvit = calibrated("trt_int8_search")
    assert qvit.searched_ratios and any(r < 1 for r in qvit.searched_ratios.values())
    plan = export_plan(qvit)
    assert [p.plan for p in plan] == ["qdq"] * len(qvit.quantizers())
    check_deployable(plan, "trt_int8_search")  # raises for anything TensorRT could not run as calibrated
