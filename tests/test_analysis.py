"""result_analyze.py on a run folder made by the test itself; Fisher sensitivity against a direct computation."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import ROOT, run_in_process, tiny_images
from models.quant_vit import QVit
from quant_config import load_recipe
from test_cli import assert_user_error, deit_tiny_run
from test_profiler import calibrated
from utils.profiler import point_name
from utils.sensitivity import block_sensitivity, evaluate_keep_fp, fisher_sensitivity

PLOTS = ("qsnr.png", "mse.png", "cosine.png", "blocks.png", "outliers.png", "correlation.png", "accumulated_vs_isolated.png")


def analyse(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "result_analyze.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A real test_qvit.py run (random DeiT-tiny weights, generated images), profiled in both views."""
    return deit_tiny_run(tmp_path_factory.mktemp("analysis"), "--profile", "isolated", "--profile-samples", 2)[1]


def png_ok(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 400, path
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01, f"{path.name} looks blank"


def test_plots_report_and_sensitivity(run_folder, tmp_path):
    hessian = tmp_path / "hessian"
    result = analyse(run_folder, "--sensitivity", "--sensitivity-samples", 4, "--keep-fp", "0,1,2", "--hessian-dir", hessian,
                     "--mixed-recipe", 2, "--mixed-bits", 16, "--workers", 0, "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = Path(result.stdout.strip().splitlines()[-1])
    assert report == run_folder / "report.html"
    for name in (*PLOTS, "sensitivity.png"):
        png_ok(run_folder / "plots" / name)

    # The printed regression is the least-squares fit of the CSV's columns.
    stats = pd.read_csv(run_folder / "qvit_statistics.csv")
    slope, intercept = np.polyfit(stats["outlier_ratio_fp32"], stats["outlier_ratio_int8"], 1)
    printed = re.search(r"slope (\S+), intercept (\S+), R² (\S+)", result.stdout)
    assert float(printed.group(1)) == pytest.approx(slope, abs=1e-4)
    assert float(printed.group(2)) == pytest.approx(intercept, abs=1e-3 * max(abs(intercept), 1e-6) + 1e-9)
    residual = stats["outlier_ratio_int8"] - (slope * stats["outlier_ratio_fp32"] + intercept)
    r2 = 1 - (residual**2).sum() / ((stats["outlier_ratio_int8"] - stats["outlier_ratio_int8"].mean()) ** 2).sum()
    assert float(printed.group(3)) == pytest.approx(r2, abs=1e-4)

    # Self-contained: every image embedded, no reference outside the page.
    page = report.read_text()
    assert page.count('src="data:image/png;base64,') == len(PLOTS) + 1
    assert not re.search(r"(?:src|href)=\"(?!data:)", page) and "http://" not in page and "https://" not in page
    for heading in ("Summary", "Accuracy", "Worst points, accumulated", "Worst points alone", "Fisher sensitivity", "Keeping the most sensitive"):
        assert heading in page

    (csv,) = hessian.glob("sensitivity_*.csv")
    (plot,) = hessian.glob("sensitivity_plot_*.png")
    (keep,) = hessian.glob("keep_fp_*.csv")
    scores = pd.read_csv(csv)
    assert len(scores) == len(stats) and (scores["fisher"] >= 0).all() and (scores["fisher"] > 0).any()
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
    assert scores["fisher"].is_monotonic_decreasing
    png_ok(plot)
    kept = pd.read_csv(keep)
    assert list(kept["K"]) == [0, 1, 2]
    assert kept.loc[1, "kept in float"] == scores.loc[0, "name"]

    # The mixed-precision recipe promotes exactly the two highest-ranked points, and loads onto the model.
    (mixed,) = hessian.glob("mixed_*.yaml")
    recipe = load_recipe(mixed)
    assert recipe.name == "fqvit_w8a8_att8_mp2x16"
    assert recipe.layers == {f"{name}_quant": {"bit_type": {"bits": 16}} for name in scores["name"][:2]}
    assert recipe.activation == load_recipe("fqvit_w8a8_att8").activation
    qvit = QVit(timm.create_model("deit_tiny_patch16_224", pretrained=False), recipe)
    widths = {point_name(path): q.spec.bit_type.bits for path, q in qvit.quantizers().items()}
    assert sorted(name for name, bits in widths.items() if bits == 16) == sorted(scores["name"][:2])
    assert "2 points promoted to 16 bits" in result.stdout

    # A second analysis keeps the first.
    again = analyse(run_folder, "--no-progress")
    assert again.returncode == 0, again.stderr
    second = Path(again.stdout.strip().splitlines()[-1])
    assert second != report and report.is_file() and second.name.startswith("report-")
    assert len([p for p in run_folder.iterdir() if p.name.startswith("plots")]) == 2


def test_interrupted_sensitivity_keeps_the_plots_and_the_report(run_folder, tmp_path, monkeypatch):
    """Ctrl-C during the Fisher step: exit 130, and the plots and report.html written before it stay."""
    import utils.sensitivity

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(utils.sensitivity, "fisher_sensitivity", interrupted)
    target = bad_copy(run_folder, tmp_path, lambda r: None)
    result = run_in_process("result_analyze", target, "--sensitivity", "--hessian-dir", tmp_path / "hessian", "--no-progress")
    assert result.returncode == 130 and result.stderr.strip().splitlines()[-1] == "interrupted"
    for name in PLOTS:
        png_ok(target / "plots" / name)
    page = (target / "report.html").read_text()
    assert "Accuracy" in page and "Fisher sensitivity" not in page
    assert not [p for p in target.rglob("*") if ".partial" in p.name]


def test_newest_run_is_the_default(run_folder, tmp_path):
    log = tmp_path / "log"
    older = log / "20200101-000000"
    shutil.copytree(run_folder, older)
    shutil.copytree(run_folder, log / "20200102-000000", ignore=shutil.ignore_patterns("plots*", "report*"))
    result = run_in_process("result_analyze", "--log-dir", log, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip().splitlines()[-1]) == log / "20200102-000000" / "report.html"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (Debian package `chromium`)")
def test_report_renders_in_headless_chromium(run_folder, tmp_path):
    report = run_folder / "report.html"
    if not report.exists():
        assert analyse(run_folder, "--no-progress").returncode == 0
    shot = tmp_path / "report.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2400", f"--screenshot={shot}", report.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120)
    png_ok(shot)


def bad_copy(run_folder: Path, tmp_path: Path, edit) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_folder, target, ignore=shutil.ignore_patterns("plots*", "report*"))
    edit(target)
    return target


