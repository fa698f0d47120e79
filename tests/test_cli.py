"""test_qvit.py as users run it: outputs, exit codes, one-line errors, nothing half-written."""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, run_in_process
from quant_config import load_recipe
from utils.demo import make_imagenet_folder
from utils.profiler import COLUMNS

MODEL = "deit_tiny_patch16_224"


def run_cli(*args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "test_qvit.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def run_main(*args: object) -> subprocess.CompletedProcess:
    """test_qvit.py's main in this process: for the error paths (test_empty_split and test_cuda_without_gpu
    run a real process) and the runs that fixtures build on."""
    return run_in_process("test_qvit", *args)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet_folder(root / "train", classes=2, per_class=4, seed=0, size=64)
    make_imagenet_folder(root / "val", classes=3, per_class=4, seed=1, size=64)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "deit_tiny.pth"
    torch.save({"model": timm.create_model(MODEL).state_dict()}, path)  # wrapped under 'model'
    return path


def deit_tiny_run(root: Path, *extra: object) -> tuple[Path, Path]:
    """Generated images under ``root/data``, random DeiT-tiny weights, one test_qvit.py run with ``extra``
    flags: returns (checkpoint, run folder)."""
    import timm

    make_imagenet_folder(root / "data" / "train", classes=2, per_class=4, seed=0, size=64)
    make_imagenet_folder(root / "data" / "val", classes=3, per_class=2, seed=1, size=64)
    torch.manual_seed(0)
    checkpoint = root / "deit_tiny.pth"
    torch.save(timm.create_model(MODEL).state_dict(), checkpoint)
    # In-process (the run itself is what the fixtures need; test_end_to_end_run_then_reload_calibrated runs the process).
    result = run_main("--model", MODEL, "--checkpoint", checkpoint, *fast(root / "data", root / "log", "--save-calibrated", *extra))
    assert result.returncode == 0, result.stderr
    return checkpoint, run_folder(result)


def fast(data: Path, log: Path, *extra: object) -> list[object]:
    # No histogram PNGs unless a test asks (a later --hist wins): ~200 of them take a while.
    return ["--data", data, "--log-dir", log, "--batch-size", 4, "--workers", 0, "--no-progress", "--hist", "none", *extra]


def run_folder(result: subprocess.CompletedProcess) -> Path:
    """The folder test_qvit.py names on its last line, ``Run folder: PATH``."""
    label, _, path = result.stdout.strip().splitlines()[-1].partition(": ")
    assert label == "Run folder", result.stdout
    return Path(path)


def assert_user_error(result: subprocess.CompletedProcess, log: Path, pattern: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    # Exactly one error line, and it is the last thing printed (warnings about skipped files may precede it).
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    assert re.search(pattern, lines[-1]), lines[-1]
    assert not log.exists() or not any(log.iterdir()), "a failed run left files behind"


def test_help_documents_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--model", "--checkpoint", "--data", "--calib-dir", "--val-dir", "--config", "--observer", "--calibration-mode",
                 "--calib-size", "--batch-size", "--device", "--workers", "--seed", "--log-dir", "--save-calibrated",
                 "--load-calibrated", "--demo", "--set", "--profile-samples", "--no-profile", "--profile", "--hist"):
        assert flag in result.stdout


def test_end_to_end_run_then_reload_calibrated(data, checkpoint, tmp_path):
    log = tmp_path / "log"
    saved = tmp_path / "saved.pt"
    result = run_cli("--model", MODEL, "--checkpoint", checkpoint, *fast(data, log, "--calib-size", 50, "--save-calibrated", saved, "--hist", "worst:2"))
    assert result.returncode == 0, result.stderr
    run_dir = run_folder(result)
    assert run_dir.parent == log and run_dir.is_dir()
    assert "exceeds the 8 images" in result.stdout
    assert "Top-1 (%)" in result.stdout and "Top-1 agreement" in result.stdout
    summary = json.loads((run_dir / "qvit_summary.json").read_text())
    for key in ("model", "checkpoint_sha256", "config", "calib_samples", "fp32", "int8", "agreement_top1", "timings_s", "versions"):
        assert key in summary
    assert summary["model"] == MODEL
    assert summary["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert summary["config"] == load_recipe("fqvit_w8a8_att8").to_dict()
    assert summary["calib_samples"] == 8
    for side in ("fp32", "int8"):
        m = summary[side]
        assert set(m) >= {"top1", "top5", "precision", "recall", "f1", "samples"}
        assert m["samples"] == 12 and 0 <= m["top1"] <= m["top5"] <= 100
        assert all(0 <= m[k] <= 1 for k in ("precision", "recall", "f1"))
    assert 0 <= summary["agreement_top1"] <= 1
    assert set(summary["timings_s"]) == {"calibration", "eval_fp32", "eval_int8", "eval_wall"}
    assert all(t > 0 for t in summary["timings_s"].values())
    timings = summary["timings_s"]
    assert timings["eval_wall"] >= timings["eval_fp32"] + timings["eval_int8"]
    assert summary["eval_images_per_s"] == pytest.approx(summary["fp32"]["samples"] / timings["eval_wall"])
    memory = summary["peak_memory_mb"]
    assert 50 < memory["host_process"] < 24 * 1024 and memory["device"] is None
    assert summary["versions"]["torch"] == torch.__version__
    assert "Top-1 (%)" in (run_dir / "qvit_results.txt").read_text()
    assert (run_dir / "calibrated.pt").is_file() and saved.read_bytes() == (run_dir / "calibrated.pt").read_bytes()
    # The terminal says where everything went: the folder's contents, the saved copy, the folder (last).
    lines = result.stdout.strip().splitlines()
    histograms = len(list(run_dir.glob("*_hist.png")))
    assert lines[-3:] == [f"In the run folder: calibrated.pt, qvit_results.txt, qvit_statistics.csv, qvit_summary.json and {histograms} histogram images (*_hist.png)",
                          f"Saved calibrated quantizers: {saved}", f"Run folder: {run_dir}"]  # fmt: skip
    # The profiler, by default: statistics of every point, a histogram each, totals in the summary.
    stats = pd.read_csv(run_dir / "qvit_statistics.csv")
    assert list(stats.columns) == [c for c in COLUMNS if not c.startswith("iso_")]
    profile = summary["profile"]
    assert profile["samples"] == 12 and profile["points"] == len(stats) > 100  # DeiT-tiny: 12 blocks
    assert profile["views"] == ["accumulated"] and len(profile["worst"]) == 10
    assert 0 < profile["logit_cosine"] <= 1 and profile["qsnr_db_mean"] > 0
    assert sorted(p.name for p in run_dir.glob("*_hist.png")) == sorted(f"{n}_hist.png" for n in stats.nsmallest(2, "qsnr_db")["name"])
    assert "Profile (12 images" in result.stdout and "Worst points" in result.stdout

    again = run_cli(
        "--model", MODEL, "--checkpoint", checkpoint,
        *fast(data, log, "--load-calibrated", run_dir / "calibrated.pt", "--profile", "isolated", "--hist", "worst:3", "--profile-samples", 5),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    second = run_folder(again)
    assert second != run_dir and run_dir.is_dir()
    reloaded = json.loads((second / "qvit_summary.json").read_text())
    assert reloaded["int8"] == summary["int8"] and reloaded["agreement_top1"] == summary["agreement_top1"]
    assert reloaded["calib_samples"] == 0 and reloaded["calibration"]["loaded_from"].endswith("calibrated.pt")
    iso = pd.read_csv(second / "qvit_statistics.csv")
    assert list(iso.columns) == list(COLUMNS) and iso["iso_logit_cosine"].between(0, 1 + 1e-6).all()
    assert reloaded["profile"]["samples"] == 5 and len(reloaded["profile"]["isolated_worst"]) == 10
    worst3 = iso.nsmallest(3, "qsnr_db")["name"]
    assert sorted(p.name for p in second.glob("*_hist.png")) == sorted(f"{n}_hist.png" for n in worst3)

    third = run_cli("--model", MODEL, "--checkpoint", checkpoint, *fast(data, log, "--load-calibrated", run_dir / "calibrated.pt", "--no-profile"))
    assert third.returncode == 0, third.stderr
    plain = run_folder(third)
    assert "profile" not in json.loads((plain / "qvit_summary.json").read_text())
    assert not (plain / "qvit_statistics.csv").exists() and not list(plain.glob("*.png"))

    other_weights = tmp_path / "other.pth"
    import timm

    torch.save(timm.create_model(MODEL).state_dict(), other_weights)
    log2 = tmp_path / "log2"
    mismatch = run_cli("--model", MODEL, "--checkpoint", other_weights, *fast(data, log2, "--load-calibrated", run_dir / "calibrated.pt"))
    assert_user_error(mismatch, log2, "calibrated on other weights")


def test_demo_runs_offline(tmp_path):
    log = tmp_path / "log"
    result = run_cli("--demo", "--log-dir", log, "--no-progress", "--workers", 0)
    assert result.returncode == 0, result.stderr
    assert "mean nothing" in result.stdout
    run_dir = run_folder(result)
    summary = json.loads((run_dir / "qvit_summary.json").read_text())
    assert summary["demo"] is True and summary["int8"]["samples"] == 100 and summary["calib_samples"] == 100
    # The default --hist all: a histogram of every profiled point, and the terminal says how many.
    names = pd.read_csv(run_dir / "qvit_statistics.csv")["name"]
    assert sorted(p.name for p in run_dir.glob("*_hist.png")) == sorted(f"{n}_hist.png" for n in names)
    assert f"and {len(names)} histogram images (*_hist.png)" in result.stdout


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path):
    """Data parallel on the CPU (gloo): the same scales and metrics as one process, one run folder, one voice."""
    common = ["--demo", "--no-progress", "--workers", 0, "--no-profile", "--batch-size", 16, "--limit", 64, "--save-calibrated"]
    single = run_cli(*common, "--log-dir", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "test_qvit.py"), *map(str, common), "--log-dir", str(tmp_path / "two")]  # fmt: skip
    double = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert double.returncode == 0, double.stderr
    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1 and run_folder(double) == runs[0]
    assert double.stdout.count("Evaluating FP32 and INT8 on 64 images") == 1  # rank 1 prints nothing
    one = json.loads((run_folder(single) / "qvit_summary.json").read_text())
    two = json.loads((runs[0] / "qvit_summary.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    assert two["calib_samples"] == one["calib_samples"] == 100 and two["int8"]["samples"] == one["int8"]["samples"] == 64
    for key in ("fp32", "int8", "agreement_top1"):
        assert two[key] == one[key], key
    assert two["logit_cosine_mean"] == pytest.approx(one["logit_cosine_mean"], rel=1e-9)
    scales_one = torch.load(run_folder(single) / "calibrated.pt", weights_only=True)["quantizers"]
    scales_two = torch.load(runs[0] / "calibrated.pt", weights_only=True)["quantizers"]
    assert scales_one.keys() == scales_two.keys()
    for key, value in scales_one.items():
        torch.testing.assert_close(scales_two[key], value, rtol=1e-6, atol=0, msg=key)


@pytest.mark.parametrize(
    "make_args,pattern",
    [
        (lambda d, t: ["--data", t / "missing"], "missing: no such directory"),
        (lambda d, t: ["--calib-dir", d / "train"], "no data: pass --data"),
        (lambda d, t: ["--data", d, "--calib-size", 0], "--calib-size must be at least 1"),
        (lambda d, t: ["--data", d, "--config", "nope"], "config 'nope' not found; shipped recipes"),
        (lambda d, t: ["--data", d, "--observer", "median"], "unknown observer 'median'; valid: kl, minmax, omse, percentile"),
        (lambda d, t: ["--data", d, "--set", "activation.obsrver=kl"], "unknown key 'activation.obsrver'"),
        (lambda d, t: ["--data", d, "--set", "attention.bit_type.bits=1"], "bits must be an integer from 2 to 16"),
        (lambda d, t: ["--data", d, "--set", "gptq={damp: 2}"], "gptq.damp must be a number in"),
        (lambda d, t: ["--data", d, "--model", "vit_base_patch16_2244"], "unknown model 'vit_base_patch16_2244'; did you mean"),
        (lambda d, t: ["--data", d, "--checkpoint", t / "none.pth"], "none.pth: no such file"),
        (lambda d, t: ["--data", d, "--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda"),
        (lambda d, t: ["--data", d, "--limit", 0], "--limit must be at least 1"),
        (lambda d, t: ["--data", d, "--device", "cpu", "--amp"], "--amp needs a CUDA device"),
        (lambda d, t: ["--demo", "--data", d], "--demo makes its own model"),
        (lambda d, t: ["--data", d, "--load-calibrated", t / "x.pt", "--observer", "kl"], "uses the recipe stored in the file"),
        (lambda d, t: ["--data", d, "--hist", "worst:0"], "--hist 'worst:0': expected all, none or worst:K"),
        (lambda d, t: ["--data", d, "--hist", "some"], "--hist 'some': expected all, none or worst:K"),
        (lambda d, t: ["--data", d, "--profile-samples", 0], "--profile-samples must be at least 1"),
        (lambda d, t: ["--data", d, "--profile", "both"], "invalid choice: 'both'"),
    ],
)
def test_bad_arguments(data, tmp_path, make_args, pattern):
    log = tmp_path / "log"
    assert_user_error(run_main(*make_args(data, tmp_path), "--log-dir", log, "--no-progress"), log, pattern)


@pytest.mark.parametrize(
    "layers,pattern",
    [
        ('{"blocks.*.mlp.fc3.input_quant": null}', r"layers: pattern 'blocks.\*.mlp.fc3.input_quant' matches no quantization point"),
        ('{"*fc2.input_quant": {quantizer: twin_uniform}}', r"layers\['\*fc2.input_quant'\]: the twin_uniform quantizer uses signed codes"),
        ('{"*.norm1.input_quant": {power_of_two_factor: true, calibration_mode: layer_wise}}', "power_of_two_factor needs calibration_mode: channel_wise"),
        ('{"blocks.0.norm1.input_quant": {dynamic_token_scale: true, token_scale_group: 5}}',
         r"token_scale_group 5 does not divide the \d+ channels of blocks.0.norm1.input_quant"),
    ],
)
def test_layers_that_do_not_fit_the_model_are_refused(tmp_path, layers, pattern):
    """Checked when the model's points are known (the demo model: no data or weights needed)."""
    log = tmp_path / "log"
    assert_user_error(run_main("--demo", "--set", f"layers={layers}", "--log-dir", log, "--no-progress"), log, pattern)


def test_offline_hub_fails_at_once_without_trying_to_download(data, tmp_path, monkeypatch):
    """No network (every TCP connection refused) and nothing cached: one line before any download starts."""
    import socket

    import timm.models._builder as builder

    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    def download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(builder, "load_pretrained", download)
    log = tmp_path / "log"
    result = run_main("--model", "vit_base_patch16_224", "--data", data, "--log-dir", log, "--no-progress")
    assert_user_error(result, log, r"^error: cannot load pretrained weights for vit_base_patch16_224 \(huggingface.co unreachable: "
                                   r"Network is unreachable\); pass --checkpoint PATH to use local weights$")  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(data, tmp_path):
    log = tmp_path / "log"
    assert_user_error(run_cli("--data", data, "--device", "cuda", "--log-dir", log), log, "no CUDA GPU is available")


def test_bad_config_file(data, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text((ROOT / "configs" / "fqvit_w8a8_att8.yaml").read_text().replace("observer: minmax", "observer: mean", 1))
    log = tmp_path / "log"
    assert_user_error(run_main("--data", data, "--config", cfg, "--log-dir", log), log, r"bad.yaml.weight.observer: unknown observer 'mean'")


def test_empty_split(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "val").mkdir()
    log = tmp_path / "log"
    assert_user_error(run_cli("--data", tmp_path / "data", "--log-dir", log), log, "val: no class folders")


def test_checkpoint_of_another_model(data, tmp_path):
    import timm

    wrong = tmp_path / "small.pth"
    torch.save(timm.create_model("deit_small_patch16_224").state_dict(), wrong)
    log = tmp_path / "log"
    result = run_main("--model", MODEL, "--checkpoint", wrong, *fast(data, log))
    assert_user_error(result, log, r"does not fit deit_tiny_patch16_224: \d+ shape mismatch\(es\): .*\(checkpoint \[384")


def test_corrupt_checkpoint(data, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage" * 100)
    log = tmp_path / "log"
    assert_user_error(run_main("--model", MODEL, "--checkpoint", bad, *fast(data, log)), log, "cannot read it as a PyTorch file")


def test_unreadable_calibration_images_leave_no_run_folder(checkpoint, tmp_path):
    root = tmp_path / "data"
    make_imagenet_folder(root / "val", classes=1, per_class=2, seed=0, size=64)
    (root / "train" / "n01440764").mkdir(parents=True)
    for i in range(3):
        (root / "train" / "n01440764" / f"{i}.JPEG").write_bytes(b"\xff\xd8\xff broken jpeg")
    log = tmp_path / "log"
    result = run_main("--model", MODEL, "--checkpoint", checkpoint, *fast(root, log))
    assert_user_error(result, log, r"no readable calibration image \(3 unreadable\)")


def test_unreadable_images_are_skipped_and_reported(checkpoint, data, tmp_path):
    root = tmp_path / "data"
    make_imagenet_folder(root / "train", classes=1, per_class=3, seed=0, size=64)
    make_imagenet_folder(root / "val", classes=1, per_class=3, seed=1, size=64)
    (root / "val" / "n01440764" / "zz_broken.JPEG").write_bytes(b"\xff\xd8\xff broken jpeg")
    log = tmp_path / "log"
    result = run_cli("--model", MODEL, "--checkpoint", checkpoint, *fast(root, log))
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable evaluation image" in result.stdout
    summary = json.loads((run_folder(result) / "qvit_summary.json").read_text())
    assert summary["evaluation"]["unreadable"] == 1 and summary["int8"]["samples"] == 3
    assert summary["profile"]["samples"] == 3  # the profiler skips it too


def test_bad_calibrated_files(data, checkpoint, tmp_path):
    log = tmp_path / "log"
    garbage = tmp_path / "calibrated.pt"
    garbage.write_bytes(b"nope")
    assert_user_error(run_main("--model", MODEL, "--checkpoint", checkpoint, *fast(data, log, "--load-calibrated", garbage)), log, "cannot read it")
    torch.save({"something": torch.zeros(1)}, garbage)
    assert_user_error(
        run_main("--model", MODEL, "--checkpoint", checkpoint, *fast(data, log, "--load-calibrated", garbage)), log, "not written by test_qvit.py"
    )
    exists = tmp_path / "exists.pt"
    exists.write_bytes(b"")
    assert_user_error(run_main(*fast(data, log, "--save-calibrated", exists)), log, "file exists")


def test_accuracy_table_writes_no_table_when_every_run_fails(data, tmp_path):
    log = tmp_path / "log"
    cmd = [sys.executable, "-m", "bench.accuracy_table", "--data", data, "--recipes", "nosuch", "--log-dir", log]
    result = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed: config 'nosuch' not found; shipped recipes: " in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "error: every run failed; no table written"
    assert not log.exists() or not any(log.iterdir())
