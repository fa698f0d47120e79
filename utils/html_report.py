"""``report.html``: one self-contained page (plots embedded as base64 data URIs; no server, no network)
from a run folder's data, its plots and extra sections (result_analyze.py)."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from utils.analysis import RunData

__all__ = ["table_html", "write_report"]


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

