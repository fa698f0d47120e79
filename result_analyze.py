#!/usr/bin/env python
"""Turn a test_qvit.py run folder into plots, a self-contained report, and a Fisher sensitivity analysis.

    python result_analyze.py                                   # the newest run under log/qvit
    python result_analyze.py log/qvit/20261126-231441 --sensitivity --keep-fp 0,1,2,4

Writes ``RUN/plots/*.png`` and ``RUN/report.html`` (an earlier analysis is kept: a second one goes to
``plots-<time>/`` and ``report-<time>.html``). ``--sensitivity`` computes each quantization point's
Fisher score on calibration images (see utils/sensitivity.py for the estimator), writes
``log/hessian/sensitivity_<time>.csv`` and ``sensitivity_plot_<time>.png``; ``--keep-fp`` then
evaluates the run's validation images with the K most sensitive points kept in floating point;
``--mixed-recipe K`` writes ``log/hessian/mixed_<time>.yaml``, the run's recipe with its K most
sensitive points below ``--mixed-bits`` (8) promoted to that width (mixed precision).
Bad input ends with one ``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from quant_config import ConfigError
from utils.errors import ArgumentParser, UserError, run_script


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default=None, help="run folder written by test_qvit.py (default: the newest under --log-dir)")
    p.add_argument("--log-dir", default="log/qvit", help="where to look for the newest run (default log/qvit)")
    g = p.add_argument_group("sensitivity (Fisher information; needs the model, its weights and the run's calibrated.pt)")
    g.add_argument("--sensitivity", action="store_true", help="compute per-point and per-block Fisher sensitivity")
    g.add_argument("--sensitivity-samples", type=int, default=64, help="calibration images for the Fisher estimate (default 64)")
    g.add_argument("--keep-fp", default=None, metavar="K[,K...]", help="with --sensitivity: evaluate with the K most sensitive points in float, e.g. 0,1,2,4")
    g.add_argument("--mixed-recipe", type=int, default=None, metavar="K",
                   help="with --sensitivity: write a recipe (mixed_<time>.yaml under --hessian-dir) that is the run's with its K most "
                        "sensitive points below --mixed-bits promoted to --mixed-bits; run it with test_qvit.py --config FILE")
    g.add_argument("--mixed-bits", type=int, default=8, help="bit width of the promoted points (default 8)")
    g.add_argument("--calibrated", default=None, metavar="PATH", help="calibrated quantizer state (default RUN/calibrated.pt)")
    g.add_argument("--checkpoint", default=None, metavar="PATH", help="model weights (default: the run's --checkpoint, else timm pretrained)")
    g.add_argument("--calib-dir", default=None, help="calibration images (default: the run's calibration split)")
    g.add_argument("--val-dir", default=None, help="evaluation images for --keep-fp (default: the run's evaluation split)")
    g.add_argument("--hessian-dir", default="log/hessian", help="where the sensitivity CSV and plot go (default log/hessian)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--workers", type=int, default=2)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true")
    return p


def newest_run(log_dir: Path) -> Path:
    runs = sorted(p for p in log_dir.glob("[0-9]*-[0-9]*") if p.is_dir()) if log_dir.is_dir() else []
    if not runs:
        raise UserError(f"no run folder under {log_dir}: run test_qvit.py first, or name a run folder")
    return runs[-1]


def parse_keeps(text: str | None) -> list[int]:
    if text is None:
        return []
    if not re.fullmatch(r"\d+(,\d+)*", text):
        raise UserError(f"--keep-fp {text!r}: expected non-negative integers separated by commas, e.g. 0,1,2,4")
    return sorted({int(k) for k in text.split(",")})


def free_name(folder: Path, stem: str, suffix: str, stamp: str) -> Path:
    """``folder/stem+suffix``, or with ``-<stamp>`` (and a counter) when that exists: nothing is overwritten."""
    candidate = folder / f"{stem}{suffix}"
    n = 1
    while candidate.exists():
        candidate = folder / (f"{stem}-{stamp}{suffix}" if n == 1 else f"{stem}-{stamp}-{n}{suffix}")
        n += 1
    return candidate


def sensitivity(args: argparse.Namespace, run, stamp: str, keeps: list[int], restored: tuple,
                publish: Callable[[list[tuple[str, str]]], object]) -> list[Path]:  # fmt: skip
    """Fisher scores into the run data, the sensitivity CSV/plot under --hessian-dir, and the keep-fp table;
    ``publish`` gets the report's sections after each step (so an interrupted run keeps what is done)."""
    from utils.html_report import table_html
    from utils.sensitivity import block_sensitivity

    qvit, loader_args, device, calib_dir, val_dir = restored
    table = fisher_step(args, qvit, run, calib_dir, loader_args, device)
    images = table.attrs["images"]
    hessian = Path(args.hessian_dir)
    written = write_sensitivity(run, table, hessian, stamp)
    top = table.sort_values("rank").head(10)
    sections = [(f"Fisher sensitivity ({images} calibration images, estimated loss increase in nats)",
                 table_html(top[["rank", "name", "kind", "fisher", "noise_energy", "grad_energy", "qsnr_db"]]) + "<h3>Per block</h3>" + table_html(block_sensitivity(table)))]  # fmt: skip
    if args.mixed_recipe is not None:
        written.append(write_mixed_recipe(qvit, qvit.recipe, table, args, hessian, stamp, images))
    publish(sections)
    if keeps:
        section, path = keep_fp_step(args, run, qvit, table, val_dir, keeps, loader_args, device, hessian, stamp)
        sections.append(section)
        written.append(path)
        publish(sections)
    return written


