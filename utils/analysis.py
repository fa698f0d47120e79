"""A test_qvit.py run folder as data: its summary, its profiler statistics, and the tables computed from them.

Input: ``qvit_summary.json`` and ``qvit_statistics.csv`` of one run (see :mod:`utils.profiler` for the
columns), optionally a Fisher sensitivity table (:mod:`utils.sensitivity`). :mod:`utils.plots` draws
them and :mod:`utils.html_report` writes ``report.html``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils.errors import UserError

__all__ = ["REQUIRED_COLUMNS", "RunData", "block_table", "correlation_table", "finite", "fit_line", "load_run", "outlier_regression"]


REQUIRED_COLUMNS = (
    "name", "layer_type", "kind", "block", "qsnr_db", "mse", "cosine", "kl", "outlier_ratio_fp32", "outlier_ratio_int8",
)  # fmt: skip

METRICS = ("qsnr_db", "mse", "cosine", "kl", "outlier_ratio_fp32", "outlier_ratio_int8", "clipped_fraction")



@dataclass
class RunData:
    path: Path
    summary: dict[str, Any]
    stats: pd.DataFrame
    sensitivity: pd.DataFrame | None = None

    @property
    def isolated(self) -> bool:
        return "iso_qsnr_db" in self.stats.columns


def load_run(path: Path) -> RunData:
    """Read and check a run folder; every problem is one :class:`UserError` line."""
    if not path.is_dir():
        raise UserError(f"{path}: no such run folder")
    summary_path, stats_path = path / "qvit_summary.json", path / "qvit_statistics.csv"
    if not summary_path.is_file():
        raise UserError(f"{path}: not a run folder of test_qvit.py (no qvit_summary.json)")
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{summary_path}: not readable JSON ({exc})") from None
    if not stats_path.is_file():
        raise UserError(f"{path}: no qvit_statistics.csv (the run was made with --no-profile?); rerun test_qvit.py with profiling")
    try:
        stats = pd.read_csv(stats_path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{stats_path}: not a readable CSV ({' '.join(str(exc).split())})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in stats.columns]
    if missing:
        raise UserError(f"{stats_path}: missing columns {', '.join(missing)}")
    if stats.empty:
        raise UserError(f"{stats_path}: no quantization points (an empty run)")
    for column in METRICS:
        if column in stats.columns:
            stats[column] = pd.to_numeric(stats[column], errors="coerce")
    return RunData(path, summary, stats.reset_index(drop=True))


def fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept`` and its R^2 (1 where y is fitted exactly)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(np.sum((y - (slope * x + intercept)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    return float(slope), float(intercept), 1.0 - residual / total if total > 0 else 1.0


def finite(values: pd.Series) -> pd.Series:
    return values.replace([math.inf, -math.inf], np.nan)


def block_table(run: RunData) -> pd.DataFrame:
    """Each metric aggregated per transformer block (points outside blocks are left out)."""
    stats = run.stats[run.stats["block"].notna()].copy()
    stats["block"] = stats["block"].astype(int)
    stats["qsnr_finite"] = finite(stats["qsnr_db"])
    aggregations = {
        "qsnr_db_mean": ("qsnr_finite", "mean"),
        "qsnr_db_min": ("qsnr_finite", "min"),
        "mse_sum": ("mse", "sum"),
        "cosine_min": ("cosine", "min"),
        "kl_mean": ("kl", "mean"),
        "outlier_ratio_fp32_mean": ("outlier_ratio_fp32", "mean"),
    }
    if run.isolated:
        stats["iso_qsnr_finite"] = finite(stats["iso_qsnr_db"])
        aggregations["iso_qsnr_db_mean"] = ("iso_qsnr_finite", "mean")
        aggregations["iso_logit_cosine_min"] = ("iso_logit_cosine", "min")
    if run.sensitivity is not None:
        stats = stats.merge(run.sensitivity[["name", "fisher"]], on="name", how="left")
        aggregations["fisher_sum"] = ("fisher", "sum")
    return stats.groupby("block").agg(**aggregations)


def outlier_regression(run: RunData) -> dict[str, float]:
    stats = run.stats.dropna(subset=["outlier_ratio_fp32", "outlier_ratio_int8"])
    slope, intercept, r2 = fit_line(stats["outlier_ratio_fp32"].to_numpy(), stats["outlier_ratio_int8"].to_numpy())
    return {"slope": slope, "intercept": intercept, "r2": r2, "points": len(stats)}


def correlation_table(run: RunData) -> pd.DataFrame:
    columns = [c for c in ("qsnr_db", "mse", "cosine", "kl", "outlier_ratio_fp32", "outlier_ratio_int8") if c in run.stats]
    frame = run.stats[["name", *columns]].copy()
    frame["qsnr_db"] = finite(frame["qsnr_db"])
    if run.sensitivity is not None:
        frame = frame.merge(run.sensitivity[["name", "fisher"]], on="name", how="left")
        columns.append("fisher")
    # Spearman: MSE and Fisher span decades, a rank correlation is not dominated by a few points.
    return frame[columns].corr(method="spearman")

