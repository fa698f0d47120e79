"""Plots and a self-contained HTML report from a test_qvit.py run folder (its profiler statistics).

Input: ``qvit_summary.json`` and ``qvit_statistics.csv`` of one run (see :mod:`utils.profiler` for the
columns), optionally a Fisher sensitivity table (:mod:`utils.sensitivity`). Output: PNGs drawn with
matplotlib's Agg backend, every point on the x axis in model order with ticks at block boundaries, so
that 150-250 points stay readable; and ``report.html`` with the PNGs embedded as base64 data URIs (no
server, no network).
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from utils.errors import UserError

__all__ = ["REQUIRED_COLUMNS", "RunData", "fit_line", "load_run", "table_html", "write_plots", "write_report"]

REQUIRED_COLUMNS = (
    "name", "layer_type", "kind", "block", "qsnr_db", "mse", "cosine", "kl", "outlier_ratio_fp32", "outlier_ratio_int8",
)  # fmt: skip
METRICS = ("qsnr_db", "mse", "cosine", "kl", "outlier_ratio_fp32", "outlier_ratio_int8", "clipped_fraction")
KIND_COLOURS = {"weight": "tab:blue", "activation": "tab:orange", "layernorm_input": "tab:green", "attention": "tab:red"}


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


# -- plots ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values: pd.Series) -> pd.Series:
    return values.replace([math.inf, -math.inf], np.nan)


def _layer_colours(stats: pd.DataFrame) -> dict[str, Any]:
    plt = _pyplot()
    types = list(dict.fromkeys(stats["layer_type"]))
    cmap = plt.get_cmap("tab20")
    return {t: cmap(i % 20) for i, t in enumerate(types)}


def _point_axis(ax, stats: pd.DataFrame) -> None:
    """x ticks at the first point of every block (``b0``, ``b1``, ...), faint lines between blocks."""
    starts = stats.groupby("block", dropna=True).apply(lambda g: g.index.min(), include_groups=False)
    ticks = [int(i) for i in starts.to_numpy()]
    labels = [f"b{int(b)}" for b in starts.index]
    last_block_end = int(stats.index[stats["block"].notna()].max()) + 1 if stats["block"].notna().any() else None
    if last_block_end is not None and last_block_end < len(stats):
        ticks.append(last_block_end)
        labels.append("head")
    for t in ticks:
        ax.axvline(t - 0.5, color="0.85", linewidth=0.6, zorder=0)
    ax.set_xticks(ticks)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlim(-1, len(stats))
    ax.set_xlabel(f"quantization point ({len(stats)} in model order: patch embedding, blocks b0, b1, ..., head)")


def _per_point(ax, stats: pd.DataFrame, column: str, colours: dict[str, Any], log: bool = False) -> None:
    values = _finite(stats[column])
    ax.bar(stats.index, values, width=0.85, color=[colours[t] for t in stats["layer_type"]])
    if log:
        ax.set_yscale("log")
    _point_axis(ax, stats)


def _legend_for_types(fig, colours: dict[str, Any]) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(color=c, label=t) for t, c in colours.items()]
    fig.legend(handles=handles, loc="center right", fontsize=7, title="layer type", title_fontsize=8, frameon=False)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_qsnr(run: RunData, folder: Path) -> Path:
    plt = _pyplot()
    stats = run.stats
    colours = _layer_colours(stats)
    fig, (hist_ax, bar_ax) = plt.subplots(1, 2, figsize=(17, 5.5), gridspec_kw={"width_ratios": [1, 3]})
    values = _finite(stats["qsnr_db"]).dropna()
    hist_ax.hist(values, bins=30, color="tab:blue", alpha=0.8)
    for label, v, style in (("mean", values.mean(), "--"), ("median", values.median(), ":")):
        hist_ax.axvline(v, color="black", linestyle=style, label=f"{label} {v:.1f} dB")
    hist_ax.set_xlabel("QSNR (dB), accumulated")
    hist_ax.set_ylabel("points")
    hist_ax.set_title("QSNR distribution")
    hist_ax.legend(fontsize=8)
    _per_point(bar_ax, stats, "qsnr_db", colours)
    bar_ax.set_ylabel("QSNR (dB)")
    bar_ax.set_title("QSNR per quantization point (accumulated view), coloured by layer type")
    fig.subplots_adjust(left=0.05, right=0.84, bottom=0.12, top=0.9, wspace=0.15)
    _legend_for_types(fig, colours)
    return _save(fig, folder / "qsnr.png")


def plot_mse(run: RunData, folder: Path) -> Path:
    plt = _pyplot()
    stats = run.stats
    colours = _layer_colours(stats)
    fig, ax = plt.subplots(figsize=(17, 5.5))
    _per_point(ax, stats, "mse", colours, log=True)
    ax.set_ylabel("MSE (log scale)")
    ax.set_title("Mean squared quantization error per point (accumulated view)")
    fig.subplots_adjust(left=0.05, right=0.84, bottom=0.12, top=0.92)
    _legend_for_types(fig, colours)
    return _save(fig, folder / "mse.png")


def plot_cosine(run: RunData, folder: Path) -> Path:
    plt = _pyplot()
    stats = run.stats
    colours = _layer_colours(stats)
    fig, (point_ax, box_ax) = plt.subplots(2, 1, figsize=(17, 10))
    point_ax.scatter(stats.index, stats["cosine"], c=[colours[t] for t in stats["layer_type"]], s=14)
    end_to_end = run.summary.get("profile", {}).get("logit_cosine")
    for ax in (point_ax, box_ax):
        if end_to_end is not None:
            ax.axhline(end_to_end, color="black", linestyle="--", linewidth=1, label=f"end-to-end logit cosine {end_to_end:.4f}")
    _point_axis(point_ax, stats)
    point_ax.set_ylabel("cosine similarity FP32 vs quantized")
    point_ax.set_title("Cosine similarity per point (accumulated view)")
    point_ax.legend(fontsize=8, loc="lower left")
    types = list(colours)
    groups = [stats.loc[stats["layer_type"] == t, "cosine"].dropna() for t in types]
    boxes = box_ax.boxplot(groups, patch_artist=True, widths=0.6)
    for patch, t in zip(boxes["boxes"], types):
        patch.set_facecolor(colours[t])
    box_ax.set_xticks(range(1, len(types) + 1))
    box_ax.set_xticklabels(types, rotation=30, ha="right", fontsize=8)
    box_ax.set_ylabel("cosine similarity")
    box_ax.set_title("Cosine similarity by layer type (over blocks)")
    box_ax.legend(fontsize=8, loc="lower left")
    fig.subplots_adjust(left=0.06, right=0.84, bottom=0.14, top=0.95, hspace=0.45)
    _legend_for_types(fig, colours)
    return _save(fig, folder / "cosine.png")


def block_table(run: RunData) -> pd.DataFrame:
    """Each metric aggregated per transformer block (points outside blocks are left out)."""
    stats = run.stats[run.stats["block"].notna()].copy()
    stats["block"] = stats["block"].astype(int)
    stats["qsnr_finite"] = _finite(stats["qsnr_db"])
    aggregations = {
        "qsnr_db_mean": ("qsnr_finite", "mean"),
        "qsnr_db_min": ("qsnr_finite", "min"),
        "mse_sum": ("mse", "sum"),
        "cosine_min": ("cosine", "min"),
        "kl_mean": ("kl", "mean"),
        "outlier_ratio_fp32_mean": ("outlier_ratio_fp32", "mean"),
    }
    if run.isolated:
        stats["iso_qsnr_finite"] = _finite(stats["iso_qsnr_db"])
        aggregations["iso_qsnr_db_mean"] = ("iso_qsnr_finite", "mean")
        aggregations["iso_logit_cosine_min"] = ("iso_logit_cosine", "min")
    if run.sensitivity is not None:
        stats = stats.merge(run.sensitivity[["name", "fisher"]], on="name", how="left")
        aggregations["fisher_sum"] = ("fisher", "sum")
    return stats.groupby("block").agg(**aggregations)


def plot_blocks(run: RunData, folder: Path) -> Path:
    plt = _pyplot()
    table = block_table(run)
    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    panels = [
        (axes[0, 0], "qsnr_db_mean", "mean QSNR (dB)", False),
        (axes[0, 1], "mse_sum", "summed MSE (log)", True),
        (axes[1, 0], "cosine_min", "lowest cosine similarity", False),
        (axes[1, 1], "kl_mean", "mean KL divergence", False),
    ]
    for ax, column, label, log in panels:
        ax.plot(table.index, table[column], marker="o", label="accumulated")
        if column == "qsnr_db_mean" and "iso_qsnr_db_mean" in table:
            ax.plot(table.index, table["iso_qsnr_db_mean"], marker="s", label="isolated")
            ax.legend(fontsize=8)
        if log:
            ax.set_yscale("log")
        ax.set_xticks(table.index)
        ax.set_xlabel("transformer block")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Block-wise analysis: each metric aggregated over the block's quantization points")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.08, top=0.92, hspace=0.3, wspace=0.25)
    return _save(fig, folder / "blocks.png")


def outlier_regression(run: RunData) -> dict[str, float]:
    stats = run.stats.dropna(subset=["outlier_ratio_fp32", "outlier_ratio_int8"])
    slope, intercept, r2 = fit_line(stats["outlier_ratio_fp32"].to_numpy(), stats["outlier_ratio_int8"].to_numpy())
    return {"slope": slope, "intercept": intercept, "r2": r2, "points": len(stats)}


def plot_outliers(run: RunData, folder: Path, fit: dict[str, float]) -> Path:
    plt = _pyplot()
    stats = run.stats
    fig, ax = plt.subplots(figsize=(8, 7))
    for kind, colour in KIND_COLOURS.items():
        part = stats[stats["kind"] == kind]
        if len(part):
            ax.scatter(part["outlier_ratio_fp32"], part["outlier_ratio_int8"], s=16, color=colour, label=kind, alpha=0.8)
    x = np.linspace(0, float(stats["outlier_ratio_fp32"].max()) * 1.05, 50)
    ax.plot(x, fit["slope"] * x + fit["intercept"], color="black", linewidth=1,
            label=f"least squares: y = {fit['slope']:.3f} x + {fit['intercept']:.2e}, R² = {fit['r2']:.3f}")  # fmt: skip
    ax.plot(x, x, color="0.6", linestyle=":", linewidth=1, label="y = x")
    ax.set_xlabel("outlier ratio of the FP32 tensor (beyond mean ± 3σ)")
    ax.set_ylabel("outlier ratio of the quantized tensor")
    ax.set_title("Outliers FP32 vs INT8 per point")
    ax.legend(fontsize=8, loc="upper left")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.1, top=0.93)
    return _save(fig, folder / "outliers.png")


def correlation_table(run: RunData) -> pd.DataFrame:
    columns = [c for c in ("qsnr_db", "mse", "cosine", "kl", "outlier_ratio_fp32", "outlier_ratio_int8") if c in run.stats]
    frame = run.stats[["name", *columns]].copy()
    frame["qsnr_db"] = _finite(frame["qsnr_db"])
    if run.sensitivity is not None:
        frame = frame.merge(run.sensitivity[["name", "fisher"]], on="name", how="left")
        columns.append("fisher")
    # Spearman: MSE and Fisher span decades, a rank correlation is not dominated by a few points.
    return frame[columns].corr(method="spearman")


def plot_correlation(run: RunData, folder: Path) -> Path:
    plt = _pyplot()
    corr = correlation_table(run)
    fig, ax = plt.subplots(figsize=(8.5, 7))
    image = ax.imshow(corr.to_numpy(), cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(corr)))
    ax.set_xticklabels(corr.columns, rotation=35, ha="right", fontsize=9)
    ax.set_yticks(range(len(corr)))
    ax.set_yticklabels(corr.index, fontsize=9)
    for i in range(len(corr)):
        for j in range(len(corr)):
            value = corr.iat[i, j]
            ax.text(j, i, "–" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="Spearman rank correlation")
    ax.set_title("Correlation between per-point metrics")
    fig.subplots_adjust(left=0.2, right=0.98, bottom=0.2, top=0.93)
    return _save(fig, folder / "correlation.png")


def plot_accumulated_vs_isolated(run: RunData, folder: Path) -> Path:
    plt = _pyplot()
    stats = run.stats
    fig, (line_ax, cos_ax) = plt.subplots(2, 1, figsize=(17, 9))
    line_ax.plot(stats.index, _finite(stats["qsnr_db"]), marker=".", linewidth=0.8, label="accumulated (whole model quantized)")
    line_ax.plot(stats.index, _finite(stats["iso_qsnr_db"]), marker=".", linewidth=0.8, label="isolated (only this point quantized)")
    line_ax.set_ylabel("QSNR (dB)")
    line_ax.set_title("Accumulated vs isolated error per point")
    line_ax.legend(fontsize=8)
    _point_axis(line_ax, stats)
    cos_ax.bar(stats.index, 1 - stats["iso_logit_cosine"], color=[KIND_COLOURS.get(k, "0.5") for k in stats["kind"]])
    cos_ax.set_yscale("log")
    cos_ax.set_ylabel("1 − logit cosine (log)")
    cos_ax.set_title("Each point alone: end-to-end logit error with only that point quantized")
    from matplotlib.patches import Patch

    cos_ax.legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLOURS.items()], fontsize=8, loc="upper right", ncols=4)
    _point_axis(cos_ax, stats)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.95, hspace=0.35)
    return _save(fig, folder / "accumulated_vs_isolated.png")


def plot_sensitivity(run: RunData, path: Path) -> Path:
    """Fisher score against accumulated QSNR, one dot per point."""
    plt = _pyplot()
    table = run.stats.merge(run.sensitivity[["name", "fisher"]], on="name")
    fig, ax = plt.subplots(figsize=(9, 7))
    positive = table[table["fisher"] > 0]
    for kind, colour in KIND_COLOURS.items():
        part = positive[positive["kind"] == kind]
        if len(part):
            ax.scatter(_finite(part["qsnr_db"]), part["fisher"], s=16, color=colour, label=kind, alpha=0.8)
    for i, row in enumerate(positive.nlargest(5, "fisher").itertuples()):
        # Alternate above / below: the top points often sit close together.
        ax.annotate(row.name, (row.qsnr_db, row.fisher), fontsize=7, xytext=(4, 3 if i % 2 == 0 else -9), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("QSNR (dB), accumulated")
    ax.set_ylabel("Fisher sensitivity (estimated loss increase, log)")
    ax.set_title("Sensitivity vs quantization error per point")
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.1, top=0.93)
    return _save(fig, path)


def write_plots(run: RunData, folder: Path) -> tuple[list[Path], dict[str, float]]:
    """Every plot into ``folder``; returns the files and the outlier regression."""
    fit = outlier_regression(run)
    paths = [
        plot_qsnr(run, folder),
        plot_mse(run, folder),
        plot_cosine(run, folder),
        plot_blocks(run, folder),
        plot_outliers(run, folder, fit),
        plot_correlation(run, folder),
    ]
    if run.isolated:
        paths.append(plot_accumulated_vs_isolated(run, folder))
    if run.sensitivity is not None:
        paths.append(plot_sensitivity(run, folder / "sensitivity.png"))
    return paths, fit


# -- report --------------------------------------------------------------------------------------------


def table_html(frame: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for value in row:
            if isinstance(value, float | np.floating):
                text = floatfmt.format(value) if math.isfinite(value) else ("∞" if value > 0 else "–")
            else:
                text = str(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _image_html(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(path.name)}</figcaption></figure>'


def write_report(run: RunData, plots: list[Path], fit: dict[str, float], path: Path, extra_sections: list[tuple[str, str]] = ()) -> None:
    """One self-contained HTML page: summary, accuracy, worst points, the plots embedded."""
    from utils.run_dir import write_text_atomic

    s = run.summary
    profile = s.get("profile", {})
    accuracy = pd.DataFrame(
        [
            {"metric": label, "FP32": s.get("fp32", {}).get(key), "INT8": s.get("int8", {}).get(key)}
            for key, label in (("top1", "top-1 (%)"), ("top5", "top-5 (%)"), ("precision", "precision"), ("recall", "recall"), ("f1", "F1"))
        ]
    )
    overview = pd.DataFrame(
        [
            ("model", s.get("model")),
            ("recipe", (s.get("config") or {}).get("name")),
            ("evaluation images", (s.get("int8") or {}).get("samples")),
            ("top-1 agreement FP32 vs INT8", s.get("agreement_top1")),
            ("mean logit cosine FP32 vs INT8", s.get("logit_cosine_mean")),
            ("profiled images", profile.get("samples")),
            ("quantization points", profile.get("points", len(run.stats))),
            ("mean / median QSNR (dB)", f"{profile.get('qsnr_db_mean') or float('nan'):.2f} / {profile.get('qsnr_db_median') or float('nan'):.2f}"),
            ("outlier regression INT8 on FP32", f"slope {fit['slope']:.4f}, intercept {fit['intercept']:.3g}, R² {fit['r2']:.4f}"),
            ("run folder", str(run.path)),
        ],
        columns=["", "value"],
    )
    worst_columns = ["name", "kind", "qsnr_db", "mse", "cosine", "kl", "clipped_fraction"]
    sections = [
        ("Summary", table_html(overview)),
        ("Accuracy", table_html(accuracy)),
        ("Worst points, accumulated (lowest QSNR)", table_html(run.stats.nsmallest(10, "qsnr_db")[worst_columns])),
    ]
    if run.isolated:
        columns = ["name", "kind", "iso_logit_cosine", "iso_qsnr_db", "qsnr_db"]
        sections.append(("Worst points alone (lowest isolated logit cosine)", table_html(run.stats.nsmallest(10, "iso_logit_cosine")[columns], "{:.6g}")))
    sections.extend(extra_sections)
    sections.append(("Plots", "".join(_image_html(p) for p in plots)))
    body = "".join(f"<section><h2>{html.escape(title)}</h2>{content}</section>" for title, content in sections)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qvit report: {html.escape(str(s.get("model")))}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1300px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f0f0f0; }} td:first-child {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #ddd; }} figure {{ margin: 1em 0; }}
figcaption {{ color: #666; font-size: 0.85em; }}
</style></head><body>
<h1>Quantization report: {html.escape(str(s.get("model")))}, {html.escape(str((s.get("config") or {}).get("name")))}</h1>
{body}
</body></html>
"""
    write_text_atomic(path, page)