def prepare_sensitivity(args: argparse.Namespace, run, keeps: list[int]) -> tuple:
    """Everything --sensitivity needs, checked before anything is written: the restored QVit, its
    loaders' arguments, the device and the two splits."""
    from utils.device import resolve_device

    if run.summary.get("demo"):
        raise UserError(f"{run.path} is a --demo run: its generated images are gone; analyse a run on real data")
    device = resolve_device(args.device)
    calib_dir, val_dir = analysis_splits(args, run.summary, keeps)
    qvit, loader_args = restore_run(args, run, device)
    return qvit, loader_args, device, calib_dir, val_dir


def estimate(run, forwards: int) -> str:
    """`` (about N s)``: ``forwards`` model passes at the analysed run's evaluation speed (both of its models
    per image), or nothing for a run that recorded none."""
    rate = run.summary.get("eval_images_per_s")
    if not rate:
        return ""
    seconds = forwards / (2 * rate)
    return f" (about {seconds / 60:.0f} min at the run's evaluation speed)" if seconds >= 90 else f" (about {seconds:.0f} s at the run's evaluation speed)"


def analysis_splits(args: argparse.Namespace, summary: dict, keeps: list[int]) -> tuple[Path, Path]:
    """The calibration split (Fisher scores) and the evaluation split (--keep-fp): the flags', else the run's."""
    calib_dir = Path(args.calib_dir or (summary.get("calibration") or {}).get("split") or "")
    val_dir = Path(args.val_dir or (summary.get("evaluation") or {}).get("split") or "")
    for flag, folder, needed in (("--calib-dir", calib_dir, True), ("--val-dir", val_dir, bool(keeps))):
        if needed and not folder.is_dir():
            raise UserError(f"{flag} {folder}: no such directory (the run's split moved? pass {flag})")
    return calib_dir, val_dir


def restore_run(args: argparse.Namespace, run, device) -> tuple:
    """The run's calibrated QVit on ``device`` (--calibrated, else the run's calibrated.pt) and the loaders' arguments."""
    from timm.data import create_transform, resolve_data_config

    from utils.checkpoint import restore_calibrated

    calibrated = Path(args.calibrated) if args.calibrated else run.path / "calibrated.pt"
    if not calibrated.is_file():
        raise UserError(f"{calibrated}: no calibrated quantizer state; rerun test_qvit.py with --save-calibrated, or pass --calibrated PATH")
    checkpoint = args.checkpoint or run.summary.get("checkpoint")
    if checkpoint and not Path(checkpoint).is_file():
        raise UserError(f"{checkpoint}: no such checkpoint file (pass --checkpoint PATH)")
    qvit = restore_calibrated(calibrated, None, checkpoint).to(device)
    transform = create_transform(**resolve_data_config(model=qvit.model))
    return qvit, dict(transform=transform, batch_size=args.batch_size, workers=args.workers, pin_memory=device.type == "cuda")


