"""Plots of profiler results (matplotlib, headless Agg backend)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

from utils.profiler import ProfileResult

__all__ = ["write_point_histograms", "select_histogram_points"]


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

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