@pytest.mark.parametrize(
    "edit,extra,pattern",
    [
        (lambda r: (r / "qvit_summary.json").unlink(), [], "not a run folder of test_qvit.py"),
        (lambda r: (r / "qvit_statistics.csv").unlink(), [], "no qvit_statistics.csv"),
        (lambda r: (r / "qvit_statistics.csv").write_text("name,kind\nx,weight\n"), [], "missing columns layer_type, block, qsnr_db"),
        (lambda r: (r / "qvit_statistics.csv").write_text((r / "qvit_statistics.csv").read_text().splitlines()[0] + "\n"), [], "an empty run"),
        (lambda r: (r / "qvit_summary.json").write_text("{"), [], "not readable JSON"),
        (lambda r: (r / "calibrated.pt").unlink(), ["--sensitivity"], "no calibrated quantizer state"),
        (lambda r: None, ["--keep-fp", "1"], "add --sensitivity"),
        (lambda r: None, ["--sensitivity", "--keep-fp", "one"], "--keep-fp 'one': expected non-negative integers"),
        (lambda r: None, ["--sensitivity-samples", "0"], "--sensitivity-samples must be at least 1"),
        (lambda r: None, ["--mixed-recipe", "2"], "--mixed-recipe ranks points by their Fisher sensitivity: add --sensitivity"),
        (lambda r: None, ["--sensitivity", "--mixed-recipe", "0"], "--mixed-recipe must be at least 1"),
        (lambda r: None, ["--sensitivity", "--calib-dir", "/nonexistent"], "--calib-dir /nonexistent: no such directory"),
    ],
)
def test_bad_input(run_folder, tmp_path, edit, extra, pattern):
    target = bad_copy(run_folder, tmp_path, edit)
    result = run_in_process("result_analyze", target, "--hessian-dir", tmp_path / "hessian", *extra)  # test_missing_folders: a real process
    assert_user_error(result, tmp_path / "hessian", pattern)
    assert not [p for p in target.iterdir() if p.name.startswith(("plots", "report", ".plots"))]


