#!/usr/bin/env python
"""I-ViT's integer-only approximations under post-training quantization, beside this project's integer program.

I-ViT (arXiv 2207.01405) is integer-only, but trained: its Shiftmax, ShiftGELU and I-LayerNorm are
learned around by quantization-aware training. IPTQ-ViT (arXiv 2511.15369) reports that such
approximations collapse without it. This bench measures that on the same DeiT-tiny weights and images:
the official I-ViT code (github.com/zkkli/I-ViT, outside this repository) builds its DeiT-tiny, takes
our weights, runs its activation-range statistics over the calibration images instead of training
(its ``QuantAct`` running min/max; then frozen, as its training ends), and is evaluated on the val
images against the FP32 model. Each of its three integer approximations is then swapped for the float
function alone, to see which one costs what.

    git clone https://github.com/zkkli/I-ViT /tmp/I-ViT        # or any checkout of it
    python -m bench.peer_ivit --ivit-repo /tmp/I-ViT --checkpoint ../shared/weights/deit_tiny_patch16_224.pth \\
        --data ../shared/data/imagenet-mini [--calib-size 1000] [--limit N]

The I-ViT code pins a few tensors to CUDA (``.cuda()``); without a GPU, ``Tensor.cuda`` is made a
no-op in this process so that it runs on the CPU. Nothing of I-ViT is copied into this repository.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import types
from pathlib import Path

if not __package__:
    sys.exit("error: run it from the repository root as: python -m bench.peer_ivit ...")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.checkpoint import create_model, load_checkpoint
from utils.errors import ArgumentParser, UserError, run_script
from utils.metrics import logit_cosine, top1_accuracy, top1_agreement


def import_ivit(repo: Path) -> types.ModuleType:
    """I-ViT's ``models`` folder as the package ``ivit``, without its ``__init__`` (which also imports its
    Swin, whose module imports tkinter); returns ``ivit.vit_quant``."""
    folder = repo / "models"
    if not (folder / "vit_quant.py").is_file():
        raise UserError(f"--ivit-repo {repo}: no models/vit_quant.py (a checkout of github.com/zkkli/I-ViT)")
    package = types.ModuleType("ivit")
    package.__path__ = [str(folder)]
    sys.modules["ivit"] = package
    spec = importlib.util.spec_from_file_location("ivit.vit_quant", folder / "vit_quant.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ivit.vit_quant"] = module
    spec.loader.exec_module(module)
    return module


class FloatSoftmax(nn.Module):
    """Shiftmax's place, computed in float: (x, scale) -> (softmax(x), the next point's fine step)."""

    def forward(self, x, scaling_factor):
        return x.softmax(dim=-1), torch.full_like(scaling_factor, 2.0**-15)


class FloatGELU(nn.Module):
    """ShiftGELU's place, computed in float (the scale of its input stays its output's)."""

    def forward(self, x, scaling_factor):
        return F.gelu(x), scaling_factor


class FloatLayerNorm(nn.LayerNorm):
    """I-LayerNorm's place, computed in float; the returned scale is a fine step for the next quantizer."""

    def forward(self, x, scaling_factor=None):
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return y, torch.full((1,), 2.0**-12, device=y.device)


def swap(model: nn.Module, kind: str) -> None:
    """Replace every I-ViT module of ``kind`` (softmax, gelu, layernorm) by its float version."""
    names = {"softmax": "IntSoftmax", "gelu": "IntGELU", "layernorm": "IntLayerNorm"}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ != names[kind]:
                continue
            if kind == "layernorm":
                new = FloatLayerNorm(child.normalized_shape, child.eps)
                new.load_state_dict({"weight": child.weight.data, "bias": child.bias.data})
            else:
                new = FloatSoftmax() if kind == "softmax" else FloatGELU()
            setattr(parent, name, new)


def ivit_model(vit_quant: types.ModuleType, checkpoint: Path, swapped: str | None, nudge: bool) -> nn.Module:
    """I-ViT's DeiT-tiny with the checkpoint's weights; ``nudge``: LayerNorm weights of exactly 0 become
    1e-6 (I-LayerNorm divides each bias by its weight: a 0 makes it infinite, and every logit NaN)."""
    model = vit_quant.deit_tiny_patch16_224()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    result = model.load_state_dict(state, strict=False)
    weights = [k for k in result.missing_keys if k.endswith(("weight", "bias", "token", "pos_embed"))]
    if weights:
        raise UserError(f"I-ViT's DeiT-tiny did not take {len(weights)} weight(s) of the checkpoint: {weights[:3]}")
    if nudge:
        with torch.no_grad():
            for module in model.modules():
                if type(module).__name__ == "IntLayerNorm":
                    module.weight[module.weight == 0] = 1e-6
    if swapped:
        swap(model, swapped)
    return model.eval()


