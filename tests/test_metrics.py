"""Metrics against a plain per-class loop."""
from __future__ import annotations

import numpy as np
import pytest

from utils.metrics import classification_metrics


def reference(labels, topk):
    pred = [row[0] for row in topk]
    precisions, recalls, f1s = [], [], []
    for c in sorted(set(labels)):
        tp = sum(1 for p, y in zip(pred, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(pred, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(pred, labels) if p != c and y == c)
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    top1 = 100 * sum(p == y for p, y in zip(pred, labels)) / len(labels)
    top5 = 100 * sum(y in row[:5] for row, y in zip(topk, labels)) / len(labels)
    return top1, top5, np.mean(precisions), np.mean(recalls), np.mean(f1s)


def test_metrics_match_reference_loop():
    rng = np.random.default_rng(0)
    labels = rng.choice([3, 7, 11, 500, 999], size=300)
    topk = rng.integers(0, 1000, size=(300, 5))
    hits = rng.random(300) < 0.6
    topk[hits, 0] = labels[hits]  # some correct top-1
    near = ~hits & (rng.random(300) < 0.3)
    topk[near, 2] = labels[near]  # some correct only in the top-5
    m = classification_metrics(labels, topk)
    top1, top5, p, r, f1 = reference(labels.tolist(), topk.tolist())
    assert (m.top1, m.top5) == (pytest.approx(top1), pytest.approx(top5))
    assert (m.precision, m.recall, m.f1) == (pytest.approx(p), pytest.approx(r), pytest.approx(f1))
    assert m.samples == 300


def test_never_predicted_class_and_absent_class_predictions():
    labels = np.array([1, 1, 2, 2])
    topk = np.array([[1], [1], [1], [5]])  # class 2 never predicted; class 5 absent from labels
    m = classification_metrics(labels, topk)
    assert m.top1 == 50.0
    assert m.precision == pytest.approx((2 / 3 + 0.0) / 2)
    assert m.recall == pytest.approx((1.0 + 0.0) / 2)
    assert m.f1 == pytest.approx((0.8 + 0.0) / 2)


def test_logit_comparisons_match_a_plain_loop():
    from utils.metrics import logit_cosine, top1_accuracy, top1_agreement

    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((50, 7)), rng.standard_normal((50, 7))
    b[:20] = a[:20] * 2.0  # same direction: cosine 1, same argmax
    labels = rng.integers(0, 7, 50)
    cos = [float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b)]
    assert logit_cosine(a, b) == pytest.approx(sum(cos) / 50, abs=1e-12)
    assert top1_agreement(a, b) == sum(int(np.argmax(x) == np.argmax(y)) for x, y in zip(a, b)) / 50
    assert top1_accuracy(a, labels) == pytest.approx(100 * sum(int(np.argmax(x) == t) for x, t in zip(a, labels)) / 50)


def test_changed_classes_counts_discordant_images_and_matches_the_binomial_test():
    from utils.metrics import changed_classes

    reference = np.eye(4)[[0, 1, 2, 3, 0, 1, 2, 3]]  # top-1 classes 0 1 2 3 0 1 2 3
    first = np.eye(4)[[1, 1, 2, 3, 1, 0, 2, 3]]  # changes images 0, 4, 5
    second = np.eye(4)[[2, 1, 3, 3, 0, 1, 2, 3]]  # changes images 0, 2
    result = changed_classes(first, second, reference)
    assert (result.only_first, result.only_second) == (2, 1)  # image 0, changed by both, counts for neither
    assert result.p_value == 1.0  # 3 discordant images: 2 against 1 is no evidence
    assert changed_classes(reference, reference, reference).p_value == 1.0
    # Six images changed by the second model only: both tails of Binomial(6, 1/2) at 0, 2 / 64.
    sixes = np.eye(4)[[1] * 6]
    assert changed_classes(np.eye(4)[[0] * 6], sixes, np.eye(4)[[0] * 6]).p_value == pytest.approx(2 / 64)
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(5)
    for _ in range(20):
        ref = rng.standard_normal((300, 5))
        a, b = ref + rng.normal(0, rng.uniform(0.2, 1.0), ref.shape), ref + rng.normal(0, rng.uniform(0.2, 1.0), ref.shape)
        r = changed_classes(a, b, ref)
        n = r.only_first + r.only_second
        assert r.p_value == pytest.approx(scipy_stats.binomtest(r.only_first, n, 0.5).pvalue if n else 1.0, rel=1e-9)
