"""Calibration and FP32-vs-quantized evaluation loops over a data loader.

Evaluation runs each batch through the FP32 and the quantized model back to back, so the two see the
same images once decoded, and keeps only the top-5 classes per image plus running sums: memory stays
bounded however many images are evaluated.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.quant_vit import QVit
from utils.data import Batch
from utils.errors import UserError
from utils.metrics import ClassificationMetrics, classification_metrics

__all__ = ["CalibrationResult", "EvalResult", "calibrate", "evaluate"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class CalibrationResult:
    images: int
    unreadable: int
    seconds: float
    uncalibrated: list[str]


@torch.inference_mode()
def calibrate(qvit: QVit, batches: Iterable[Batch], device: torch.device, progress: bool = True) -> CalibrationResult:
    """Run every batch through the model in calibration mode, then fix all scales.

    Up to three passes over ``batches`` (so it must be re-iterable): the recipe's ``reparam`` folding,
    the histograms' range pass (exact bins, and what ``torchrun`` needs to combine processes), then
    calibration proper. Under ``torchrun`` each process passes its own share of the batches.
    """
    start = time.perf_counter()
    first_passes = []
    if qvit.recipe.reparam is not None and not qvit.reparam_factors:
        first_passes.append(("reparameterize", qvit.reparameterizing))
    if qvit.needs_range_pass:
        first_passes.append(("ranges", qvit.observing_ranges))
    for name, context in first_passes:
        seen = 0
        with context():
            for x, _, _ in tqdm(batches, desc=name, unit="batch", disable=not progress, leave=False):
                if x is not None:
                    qvit(x.to(device, non_blocking=True))
                    seen += len(x)
            if seen == 0:  # leaves the context with an error, so nothing is folded or fixed
                raise UserError("no readable calibration image")
    images = unreadable = 0
    with qvit.calibrating():
        for x, _, bad in tqdm(batches, desc="calibrate", unit="batch", disable=not progress, leave=False):
            unreadable += bad
            if x is None:
                continue
            qvit(x.to(device, non_blocking=True))
            images += len(x)
        if images == 0:  # leaves the context with an error, so nothing is finalized
            raise UserError(f"no readable calibration image ({unreadable} unreadable)")
    uncalibrated = [name for name, q in qvit.quantizers().items() if not q.is_calibrated]
    _sync(device)
    return CalibrationResult(images, unreadable, time.perf_counter() - start, uncalibrated)


@dataclass
class EvalResult:
    labels: np.ndarray
    fp32_top5: np.ndarray
    int8_top5: np.ndarray
    cosine_sum: float
    unreadable: int
    seconds_fp32: float
    seconds_int8: float
    fp32: ClassificationMetrics = field(init=False)
    int8: ClassificationMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.fp32 = classification_metrics(self.labels, self.fp32_top5)
        self.int8 = classification_metrics(self.labels, self.int8_top5)

    @property
    def samples(self) -> int:
        return len(self.labels)

    @property
    def agreement_top1(self) -> float:
        """Fraction of images whose FP32 and quantized top-1 classes are the same."""
        return float((self.fp32_top5[:, 0] == self.int8_top5[:, 0]).mean())

    @property
    def logit_cosine(self) -> float:
        """Mean cosine similarity between the FP32 and quantized logit vectors."""
        return self.cosine_sum / self.samples


@torch.inference_mode()
def evaluate(qvit: QVit, batches: Iterable[Batch], device: torch.device, progress: bool = True) -> EvalResult | None:
    """FP32 and quantized predictions on every image; None if no image could be read."""
    labels, fp32_top5, int8_top5 = [], [], []
    cosine_sum = 0.0
    unreadable = 0
    seconds_fp32 = seconds_int8 = 0.0
    for x, y, bad in tqdm(batches, desc="evaluate", unit="batch", disable=not progress, leave=False):
        unreadable += bad
        if x is None:
            continue
        x = x.to(device, non_blocking=True)
        t0 = time.perf_counter()
        with qvit.fp32():
            logits_fp32 = qvit(x)
        _sync(device)
        t1 = time.perf_counter()
        logits_int8 = qvit(x)
        _sync(device)
        t2 = time.perf_counter()
        seconds_fp32 += t1 - t0
        seconds_int8 += t2 - t1
        k = min(5, logits_fp32.shape[1])
        fp32_top5.append(logits_fp32.topk(k, dim=1).indices.cpu())
        int8_top5.append(logits_int8.topk(k, dim=1).indices.cpu())
        cosine_sum += float(F.cosine_similarity(logits_fp32.float(), logits_int8.float(), dim=1).sum())
        labels.append(y)
    if not labels:
        return None
    return EvalResult(
        labels=torch.cat(labels).numpy(),
        fp32_top5=torch.cat(fp32_top5).numpy(),
        int8_top5=torch.cat(int8_top5).numpy(),
        cosine_sum=cosine_sum,
        unreadable=unreadable,
        seconds_fp32=seconds_fp32,
        seconds_int8=seconds_int8,
    )