def fisher_step(args: argparse.Namespace, qvit, run, calib_dir: Path, loader_args: dict, device):
    """Each point's Fisher score on --sensitivity-samples calibration images, joined with the run's QSNR."""
    from utils.data import calibration_subset, make_loader, scan_split
    from utils.sensitivity import fisher_sensitivity

    samples = calibration_subset(scan_split(calib_dir), args.sensitivity_samples, seed=1)
    # A forward and a backward pass per image, hooks on every point: about three forward passes.
    print(f"Fisher sensitivity of {run.summary.get('model', 'the model')} on {len(samples)} calibration images from {calib_dir}"
          + estimate(run, 3 * len(samples)))  # fmt: skip
    start = time.perf_counter()
    try:
        table = fisher_sensitivity(qvit, make_loader(samples, **loader_args), device, not args.no_progress)
    except ValueError as exc:
        raise UserError(f"{calib_dir}: {exc}") from None
    print(f"  {time.perf_counter() - start:.1f} s")
    images = table.attrs["images"]
    table = table.merge(run.stats[["name", "qsnr_db"]], on="name", how="left")
    table.attrs["images"] = images  # a merge starts with no attrs
    run.sensitivity = table
    return table


def write_sensitivity(run, table, folder: Path, stamp: str) -> list[Path]:
    """sensitivity_<stamp>.csv and its plot under ``folder``, each written whole or not at all."""
    from utils.plots import plot_sensitivity
    from utils.run_dir import atomic_path, write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    csv_path = free_name(folder, f"sensitivity_{stamp}", ".csv", stamp)
    plot_path = free_name(folder, f"sensitivity_plot_{stamp}", ".png", stamp)
    write_text_atomic(csv_path, table.sort_values("rank").to_csv(index=False))
    with atomic_path(plot_path, suffix=".png") as tmp:
        plot_sensitivity(run, tmp)
    print(f"  wrote {csv_path} and {plot_path}")
    top = table.sort_values("rank").head(5)
    print("  most sensitive: " + ", ".join(f"{r.name} {r.fisher:.3g}" for r in top.itertuples()))
    return [csv_path, plot_path]


def keep_fp_step(args: argparse.Namespace, run, qvit, table, val_dir: Path, keeps: list[int], loader_args: dict, device, folder: Path,
                 stamp: str) -> tuple[tuple[str, str], Path]:  # fmt: skip
    """Top-1 on the evaluation split with the K most sensitive points in float, for each K of --keep-fp."""
    import pandas as pd

    from utils.html_report import table_html
    from utils.data import make_loader, scan_split
    from utils.run_dir import write_text_atomic
    from utils.sensitivity import evaluate_keep_fp

    val = scan_split(val_dir)
    ranking = list(table.sort_values("rank")["name"])
    print(f"Evaluating {len(val)} images from {val_dir} with the K most sensitive points in float, K = {', '.join(map(str, keeps))}"
          + estimate(run, len(val) * (len(keeps) + 1)))  # FP32 once, the quantized model once per K
    try:
        fp32, results = evaluate_keep_fp(qvit, make_loader(val, **loader_args), ranking, keeps, device, not args.no_progress)
    except ValueError as exc:
        raise UserError(f"{val_dir}: {exc}") from None
    rows = pd.DataFrame([{"K": r.keep, "top-1 (%)": r.top1, "drop": fp32["top1"] - r.top1, "agreement": r.agreement_top1,
                          "logit cosine": r.logit_cosine, "kept in float": ", ".join(r.kept) or "-"} for r in results])  # fmt: skip
    path = free_name(folder, f"keep_fp_{stamp}", ".csv", stamp)
    write_text_atomic(path, rows.to_csv(index=False))
    print(f"  FP32 top-1 {fp32['top1']:.2f} on {fp32['samples']} images; wrote {path}")
    for r in results:
        print(f"  K={r.keep}: top-1 {r.top1:.2f}, agreement {r.agreement_top1:.3f}, logit cosine {r.logit_cosine:.4f}")
    return (f"Keeping the most sensitive points in float (FP32 top-1 {fp32['top1']:.2f}, {fp32['samples']} images)", table_html(rows)), path


