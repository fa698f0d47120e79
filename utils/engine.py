"""Calibration and FP32-vs-quantized evaluation loops over a data loader.

Evaluation runs each batch through the FP32 and the quantized model back to back, so the two see the
same images once decoded, and keeps only the top-5 classes per image plus running sums: memory stays
bounded however many images are evaluated. Nothing in the per-batch path waits for the device: the
top-5 indices and the cosine sum stay on it until the end, and on a GPU the two models are timed with
CUDA events read once at the end.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from models.ptq.collectives import first_error_everywhere, is_distributed
from models.ptq.reconstruction import too_few_images_per_step
from models.quant_vit import QVit
from utils.data import Batch
from utils.errors import UserError
from utils.metrics import ClassificationMetrics, classification_metrics

__all__ = ["CalibrationResult", "EvalResult", "calibrate", "evaluate"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(batches: Iterable) -> int | None:
    """How many images ``batches`` holds, when it can tell without loading them (a DataLoader, a list)."""
    dataset = getattr(batches, "dataset", None)
    if dataset is not None:
        return len(dataset)
    if isinstance(batches, (list, tuple)):
        return sum(len(x) for x, _, _ in batches if x is not None)
    return None


def _progress(batches: Iterable, desc: str, enabled: bool, limit: float = math.inf) -> tqdm:
    """A bar counting images (so it shows images/s and the time left), updated by the caller; its total
    is the images the pass really takes (``limit`` of them at most)."""
    total = _images(batches)
    if total is not None and limit < total:
        total = int(limit)
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, smoothing=0.1)


class _Timer:
    """Seconds spent in named phases: CUDA events on a GPU (read once, at :meth:`seconds`), else wall clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.setdefault(phase, []).append((start, end))
        else:
            start = time.perf_counter()
            yield
            self.spans.setdefault(phase, []).append(time.perf_counter() - start)

    def seconds(self, phase: str) -> float:
        spans = self.spans.get(phase, [])
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in spans) / 1e3
        return sum(spans)


# The passes whose observers take in the data, so that a NaN or infinity shows in their running min/max
# (the later passes read fixed scales and need no check).
OBSERVING_PASSES = ("reparameterize", "ranges", "calibrate")


@dataclass
class CalibrationResult:
    images: int
    unreadable: int
    seconds: float
    uncalibrated: list[str]
    passes: dict[str, float] = field(default_factory=dict)  # each pass's seconds, its closing work included


@torch.inference_mode()
def calibrate(qvit: QVit, batches: Iterable[Batch], device: torch.device, progress: bool = True,
              report: Callable[[str], object] | None = None) -> CalibrationResult:  # fmt: skip
    """Run every batch through the model in calibration mode, then fix all scales.

    Up to four passes over ``batches`` (so it must be re-iterable): the recipe's ``reparam`` folding,
    the histograms' range pass (exact bins, and what ``torchrun`` needs to combine processes),
    calibration proper, then the recipe's ``scale_search`` on its first ``images`` images (under
    ``torchrun`` each process takes its share of that number). Under ``torchrun`` each process passes
    its own share of the batches. ``report`` gets one line as each pass ends: its images and seconds.
    """
    start = time.perf_counter()
    passes: list[tuple[str, Callable, float]] = []
    if qvit.recipe.reparam is not None and not qvit.reparam_factors:
        passes.append(("reparameterize", qvit.reparameterizing, math.inf))
    if qvit.needs_range_pass:
        passes.append(("ranges", qvit.observing_ranges, math.inf))
    passes.append(("calibrate", qvit.calibrating, math.inf))
    world = dist.get_world_size() if is_distributed() else 1  # image budgets below are shared by the processes
    if qvit.recipe.scale_search is not None:
        passes.append(("search scales", qvit.searching_scales, math.ceil(qvit.recipe.scale_search.images / world)))
    if qvit.recipe.reconstruction is not None:
        refusal = too_few_images_per_step(qvit.recipe.reconstruction, world)  # before any pass: fail in seconds
        if refusal is not None:
            raise UserError(f"recipe {qvit.recipe.name}: {refusal}")
        reconstructing = functools.partial(qvit.reconstructing, progress=progress)
        passes.append(("reconstruct blocks", reconstructing, math.ceil(qvit.recipe.reconstruction.images / world)))
    if qvit.recipe.bias_correction is not None:
        passes.append(("correct biases", qvit.correcting_biases, math.ceil(qvit.recipe.bias_correction.images / world)))
    weight = qvit.first_non_finite_weight()
    if weight is not None:
        raise UserError(f"{weight} holds NaN or infinite values; calibration needs finite weights (check the checkpoint)")
    points = list(qvit.quantizers().values())  # walked once here, not once per batch
    calibrated_images = calibrated_unreadable = 0
    seconds: dict[str, float] = {}
    for name, context, limit in passes:
        images = unreadable = batch_index = 0
        began = time.perf_counter()
        # The first batch after which some observer's running min/max is not finite, kept on the device
        # (-1: none), so the check costs no host synchronisation per batch; read once per pass.
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        with context(), _progress(batches, name, progress, limit) as bar:
            for x, _, bad in batches:
                if images >= limit:
                    break
                unreadable += bad
                bar.update(bad)
                if x is None:
                    continue
                batch_index += 1
                qvit(x.to(device, non_blocking=True))
                if name in OBSERVING_PASSES:
                    flag = qvit.non_finite_flag(points).to(device)
                    first_bad = torch.where(flag & (first_bad < 0), torch.full_like(first_bad, batch_index), first_bad)
                images += len(x)
                bar.update(len(x))
            error = None
            if images == 0:
                error = f"no readable calibration image ({unreadable} unreadable)"
            elif int(first_bad) >= 0:
                error = (f"{qvit.first_non_finite_point()} saw NaN or infinite values in calibration batch {int(first_bad)} "
                         f"({name} pass); calibration needs finite activations")  # fmt: skip
            # Under torchrun, a failure in one process stops all of them now, with the same message.
            error = first_error_everywhere(error)
            if error is not None:  # leaves the context with an error, so nothing is folded, fixed or finalized
                raise UserError(error)
        if name == "calibrate":
            calibrated_images, calibrated_unreadable = images, unreadable
        _sync(device)
        seconds[name] = time.perf_counter() - began
        if report is not None:
            report(f"{name}: {images} images, {seconds[name]:.1f} s")
    uncalibrated = [name for name, q in qvit.quantizers().items() if not q.is_calibrated]
    return CalibrationResult(calibrated_images, calibrated_unreadable, time.perf_counter() - start, uncalibrated, seconds)


