"""Human-readable results table and the environment record of a run."""
from __future__ import annotations

import platform
import sys

import numpy as np
import torch

from utils.metrics import ClassificationMetrics

__all__ = ["profile_summary", "results_table", "versions"]

_ROWS = (
    ("Top-1 (%)", "top1", "{:.2f}"),
    ("Top-5 (%)", "top5", "{:.2f}"),
    ("Precision", "precision", "{:.4f}"),
    ("Recall", "recall", "{:.4f}"),
    ("F1-Score", "f1", "{:.4f}"),
    ("Total Samples", "samples", "{:d}"),
)


def results_table(fp32: ClassificationMetrics, int8: ClassificationMetrics, agreement: float, cosine: float) -> str:
    """FP32 / INT8 / delta table, plus FP32-vs-INT8 agreement and logit cosine."""
    lines = [f"{'Metric':<15}{'FP32':>10}{'INT8':>10}{'Δ':>10}", "-" * 45]
    for label, key, fmt in _ROWS:
        a, b = getattr(fp32, key), getattr(int8, key)
        delta = fmt.format(b - a) if key != "samples" else ""
        if delta and not delta.startswith("-"):
            delta = "+" + delta
        lines.append(f"{label:<15}{fmt.format(a):>10}{fmt.format(b):>10}{delta:>10}")
    lines.append("-" * 45)
    lines.append(f"Top-1 agreement FP32 vs INT8: {agreement:.4f}")
    lines.append(f"Mean logit cosine FP32 vs INT8: {cosine:.4f}")
    return "\n".join(lines)


def profile_summary(totals: dict) -> str:
    """A few lines about the profiler's totals: QSNR, end-to-end fidelity and the worst points."""

    def db(v: float | None) -> str:
        return "inf" if v is None else f"{v:.1f}"

    lines = [
        f"Profile ({totals['samples']} images, {totals['points']} points): QSNR mean {db(totals['qsnr_db_mean'])} dB, "
        f"median {db(totals['qsnr_db_median'])} dB; logit cosine {totals['logit_cosine']:.4f}, "
        f"top-1 agreement {totals['agreement_top1']:.3f}",
        "Worst points (accumulated QSNR): " + ", ".join(f"{w['name']} {db(w['qsnr_db'])} dB" for w in totals["worst"][:5]),
    ]
    if totals.get("points_without_program_tensor"):
        missing = totals["points_without_program_tensor"]
        lines.append(f"{len(missing)} point(s) have no tensor in the integer program (no statistics): {', '.join(missing[:5])}")
    if "isolated_worst" in totals:
        lines.append(
            "Worst points alone (logit cosine): "
            + ", ".join(f"{w['name']} {w['iso_logit_cosine']:.5f}" for w in totals["isolated_worst"][:5])
        )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import timm

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["cuda"] = str(torch.version.cuda)
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