def write_mixed_recipe(qvit, recipe, table, args: argparse.Namespace, folder: Path, stamp: str, images: int) -> Path:
    """The run's recipe with its most sensitive narrow points promoted (utils.sensitivity.mixed_precision_layers)."""
    import dataclasses

    import yaml

    from quant_config import recipe_from_dict
    from utils.run_dir import write_text_atomic
    from utils.sensitivity import mixed_precision_layers

    layers, promoted = mixed_precision_layers(qvit, table, args.mixed_recipe, args.mixed_bits)
    name = f"{recipe.name}_mp{len(promoted)}x{args.mixed_bits}"
    description = (f"{recipe.name} as calibrated in the analysed run (its --set overrides included), its {len(promoted)} most "
                   f"Fisher-sensitive points below {args.mixed_bits} bits promoted to {args.mixed_bits} bits")
    data = dataclasses.replace(recipe, name=name, description=description, layers=layers or None).to_dict()
    recipe_from_dict(data, where=name)  # the file written must load
    path = free_name(folder, f"mixed_{stamp}", ".yaml", stamp)
    header = (
        f"# {name}: recipe {recipe.name} with its {len(promoted)} most Fisher-sensitive points below {args.mixed_bits} bits\n"
        f"# promoted to {args.mixed_bits} bits (result_analyze.py --sensitivity --mixed-recipe {args.mixed_recipe}, "
        f"{images} calibration images, {stamp}).\n"
    )
    write_text_atomic(path, header + yaml.safe_dump(data, sort_keys=False))
    print(f"  mixed precision: {len(promoted)} points promoted to {args.mixed_bits} bits"
          + (f" ({', '.join(promoted[:4])}{', ...' if len(promoted) > 4 else ''})" if promoted else "") + f"; wrote {path}")
    return path


def analyse(args: argparse.Namespace) -> Path:
    for flag, value in (("--sensitivity-samples", args.sensitivity_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    keeps = parse_keeps(args.keep_fp)
    if keeps and not args.sensitivity:
        raise UserError("--keep-fp ranks points by their Fisher sensitivity: add --sensitivity")
    if args.mixed_recipe is not None:
        if not args.sensitivity:
            raise UserError("--mixed-recipe ranks points by their Fisher sensitivity: add --sensitivity")
        if args.mixed_recipe < 1:
            raise UserError(f"--mixed-recipe must be at least 1, got {args.mixed_recipe}")
        if not 2 <= args.mixed_bits <= 16:
            raise UserError(f"--mixed-bits must be from 2 to 16, got {args.mixed_bits}")
    run_path = Path(args.run) if args.run else newest_run(Path(args.log_dir))

    from utils.analysis import load_run
    from utils.html_report import write_report
    from utils.plots import write_plots
    from utils.run_dir import atomic_path

    run = load_run(run_path)
    print(f"Analysing {run_path} ({len(run.stats)} quantization points)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    restored = prepare_sensitivity(args, run, keeps) if args.sensitivity else None

    # The plots and the report first (the slow sensitivity steps add to the report as each ends). Plots
    # go to a hidden folder renamed into place: no half-written plots/ folder, ever.
    target = free_name(run_path, "plots", "", stamp)
    with atomic_path(target) as tmp:
        tmp.mkdir()
        plots, fit = write_plots(run, tmp)
    plots = [target / p.name for p in plots]
    print(f"Outlier ratio INT8 vs FP32: slope {fit['slope']:.4f}, intercept {fit['intercept']:.3g}, R² {fit['r2']:.4f} ({fit['points']} points)")
    report = free_name(run_path, "report", ".html", stamp)
    write_report(run, plots, fit, report)
    print(f"Wrote {len(plots)} plots to {target} and the report {report}")
    if restored is not None:
        from utils.plots import plot_sensitivity

        def publish(sections: list[tuple[str, str]]) -> None:
            """The report again, with the sections so far and the Fisher plot (drawn once, into the plots)."""
            sensitivity_plot = target / "sensitivity.png"
            if not sensitivity_plot.exists():
                with atomic_path(sensitivity_plot, suffix=".png") as tmp:
                    plot_sensitivity(run, tmp)
            write_report(run, [*plots, sensitivity_plot], fit, report, sections)

        sensitivity(args, run, stamp, keeps, restored, publish)
        print(f"Added the sensitivity results to {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_script(lambda: analyse(args), (UserError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
