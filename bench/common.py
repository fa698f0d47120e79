"""What the benchmarks share: where ../shared is, a QVit on a model's weights, batches of images."""
from __future__ import annotations

from pathlib import Path

import torch

from models.quant_vit import QVit
from quant_config import QuantRecipe, load_recipe
from utils.checkpoint import create_model, load_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared"  # beside the repository root
SHARED_DEIT = SHARED / "weights" / "deit_tiny_patch16_224.pth"  # the one model with real weights here


def deit_checkpoint(model_name: str) -> Path | None:
    """The shared DeiT-tiny checkpoint for DeiT-tiny when it exists; None (random weights) otherwise."""
    return SHARED_DEIT if model_name == "deit_tiny_patch16_224" and SHARED_DEIT.is_file() else None


def build_qvit(model_name: str, recipe: QuantRecipe | str, checkpoint: Path | None) -> QVit:
    """A fresh QVit (eval mode) on ``checkpoint``'s weights, random ones without. Build it outside
    torch.inference_mode: a recipe's Fisher scale search back-propagates through the weights."""
    model = create_model(model_name, pretrained=False)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, model_name)
    return QVit(model, load_recipe(recipe) if isinstance(recipe, str) else recipe).eval()


def image_batches(model_name: str, data: Path | None, batch: int, count: int) -> list[torch.Tensor]:
    """``count`` batches: real images of ``data`` (an ImageNet-layout folder) with the model's transform,
    or random tensors without it."""
    torch.manual_seed(0)
    if data is None:
        return [torch.randn(batch, 3, 224, 224) for _ in range(count)]
    from timm.data import create_transform, resolve_data_config

    from utils.data import calibration_subset, make_loader, scan_split

    transform = create_transform(**resolve_data_config(model=create_model(model_name, pretrained=False)))
    samples = calibration_subset(scan_split(data), batch * count, seed=0)
    return [x for x, _, _ in make_loader(samples, transform, batch, workers=2) if x is not None][:count]
