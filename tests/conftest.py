"""Shared fixtures: tiny randomly initialised ViTs, generated image folders, and the ../shared data."""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.pth"
SHARED_DATA = SHARED / "data" / "imagenet-mini"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The tests that compare ONNX Runtime's or OpenVINO's uint8 x int8 GEMMs with PyTorch's integers: expected
# to fail on CPUs whose kernels saturate pairs of products (x86 without VNNI, probed by utils/int8_kernels.py).
def _int8_kernels_saturate() -> bool:
    from utils.int8_kernels import int8_pairs_saturate

    return int8_pairs_saturate()


exact_int8_kernels = pytest.mark.xfail(_int8_kernels_saturate(), reason="this CPU's uint8 x int8 kernels saturate (utils/int8_kernels.py)", strict=False)

requires_shared = pytest.mark.skipif(
    not (SHARED_WEIGHTS.is_file() and (SHARED_DATA / "train").is_dir() and (SHARED_DATA / "val").is_dir()),
    reason="../shared (real ImageNet images and DeiT-tiny weights) is absent",
)


# Every observer and what rides on it: MinMax, PTF (its own histogram beside MinMax), the integer
# softmax, KL, percentile, OMSE with the LayerNorm reparameterization.
OBSERVER_CASES = [
    ("minmax_w8a8", {}),
    ("fqvit_w8a8_att8", {}),
    ("fqvit_w8a8_att4", {"activation.observer": "kl", "layernorm_input.observer": "kl"}),
    ("fqvit_w8a8_att8", {"activation.observer": "percentile", "layernorm_input.observer": "percentile"}),
    ("trt_int8", {}),
]
OBSERVER_CASE_IDS = [f"{r}-{'-'.join(o.values()) or 'default'}" for r, o in OBSERVER_CASES]


def make_tiny_vit(seed: int = 0, **kwargs) -> VisionTransformer:
    """A 2-block ViT on 32x32 images.

    timm's init, with the LayerNorm affine perturbed and the class token / position embedding given the
    magnitude they have in trained models (at init the class token is ~20x smaller than the patch tokens,
    so any per-tensor quantization of the residual stream would erase it).
    """
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    args.update(kwargs)
    model = VisionTransformer(**args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        if getattr(model, "cls_token", None) is not None:
            model.cls_token.normal_(0, 0.5)
        model.pos_embed.normal_(0, 0.2)
    return model


def make_tiny_distilled():
    """A 2-block distilled DeiT (class and distillation tokens, two heads averaged) on 32x32 images."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        model.cls_token.normal_(0, 0.5)
        model.dist_token.normal_(0, 0.5)
        model.pos_embed.normal_(0, 0.2)
    return model


SWIN_SIZE = 56  # 14x14 patches of 4: two 7x7 windows a side in stage 0 (shifted blocks, so the mask), one in stage 1


def make_tiny_swin(seed: int = 0, **kwargs):
    """A two-stage Swin (v1): 2 blocks each, window 7, PatchMerging between the stages; on 56x56 images.

    timm's init with the LayerNorm affines, biases and relative position bias tables perturbed, so that
    none of them is the trivial value they start at."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    args = dict(img_size=SWIN_SIZE, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10)
    args.update(kwargs)
    model = SwinTransformer(**args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            elif "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    return model


def tiny_images(n: int = 8, seed: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def calibrated(recipe: str = "fqvit_w8a8_att8", model=None, seed: int = 0, size: int = 32, **overrides):
    """A tiny ViT (``model`` or a fresh one from ``seed``) calibrated with ``recipe`` on 3 batches of 8
    images of ``size`` pixels (a tiny Swin: SWIN_SIZE)."""
    from models.quant_vit import QVit
    from quant_config import load_recipe
    from utils.engine import calibrate

    qvit = QVit(model if model is not None else make_tiny_vit(seed), load_recipe(recipe, overrides or None))
    calibrate(qvit, [(tiny_images(8, seed=10 + i, size=size), None, 0) for i in range(3)], torch.device("cpu"), progress=False)
    return qvit


@pytest.fixture
def tiny_vit() -> VisionTransformer:
    return make_tiny_vit()


def reloaded(source, fresh_model, path):
    """``source`` saved to the calibrated file ``path`` and loaded into a QVit on ``fresh_model`` (the same
    weights as ``source`` was built on, before any reparameterization folded into them)."""
    from models.quant_vit import QVit
    from utils.checkpoint import load_calibrated, read_calibrated, save_calibrated, weights_sha256

    fingerprint = weights_sha256(fresh_model)
    save_calibrated(source, path, "tiny", fingerprint, None)
    record, recipe = read_calibrated(path)
    target = QVit(fresh_model, recipe)
    load_calibrated(target, record, path, fingerprint)
    return target


def run_in_process(module: str, *args: object) -> subprocess.CompletedProcess:
    """``python -m module args`` (a top-level script or a bench module) as its ``main(argv)`` in this process,
    from the repository root: its exit code and what it printed, as :func:`subprocess.run` returns them.

    For the error paths and the runs that only feed later checks: a fresh interpreter costs 3-8 s of
    imports per call. The logging the scripts configure goes to the captured stderr too. Each script keeps
    tests that run it as a real process (exit code, one line, no traceback)."""
    main = importlib.import_module(module).main
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors, sys.exit("...")
                code = exc.code if isinstance(exc.code, int) or exc.code is None else 1
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
    finally:
        os.chdir(cwd)
        root.removeHandler(handler)
    return subprocess.CompletedProcess([module, *map(str, args)], code or 0, out.getvalue(), err.getvalue())
