"""The integer program from the command line: test_qvit.py --integer-only and convert_tensorrt.py
--integer-only / --golden (exit codes, messages, output files)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from test_cli import MODEL, assert_user_error, deit_tiny_run, fast, run_cli, run_folder, run_main
from test_onnx_export import calibrated_run, convert_cli, convert_main  # noqa: F401 (module fixture)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def integer_run(tmp_path_factory):
    """Random DeiT-tiny weights calibrated with the default recipe (fqvit_w8a8_att8), its generated images."""
    root = tmp_path_factory.mktemp("integer")
    checkpoint, run = deit_tiny_run(root, "--no-profile")
    return root, checkpoint, run / "calibrated.pt"


def test_qvit_integer_only_evaluates_and_profiles_the_program(integer_run, tmp_path):
    root, checkpoint, calibrated_file = integer_run
    log = tmp_path / "log"
    result = run_cli("--model", MODEL, "--checkpoint", checkpoint, "--load-calibrated", calibrated_file, "--integer-only",
                     *fast(root / "data", log, "--profile-samples", 2))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Evaluating FP32 and the integer program" in result.stdout and "integer operations" in result.stdout
    folder = run_folder(result)
    summary = json.loads((folder / "qvit_summary.json").read_text())
    assert summary["integer_only"] is True
    program = summary["integer_program"]
    assert program["nodes"] > 100 and set(program["tensor_types"]) == {"float32", "uint8", "int32"}
    assert "integer-only program" in (folder / "qvit_results.txt").read_text().splitlines()[0]
    table = pd.read_csv(folder / "qvit_statistics.csv")
    assert table["elements"].gt(0).all() and np.isfinite(table["cosine"]).all()  # every point has the program's integers


@pytest.mark.parametrize("extra,pattern", [
    (["--config", "cpu_int8"], r"--integer-only: recipe cpu_int8 keeps the layernorm_input kind in float"),
    (["--set", "integer_gelu=false"], r"integer_gelu: false"),
    (["--profile", "isolated"], r"--profile isolated .* --integer-only"),
])  # fmt: skip
def test_qvit_integer_only_refuses_before_writing(integer_run, tmp_path, extra, pattern):
    root, checkpoint, _ = integer_run
    log = tmp_path / "log"
    result = run_main("--model", MODEL, "--checkpoint", checkpoint, "--integer-only", *fast(root / "data", log, *extra))
    assert_user_error(result, log, pattern)


def test_convert_integer_only_writes_a_verified_integer_onnx_and_golden_vectors(integer_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from utils.integer_onnx import float_tensors

    root, checkpoint, calibrated_file = integer_run
    out = tmp_path / "export"
    result = convert_main("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--integer-only", "--out", out,
                          "--val-dir", root / "data" / "val", "--verify-images", 4, "--batch", 1, "--bench-iters", 1, "--golden", 1)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for step in ("[1/3] export", "[2/3] simplify", "[3/3] verify", "identical logits on every image"):
        assert step in result.stdout
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert sorted(p.name for p in folder.iterdir()) == ["conversion.json", "fp32.onnx", "golden", "int_only.onnx"]
    assert sorted(p.name for p in (folder / "golden").iterdir()) == ["constants.npz", "program.json", "tensors.npz"]
    report = json.loads((folder / "conversion.json").read_text())
    assert report["verify"]["ort_equals_pytorch_integer"] is True and report["verify"]["images"] == 4
    assert report["bytes"]["int_only"] < 0.35 * report["bytes"]["fp32"]
    model = onnx.load(str(folder / "int_only.onnx"))
    assert float_tensors(model) == [] and {n.domain for n in model.graph.node} <= {""}
    assert len(model.graph.value_info) == 0  # derivable by shape inference, not stored
    assert report["golden"]["images"] == 1
    assert list(report["seconds"]) == ["export", "simplify", "verify", "benchmark", "golden"]


def test_convert_integer_only_refuses_a_partial_recipe(calibrated_run, tmp_path):
    root, checkpoint, calibrated_file = calibrated_run  # trt_int8: LayerNorm, softmax and GELU in float
    out = tmp_path / "export"
    result = convert_main("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--integer-only", "--out", out)
    assert_user_error(result, out, r"--integer-only: recipe trt_int8 keeps the layernorm_input kind in float")
    result = convert_main("--model", MODEL, "--checkpoint", checkpoint, "--calibrated", calibrated_file, "--golden", 2, "--out", out)
    assert_user_error(result, out, r"--golden .* needs --integer-only")