def test_missing_folders(tmp_path):
    assert_user_error(analyse(tmp_path / "nope"), tmp_path / "x", "no such run folder")
    assert_user_error(analyse("--log-dir", tmp_path), tmp_path / "x", "no run folder under")


# -- the estimator --------------------------------------------------------------------------------------


def reference_fisher(qvit, images: torch.Tensor, labels: torch.Tensor, name: str) -> float:
    """1/(2N) sum_n sum_i (g d)^2 for one point, with the gradient from torch.autograd.grad on an added zero."""
    quantizer = dict(qvit.quantizers())[name + "_quant"]
    total = 0.0
    for image, label in zip(images, labels):
        state = {}

        def inject(module, args, output):
            state["x"] = args[0].detach()
            state["zero"] = torch.zeros_like(output, requires_grad=True)
            return output + state["zero"]

        handle = quantizer.register_forward_hook(inject)
        try:
            with torch.enable_grad(), qvit.fp32():
                loss = F.cross_entropy(qvit(image[None]), label[None])
                (grad,) = torch.autograd.grad(loss, state["zero"])
        finally:
            handle.remove()
        noise = quantizer.fake_quant(state["x"]) - state["x"]
        total += float((grad.double() * noise.double()).square().sum())
    return total / (2 * len(images))


def test_fisher_scores_match_a_direct_computation():
    qvit = calibrated("fqvit_w8a8_att4")
    images, labels = tiny_images(5, seed=3), torch.tensor([1, 4, 7, 2, 9])
    table = fisher_sensitivity(qvit, [(images[:3], labels[:3], 0), (images[3:], labels[3:], 0)]).set_index("name")
    assert table.attrs["images"] == 5 and (table["fisher"] >= 0).all()
    for name in ("patch_embed.proj.input", "blocks.0.norm1.input", "blocks.1.attn.softmax.output", "blocks.1.mlp.fc1.weight", "head.input"):
        assert table.loc[name, "fisher"] == pytest.approx(reference_fisher(qvit, images, labels, name), rel=1e-6), name
    assert sorted(table["rank"]) == list(range(1, len(table) + 1))
    blocks = block_sensitivity(table.reset_index())
    assert list(blocks["group"]) == ["embed", "block 0", "block 1", "head"]
    assert blocks["fisher_sum"].sum() == pytest.approx(table["fisher"].sum())
    assert not any(p.grad is not None for p in qvit.parameters())  # no gradient left behind


def test_points_that_do_not_reach_the_loss_score_zero():
    qvit = calibrated()
    with torch.no_grad():
        qvit.model.head.weight.zero_()  # nothing upstream of the head reaches the loss any more
    table = fisher_sensitivity(qvit, [(tiny_images(3, seed=2), torch.tensor([0, 1, 2]), 0)])
    upstream = table[table["name"] != "head.weight"]
    assert (upstream["noise_energy"] > 0).all()  # they are quantized, with noise ...
    assert (upstream["fisher"] == 0).all()  # ... that cannot change the loss


def test_keep_fp_switches_the_ranked_points_to_float():
    qvit = calibrated()
    batch = [(tiny_images(6, seed=5), torch.arange(6), 0)]
    names = [point_name(p) for p in qvit.quantizers()]
    fp32, results = evaluate_keep_fp(qvit, batch, names, [0, 3, len(names)])
    assert fp32["samples"] == 6
    with torch.no_grad():
        quant = qvit(batch[0][0])
        with qvit.fp32():
            reference = qvit(batch[0][0])
    k0, k3, everything = results
    assert k0.logit_cosine == pytest.approx(float(F.cosine_similarity(reference, quant, dim=1).mean()), abs=1e-6)
    assert k3.kept == names[:3]
    assert everything.agreement_top1 == 1 and everything.logit_cosine == pytest.approx(1.0, abs=1e-6)
    assert everything.top1 == fp32["top1"]
    assert all(q.enabled for q in qvit.quantizers().values())  # restored
    with pytest.raises(ValueError, match="not quantization points"):
        evaluate_keep_fp(qvit, batch, ["nope"], [1])