def evaluate(model: nn.Module, calib: list, val: list) -> np.ndarray:
    """Range statistics over ``calib`` (no training), frozen, then the logits of ``val``."""
    with torch.no_grad():  # QuantAct keeps running min/max statistics while it sees data
        for x, _ in calib:
            model(x)
    for module in model.modules():  # frozen ranges, as at the end of I-ViT's training (its QuantAct.fix)
        if hasattr(module, "fix"):
            module.fix()
    with torch.no_grad():
        return np.concatenate([model(x).numpy() for x, _ in val])


def batches(data: Path, transform, count: int | None, seed: int = 0):
    from utils.data import calibration_subset, make_loader, scan_split

    samples = scan_split(data)
    if count is not None and count < len(samples):
        samples = calibration_subset(samples, count, seed)
    return [(x, y) for x, y, _ in make_loader(samples, transform, 32, 2) if x is not None]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ivit-repo", type=Path, required=True, help="a checkout of github.com/zkkli/I-ViT")
    p.add_argument("--checkpoint", type=Path, required=True, help="DeiT-tiny weights (timm state dict)")
    p.add_argument("--data", type=Path, required=True, help="ImageNet layout with train/ (calibration) and val/")
    p.add_argument("--calib-size", type=int, default=1000)
    p.add_argument("--limit", type=int, default=None, help="val images (default all)")
    return p


def compare(args: argparse.Namespace) -> None:
    """Print one row per variant as it finishes."""
    for flag, folder in (("--data", args.data / "train"), ("--data", args.data / "val")):
        if not folder.is_dir():
            raise UserError(f"{flag} {args.data}: no {folder.name}/ folder")
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # I-ViT's code pins a few tensors to CUDA
    vit_quant = import_ivit(args.ivit_repo)
    from timm.data import create_transform, resolve_data_config

    fp32 = create_model("deit_tiny_patch16_224", pretrained=False)
    load_checkpoint(fp32, args.checkpoint, "deit_tiny_patch16_224")
    transform = create_transform(**resolve_data_config(model=fp32))
    calib = batches(args.data / "train", transform, args.calib_size)
    val = batches(args.data / "val", transform, args.limit)
    with torch.inference_mode():
        reference = torch.cat([fp32(x) for x, _ in val]).numpy()
    labels = torch.cat([y for _, y in val]).numpy()
    print(f"I-ViT (github.com/zkkli/I-ViT) DeiT-tiny, calibrated on {sum(len(x) for x, _ in calib)} images without training, "
          f"{len(labels)} val images; FP32 top-1 {top1_accuracy(reference, labels):.1f}")  # fmt: skip
    zeros = sum(int((v == 0).sum()) for k, v in fp32.state_dict().items() if "norm" in k and k.endswith("weight"))
    print(f"{zeros} LayerNorm weight(s) of the checkpoint are exactly 0")
    print(f"{'variant':52s} {'top-1':>6s} {'agreement':>10s} {'cosine':>8s} {'non-finite':>10s} {'s':>5s}")
    variants = [(None, False, "I-ViT, all integer, the weights as they are"), (None, True, "I-ViT, all integer (zero LN weights -> 1e-6)"),
                ("softmax", True, "  ... Shiftmax -> float softmax"), ("gelu", True, "  ... ShiftGELU -> float GELU"),
                ("layernorm", True, "  ... I-LayerNorm -> float LayerNorm")]  # fmt: skip
    for swapped, nudge, title in variants:
        if not nudge and not zeros:
            continue
        start = time.perf_counter()
        try:
            logits = evaluate(ivit_model(vit_quant, args.checkpoint, swapped, nudge), calib, val)
        except ValueError as exc:  # its scale arithmetic meets a NaN (int(Decimal(nan)))
            print(f"{title:52s} fails: {' '.join(str(exc).split())}")
            continue
        finite = np.isfinite(logits).all(axis=1)
        logits = np.where(finite[:, None], logits, 0.0)  # a non-finite row predicts nothing: wrong, cosine 0
        print(f"{title:52s} {top1_accuracy(logits, labels):6.1f} {top1_agreement(logits, reference):10.3f} "
              f"{logit_cosine(logits, reference):8.4f} {int((~finite).sum()):10d} {time.perf_counter() - start:5.0f}")  # fmt: skip


def main() -> int:
    return run_script(lambda: compare(build_parser().parse_args()))


if __name__ == "__main__":
    sys.exit(main())
