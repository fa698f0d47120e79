"""Classification metrics of one evaluation: top-1/top-5 accuracy and macro precision / recall / F1.

Macro averages run over the classes present in the evaluation labels (an ImageNet subset holds only
some of the 1000 classes): per class ``precision = TP / (TP + FP)`` and ``recall = TP / (TP + FN)``,
0 when the denominator is 0, ``F1 = 2PR / (P + R)`` (0 when both are 0), then the unweighted mean.
Predictions of absent classes count as false negatives of the true class only.

Two quantized models are compared on the same images by the images whose top-1 class each changes
from the reference's, with the exact (binomial) McNemar test on the images only one of them changes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from math import comb

import numpy as np

__all__ = ["ChangedClasses", "ClassificationMetrics", "changed_classes", "classification_metrics", "logit_cosine", "top1_accuracy", "top1_agreement"]


@dataclass(frozen=True)
class ClassificationMetrics:
    top1: float  # percent
    top5: float  # percent
    precision: float  # fraction, macro
    recall: float  # fraction, macro
    f1: float  # fraction, macro
    samples: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def classification_metrics(labels: np.ndarray, topk: np.ndarray) -> ClassificationMetrics:
    """``labels`` (N,) true classes, ``topk`` (N, k>=1) predicted classes, best first; a prediction of -1
    (no class: non-finite logits) is wrong for every label and counts towards no class's precision."""
    labels = np.asarray(labels, dtype=np.int64)
    topk = np.asarray(topk, dtype=np.int64).reshape(len(labels), -1)
    n = len(labels)
    if n == 0:
        raise ValueError("no samples to score")
    pred = topk[:, 0]
    top1 = float((pred == labels).mean() * 100.0)
    top5 = float((topk[:, :5] == labels[:, None]).any(axis=1).mean() * 100.0)
    classes = np.unique(labels)
    size = int(max(labels.max(), pred.max())) + 1
    tp = np.bincount(labels[pred == labels], minlength=size)[classes].astype(np.float64)
    predicted = np.bincount(pred[pred >= 0], minlength=size)[classes].astype(np.float64)
    actual = np.bincount(labels, minlength=size)[classes].astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = tp / actual
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return ClassificationMetrics(
        top1=top1,
        top5=top5,
        precision=float(precision.mean()),
        recall=float(recall.mean()),
        f1=float(f1.mean()),
        samples=n,
    )


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of images whose top-1 class is the same in ``logits`` and ``reference``."""
    return float((logits.argmax(1) == reference.argmax(1)).mean())


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return 100 * float((logits.argmax(1) == labels).mean())


def logit_cosine(logits: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of the cosine similarity of two logit vectors (float64)."""
    a, b = logits.astype(np.float64), reference.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-12)).mean())


@dataclass(frozen=True)
class ChangedClasses:
    only_first: int  # images whose top-1 class the first model changes and the second keeps
    only_second: int  # the other way round
    p_value: float  # exact two-sided McNemar test of only_first against only_second


def changed_classes(first: np.ndarray, second: np.ndarray, reference: np.ndarray) -> ChangedClasses:
    """Paired comparison of two models' logits on the same images by the top-1 classes each changes from
    ``reference``'s. Images both change, or both keep, say nothing about which is closer; of the others,
    under "equally close" each is equally likely to be either model's, so the p-value is the two-sided
    binomial tail of the smaller count at 1/2."""
    kept = reference.argmax(1)
    a, b = first.argmax(1) != kept, second.argmax(1) != kept
    only_first, only_second = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = only_first + only_second, min(only_first, only_second)
    p_value = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return ChangedClasses(only_first, only_second, p_value)
