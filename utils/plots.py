"""Every plot (matplotlib, headless Agg backend): the profiler's per-point histograms, and the analysis
plots of a run folder (result_analyze.py), every point on the x axis in model order with ticks at
block boundaries, so that 150-250 points stay readable."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from utils.analysis import RunData, block_table, correlation_table, finite, outlier_regression
from utils.profiler import ProfileResult

__all__ = ["plot_sensitivity", "select_histogram_points", "write_plots", "write_point_histograms"]

KIND_COLOURS = {"weight": "tab:blue", "activation": "tab:orange", "layernorm_input": "tab:green", "attention": "tab:red"}



def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def select_histogram_points(result: ProfileResult, spec: str) -> list[str]:
    """``all``, ``none`` or ``worst:K`` (the K points with the lowest accumulated QSNR)."""
    table = result.table
    if spec == "all":
        return list(table["name"])
    if spec == "none":
        return []
    if spec.startswith("worst:"):
        k = int(spec.split(":", 1)[1])
        return list(table.nsmallest(k, "qsnr_db")["name"])
    raise ValueError(f"histogram selection {spec!r}: expected all, none or worst:K")


def write_point_histograms(result: ProfileResult, folder: Path, names: Iterable[str]) -> list[Path]:
    """One ``<name>_hist.png`` per point: FP32 and quantized value histograms, clip range marked.

    One figure is drawn once and its artists' data swapped per point, with limits set by hand: creating
    axes, ticks and title layout anew for each of a ViT's ~200 points cost several times the drawing.
    """
    from matplotlib.ticker import NullLocator

    plt = _pyplot()

    rows = result.table.set_index("name")
    written = []
    fig, ax = plt.subplots(figsize=(7.0, 3.8), dpi=100)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.14, top=0.84)
    try:
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_ylabel("count")
        ref_patch = ax.stairs([1], [0, 1], label="FP32", color="tab:blue", fill=True, alpha=0.35)
        q_patch = ax.stairs([1], [0, 1], label="quantized (accumulated)", color="tab:red", linewidth=0.9)
        clip_lines = [ax.axvline(0, color="black", linestyle="--", linewidth=0.8) for _ in range(2)]
        note = ax.text(0.01, 0.98, "", transform=ax.transAxes, fontsize=7, va="top")
        ax.legend(fontsize=8, loc="upper right")
        for name in names:
            bins, h_ref, h_q = result.histograms[name]
            row = rows.loc[name]
            edges = bins.edges()
            ref_patch.set_data(h_ref[1:-1], edges)
            q_patch.set_data(h_q[1:-1], edges)
            for line, x in zip(clip_lines, bins.clip):
                line.set_xdata([x, x])
            ax.set_xlim(edges[0], edges[-1])
            ax.set_ylim(0.8, max(2.0, 2.0 * float(max(h_ref[1:-1].max(), h_q[1:-1].max()))))
            ax.set_xlabel("log2(|x| / scale)" if bins.log_scale is not None else "value")
            qsnr = row["qsnr_db"]
            qsnr_text = "∞" if not math.isfinite(qsnr) else f"{qsnr:.1f}"
            ax.set_title(
                f"{name}  ({row['bit_type']} {row['quantizer']}{' PTF' if row['ptf'] else ''}, {row['observer']}, {row['calibration_mode']})\n"
                f"QSNR {qsnr_text} dB, cos {row['cosine']:.5f}, clipped {row['clipped_fraction']:.3%}",
                fontsize=9,
                y=1.01,  # a fixed position: automatic title placement measures the axis every time
            )
            outside = (int(h_ref[0]) + int(h_ref[-1]), int(h_q[0]) + int(h_q[-1]))
            note.set_text(f"dashed: clip range; beyond the plotted range FP32 {outside[0]}, quantized {outside[1]}")
            path = folder / f"{name}_hist.png"
            fig.savefig(path)
            written.append(path)
    finally:
        plt.close(fig)
    return written


# -- analysis plots of a run folder -----------------------------------------------------------------


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
    values = finite(stats[column])
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
    values = finite(stats["qsnr_db"]).dropna()
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
    line_ax.plot(stats.index, finite(stats["qsnr_db"]), marker=".", linewidth=0.8, label="accumulated (whole model quantized)")
    line_ax.plot(stats.index, finite(stats["iso_qsnr_db"]), marker=".", linewidth=0.8, label="isolated (only this point quantized)")
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
            ax.scatter(finite(part["qsnr_db"]), part["fisher"], s=16, color=colour, label=kind, alpha=0.8)
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

