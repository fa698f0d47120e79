"""Real DeiT-tiny on real ImageNet images from ../shared (skipped where that folder is absent)."""
from __future__ import annotations

import pytest
import torch
from timm.data import create_transform, resolve_data_config

from conftest import SHARED_DATA, SHARED_WEIGHTS, requires_shared
from models.quant_vit import QVit
from quant_config import load_recipe
from utils.checkpoint import create_model, load_checkpoint
from utils.data import calibration_subset, make_loader, scan_split
from utils.engine import calibrate, evaluate
from utils.profiler import run_profile

pytestmark = [requires_shared, pytest.mark.shared, pytest.mark.slow]

DEIT_TINY_SHA256 = "3e30638a53edff44f3b59ca85f06d8b1421e075a333481f745a38eedacaca700"


@pytest.fixture(scope="module")
def deit_tiny():
    model = create_model("deit_tiny_patch16_224", pretrained=False)
    sha = load_checkpoint(model, SHARED_WEIGHTS, "deit_tiny_patch16_224")
    return model, sha


def test_checkpoint_is_the_documented_one(deit_tiny):
    _, sha = deit_tiny
    assert sha == DEIT_TINY_SHA256


def test_val_split_maps_613_classes_to_canonical_indices():
    samples = scan_split(SHARED_DATA / "val")
    labels = {label for _, label in samples}
    assert len(samples) == 1000 and len(labels) == 613
    assert max(labels) > 900  # indices follow the 1000-class list, not the 613 folders


def test_fqvit_recipe_keeps_real_deit_tiny_predictions(deit_tiny):
    model, _ = deit_tiny
    transform = create_transform(**resolve_data_config(model=model))
    qvit = QVit(model, load_recipe("fqvit_w8a8_att8")).eval()
    device = torch.device("cpu")
    calib = calibration_subset(scan_split(SHARED_DATA / "train"), 128, seed=0)
    calibrate(qvit, make_loader(calib, transform, 32, 2), device, progress=False)
    val = scan_split(SHARED_DATA / "val")[::5]  # 200 images across the classes
    result = evaluate(qvit, make_loader(val, transform, 32, 2), device, progress=False)
    assert result.samples == 200
    assert 70.0 <= result.fp32.top1 <= 92.0  # README of ../shared: about 81% on this val set
    assert result.agreement_top1 >= 0.93
    assert result.logit_cosine >= 0.95
    assert result.int8.top1 >= result.fp32.top1 - 4.0

    # The profiler on the same model: FQ-ViT's hard points are among the ten worst accumulated QSNRs.
    profile = run_profile(qvit, make_loader(val[::6], transform, 32, 2), device)
    worst = [w["name"] for w in profile.totals["worst"]]
    assert any(name.endswith("attn.softmax.output") for name in worst), worst
    assert any(name.endswith("norm2.input") or name == "norm.input" for name in worst), worst
    assert profile.totals["logit_cosine"] == pytest.approx(result.logit_cosine, abs=0.02)


def test_layernorm_reparameterization_helps_real_deit_tiny():
    """trt_int8 with and without its reparam on the same real images: FP32 unchanged, INT8 closer to it."""
    calib = calibration_subset(scan_split(SHARED_DATA / "train"), 128, seed=0)
    val = scan_split(SHARED_DATA / "val")[::5]
    device = torch.device("cpu")
    results, fp32 = {}, {}
    for name, reparam in (("plain", None), ("reparam", {"alpha": 1.0})):
        model = create_model("deit_tiny_patch16_224", pretrained=False)
        load_checkpoint(model, SHARED_WEIGHTS, "deit_tiny_patch16_224")
        transform = create_transform(**resolve_data_config(model=model))
        qvit = QVit(model, load_recipe("trt_int8", {"reparam": reparam})).eval()
        calibrate(qvit, make_loader(calib, transform, 32, 2), device, progress=False)
        results[name] = evaluate(qvit, make_loader(val, transform, 32, 2), device, progress=False)
        x = next(iter(make_loader(val[:8], transform, 8, 0)))[0]
        with torch.no_grad(), qvit.fp32():
            fp32[name] = qvit(x)
    torch.testing.assert_close(fp32["reparam"], fp32["plain"], rtol=0, atol=1e-4)
    assert (results["reparam"].fp32_top5 == results["plain"].fp32_top5).all()
    assert results["reparam"].logit_cosine > results["plain"].logit_cosine + 0.002, {k: r.logit_cosine for k, r in results.items()}