@dataclass
class EvalResult:
    labels: np.ndarray
    fp32_top5: np.ndarray
    int8_top5: np.ndarray
    cosine_sum: float
    unreadable: int
    seconds_fp32: float
    seconds_int8: float
    seconds_wall: float  # the whole loop: loading, both models and the bookkeeping
    # Images whose FP32 / quantized logits hold NaN or infinity: scored as wrong (no class, cosine 0), counted here.
    non_finite_fp32: int = 0
    non_finite_int8: int = 0
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
def evaluate(qvit: QVit, batches: Iterable[Batch], device: torch.device, progress: bool = True, amp: bool = False,
             quantized: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EvalResult | None:  # fmt: skip
    """FP32 and quantized predictions on every image; None if no image could be read.

    ``amp`` runs the FP32 baseline under CUDA autocast (float16); the quantized model is unaffected.
    ``quantized`` replaces the fake-quant model (the integer program's executor: images -> logits).
    """
    quantized = quantized or qvit
    labels, fp32_top5, int8_top5 = [], [], []
    cosine_sum = torch.zeros((), dtype=torch.float64, device=device)
    non_finite = torch.zeros(2, dtype=torch.int64, device=device)  # FP32, INT8 images; on the device: no sync per batch
    unreadable = 0
    timer = _Timer(device)
    start = time.perf_counter()
    with _progress(batches, "evaluate", progress) as bar:
        for x, y, bad in batches:
            unreadable += bad
            bar.update(bad)
            if x is None:
                continue
            x = x.to(device, non_blocking=True)
            with timer("fp32"), qvit.fp32(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
                logits_fp32 = qvit(x).float()
            with timer("int8"):
                logits_int8 = quantized(x)
            k = min(5, logits_fp32.shape[1])
            finite_fp32, finite_int8 = logits_fp32.isfinite().all(dim=1), logits_int8.isfinite().all(dim=1)
            non_finite += torch.stack([(~finite_fp32).sum(), (~finite_int8).sum()])
            # A non-finite row predicts no class (-1: wrong for every label) and has cosine 0.
            fp32_top5.append(logits_fp32.topk(k, dim=1).indices.masked_fill_(~finite_fp32[:, None], -1))
            int8_top5.append(logits_int8.topk(k, dim=1).indices.masked_fill_(~finite_int8[:, None], -1))
            cosine = F.cosine_similarity(logits_fp32, logits_int8.float(), dim=1).masked_fill_(~(finite_fp32 & finite_int8), 0.0)
            cosine_sum += cosine.sum(dtype=torch.float64)
            labels.append(y)
            bar.update(len(x))
    if not labels:
        return None
    _sync(device)
    wall = time.perf_counter() - start
    return EvalResult(
        labels=torch.cat(labels).numpy(),
        fp32_top5=torch.cat(fp32_top5).cpu().numpy(),
        int8_top5=torch.cat(int8_top5).cpu().numpy(),
        cosine_sum=float(cosine_sum),
        unreadable=unreadable,
        seconds_fp32=timer.seconds("fp32"),
        seconds_int8=timer.seconds("int8"),
        seconds_wall=wall,
        non_finite_fp32=int(non_finite[0]),
        non_finite_int8=int(non_finite[1]),
    )
