"""The deployment benchmarks against NNCF (bench/bench_deploy.py, bench/crossval_deploy.py): their paired
comparison with NNCF's best variant, the cross-validation folds and pooling, the CLI's errors, and one
real cross-validated run (../shared and nncf only)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, exact_int8_kernels, requires_shared, run_in_process
from test_cli import assert_user_error

WNIDS = ["n01440764", "n01443537", "n01484850"]


def test_bench_compares_each_int8_system_with_the_most_faithful_nncf_variant():
    from bench.deploy_systems import FP32, NNCF_NO_SQ, NNCF_SQ, accuracy_row, accuracy_table, compare_with_best_nncf

    fp32 = np.eye(5)[np.arange(20) % 5]
    changed = lambda *images: np.eye(5)[[(i + 1) % 5 if i in images else i % 5 for i in range(20)]]  # noqa: E731
    outputs = {NNCF_SQ: changed(0, 1, 2), NNCF_NO_SQ: changed(0, 1), "cpu_int8": changed(1, 7, 8), FP32: fp32}
    rows = [accuracy_row(name, "openvino", logits, fp32, np.arange(20) % 5) for name, logits in outputs.items()]
    compare_with_best_nncf(rows, list(outputs.values()), fp32)
    assert "vs_nncf_best" not in rows[1] and "vs_nncf_best" not in rows[3]  # SmoothQuant off changes the fewest classes: the reference; FP32 is none
    rows = rows[:3]
    assert rows[0]["vs_nncf_best"] == {"nncf": NNCF_NO_SQ, "only_first": 1, "only_second": 0, "p_value": 1.0}
    assert rows[2]["vs_nncf_best"] == {"nncf": NNCF_NO_SQ, "only_first": 2, "only_second": 1, "p_value": 1.0}  # images 7, 8 / image 0
    table = accuracy_table("title", rows)
    assert "| cpu_int8 | OpenVINO | 0.8500 | " in "\n".join(table) and table[-1].endswith("| 2 / 1 (p 1.00) |") and table[-2].endswith("| - |")


def crossval_cli(*args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.crossval_deploy", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_crossval_folds_partition_the_images_and_the_last_of_five_is_holdout_splits_held_part(tmp_path):
    from bench.crossval_deploy import make_folds
    from utils.data import scan_split

    source = tmp_path / "train"
    for i in range(23):  # 23 files over 3 classes: folds of 5 and 4 images; only their names are read
        (source / WNIDS[i % 3]).mkdir(parents=True, exist_ok=True)
        (source / WNIDS[i % 3] / f"{i:02d}.JPEG").write_bytes(b"x")
    split = subprocess.run([sys.executable, "-m", "bench.holdout_split", str(source), str(tmp_path / "split")],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert split.returncode == 0, split.stderr
    samples = scan_split(source)
    folds = make_folds(samples, 5)
    assert [len(f.held) for f in folds] == [5, 5, 5, 4, 4]
    assert sorted(s for f in folds for s in f.held) == sorted(samples)  # every image judged exactly once
    for fold in folds:
        assert sorted(fold.calibration) == sorted(set(samples) - set(fold.held))  # calibrated on all the others, never on itself
    assert {Path(path).name for path, _ in folds[4].held} == {p.name for p in (tmp_path / "split" / "held").glob("*/*")}
    assert folds[0].calibration != sorted(folds[0].calibration, key=samples.index)  # a seeded random order, not class-sorted
    assert make_folds(samples, 5)[0].calibration == folds[0].calibration


def test_crossval_scores_the_pooled_logits_of_every_fold():
    from bench.crossval_deploy import pool
    from bench.deploy_systems import FP32, NNCF_NO_SQ, NNCF_SQ

    rng = np.random.default_rng(0)
    folds, keys = [], [("cpu_int8", "ort"), (NNCF_SQ, "openvino"), (NNCF_NO_SQ, "openvino")]
    for k, n in enumerate((6, 4)):
        fp32 = rng.normal(size=(n, 10))
        folds.append({"fold": k, "fp32": fp32, "labels": rng.integers(0, 10, n),
                      "outputs": {key: fp32 + rng.normal(scale=0.8, size=(n, 10)) for key in keys}})  # fmt: skip
    result = pool(folds)
    assert result["images"] == 10 and result["accuracy"][0]["system"] == FP32
    fp32 = np.concatenate([f["fp32"] for f in folds])
    for row, key in zip(result["accuracy"][1:], keys):
        logits = np.concatenate([f["outputs"][key] for f in folds])
        cosines = [a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(logits, fp32)]
        assert row["top1_agreement_with_fp32"] == pytest.approx(np.mean(logits.argmax(1) == fp32.argmax(1)))
        assert row["logit_cosine_with_fp32"] == pytest.approx(np.mean(cosines))
        # Pooled = the image-weighted mean of the folds' (6 and 4 images).
        per_fold = [f["top1_agreement_with_fp32"] for f in row["per_fold"]]
        assert row["top1_agreement_with_fp32"] == pytest.approx((6 * per_fold[0] + 4 * per_fold[1]) / 10)
    assert "vs_nncf_best" in result["accuracy"][1]


@pytest.mark.parametrize("args,message", [
    (["--folds", "1"], r"--folds must be at least 2, got 1"),
    (["--images", "3"], r"--images 3: fewer images than --folds 5"),
    (["--recipes", "cpu_int8,nosuch"], r"config 'nosuch' not found; shipped recipes: .*cpu_int8"),
    (["--recipes", "cpu_int8,configs/cpu_int8.yaml"], r"two recipes with the same file name"),
    (["--checkpoint", "/nonexistent/w.pth"], r"--checkpoint /nonexistent/w.pth: no such file"),
])  # fmt: skip
def test_crossval_refuses_bad_arguments_in_one_line(args, message, tmp_path):
    assert_user_error(run_in_process("bench.crossval_deploy", *args), tmp_path / "nothing", message)


@exact_int8_kernels
@requires_shared
@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="nncf is not installed (requirements-bench.txt)")
def test_crossval_runs_every_system_on_images_none_calibrated_on(tmp_path):
    result = crossval_cli("--images", 20, "--folds", 2, "--json", tmp_path / "cv.json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "cv.json").read_text())
    assert report["images"] == 20 and [f["calibration_images"] for f in report["folds"]] == [10, 10]
    rows = {(r["system"], r["runtime"]): r for r in report["accuracy"]}
    assert set(rows) == {("FP32", "torch"), ("cpu_int8 (fake-quant)", "torch"), ("cpu_int8", "ort"), ("cpu_int8", "openvino"),
                         ("NNCF PTQ, SmoothQuant on", "openvino"), ("NNCF PTQ, SmoothQuant off", "openvino")}  # fmt: skip
    for key in (("cpu_int8", "ort"), ("cpu_int8", "openvino")):  # the deployed files compute what was calibrated
        assert rows[key]["logit_cosine_with_fp32"] > 0.98 and len(rows[key]["per_fold"]) == 2
    assert "2-fold cross-validation of 20 calibration images" in result.stdout and "| fold 1 | fold 2 |" in result.stdout
