#!/usr/bin/env python
"""Deployed INT8 on the CPU: our recipes' Q/DQ exports against NNCF's post-training quantization.

    pip install -r requirements-bench.txt                       # nncf: this benchmark only
    python -m bench.bench_deploy                                # deit_tiny + vit_base, batch 1 and 32, 2 threads
    python -m bench.bench_deploy --models deit_tiny_patch16_224 --calib-images 64 --val-images 128 --batches 1,8 --iters 3
    python -m bench.bench_deploy --models vit_base_patch16_224 --batches 1 --iters 2 --speed-calib-images 16
    python -m bench.bench_deploy --recipes cpu_int8,trt_int8_search --json bench_deploy.json

One process, for each model: the same weights, the same FP32 ONNX, the same images and the same
thread count (``--threads``, for PyTorch and every runtime) for every system:

* FP32: the QVit in FP32 mode (= timm) exported once to ``fp32.onnx`` (simplified), run in ONNX
  Runtime and in OpenVINO;
* NNCF PTQ: ``ov.convert_model(fp32.onnx)`` quantized by ``nncf.quantize`` (``ModelType.TRANSFORMER``,
  ``subset_size`` = all calibration images, defaults otherwise) with SmoothQuant on (NNCF's default)
  and off, run in OpenVINO;
* each of ``--recipes``: calibrated by utils.engine.calibrate on the same calibration images,
  exported with uint8 activations and zero points (what the CPU runtimes take) and int8 weights,
  simplified, run in ONNX Runtime and in OpenVINO in the form convert_tensorrt.py ships to each
  (int8.ort.onnx, the OpenVINO IR: utils.runtimes.save_deployed). A recipe that does not exist is skipped.

Accuracy (DeiT-tiny with the real ``--checkpoint`` only; other models get random weights, are timed
only and calibrated on ``--speed-calib-images`` images to keep them quick): per system and runtime, top-1 agreement and mean logit cosine with the PyTorch FP32
logits, and top-1 against the labels, on ``--val-images`` images of ``--val-dir``; also each recipe's
PyTorch fake-quant model, so that a gap between it and the runtimes shows the export's share; and, for
each INT8 system against NNCF's most faithful variant, the images whose FP32 class only one of the two
changes, with the exact McNemar p-value (is an agreement gap of a few images a difference at all?).
Speed at each ``--batches``: images/s of every system, and paired speed ratios (the two sides
alternate, utils.timing.timed_pairs; medians of ``--iters`` runs): each INT8 system against FP32 in
the same runtime, and each of our exports against NNCF with SmoothQuant in OpenVINO (speed-only
models at batch >= 32: max(3, iters // 3) pairs, ViT-B runs take seconds there). File sizes of
the ONNX models and NNCF's IR weights. ``--json PATH`` writes every number.
Bad input ends with one ``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: the library imports from the repository root only as a package
    sys.exit("error: run it from the repository root as: python -m bench.bench_deploy ...")

import numpy as np
import torch

from bench.common import SHARED, build_qvit
from bench.deploy_systems import (ACCURACY_MODEL, FP32, NNCF_SQ, TITLES, System, accuracy_table, calibration_images, check_tools,
                                  cpu_name, data_transform, export_fp32, header, load_systems, measure_accuracy, nncf_variants, our_int8,
                                  parse_list, quiet_tools, step, torch_logits, validation_images, versions)  # fmt: skip
from quant_config import DEFAULT_RECIPE, ConfigError, available_recipes
from utils.errors import ArgumentParser, UserError, parse_batches, run_script


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=f"{ACCURACY_MODEL},vit_base_patch16_224", help="timm models, comma-separated")
    p.add_argument("--recipes", default="cpu_int8,trt_int8_search", help="our recipes, comma-separated (one that does not exist is skipped)")
    p.add_argument("--checkpoint", type=Path, default=SHARED / "weights" / "deit_tiny_patch16_224.pth", help=f"weights of {ACCURACY_MODEL}")
    p.add_argument("--calib-dir", type=Path, default=SHARED / "data" / "imagenet-mini" / "train", help="ImageNet-layout calibration split")
    p.add_argument("--calib-images", type=int, default=1000, help="calibration images (ours and NNCF's subset_size; default 1000)")
    p.add_argument("--speed-calib-images", type=int, default=64, help="calibration images for the speed-only models (default 64)")
    p.add_argument("--val-dir", type=Path, default=SHARED / "data" / "imagenet-mini" / "val", help="ImageNet-layout evaluation split")
    p.add_argument("--val-images", type=int, default=1000, help="evaluation images, evenly spread over --val-dir (default 1000)")
    p.add_argument("--batches", default="1,32", help="batch sizes to time (default 1,32)")
    p.add_argument("--iters", type=int, default=10, help="timed pairs per ratio (median; default 10)")
    p.add_argument("--threads", type=int, default=2, help="threads of PyTorch and of every runtime (default 2)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every number to PATH (JSON)")
    return p


# -- arguments --------------------------------------------------------------------------------------


def check_arguments(args: argparse.Namespace) -> tuple[list[str], list[str], list[int]]:
    """Everything checked before anything slow starts; returns the models, the recipes and the batch sizes."""
    from utils.checkpoint import check_model_name

    check_tools()
    models = parse_list("--models", args.models)
    for name in models:
        check_model_name(name)
    recipes = parse_list("--recipes", args.recipes)
    batches = parse_batches("--batches", args.batches)
    for flag, value in (("--calib-images", args.calib_images), ("--speed-calib-images", args.speed_calib_images),
                        ("--val-images", args.val_images), ("--iters", args.iters), ("--threads", args.threads)):  # fmt: skip
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {args.workers}")
    if not args.calib_dir.is_dir():
        raise UserError(f"--calib-dir {args.calib_dir}: no such directory")
    if ACCURACY_MODEL in models:
        if not args.val_dir.is_dir():
            raise UserError(f"--val-dir {args.val_dir}: no such directory")
        if not args.checkpoint.is_file():
            raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: no such directory {args.json.parent}")
    return models, recipes, batches


# -- speed ------------------------------------------------------------------------------------------


def speed_input(images: list[torch.Tensor], batch: int) -> np.ndarray:
    """``batch`` real images (repeated when there are fewer): the runtimes' speed does not depend on them."""
    pool = torch.cat(images).numpy()
    reps = -(-batch // len(pool))
    return np.ascontiguousarray(np.concatenate([pool] * reps)[:batch])


def paired(reference: System, system: System, x: np.ndarray, iters: int) -> dict[str, Any]:
    """``reference`` and ``system`` timed alternately; ``speedup`` is system's speed relative to reference (>1: faster)."""
    from utils.timing import timed_pairs

    t_ref, t_sys, time_ratio = timed_pairs(lambda: reference.run(x), lambda: system.run(x), iters)
    for s, t in ((reference, t_ref), (system, t_sys)):
        s.seconds.setdefault(len(x), []).append(t)
    return {"batch": len(x), "reference": reference.key, "system": system.key, "iters": iters,
            "median_s_reference": t_ref, "median_s_system": t_sys, "speedup": 1 / time_ratio}  # fmt: skip


def iterations(speed_only: bool, batch: int, iters: int) -> int:
    """Fewer pairs for the random-weight (speed only) models at large batches: ViT-B at batch 32 takes
    seconds per run on two cores, and the alternation still cancels the drift."""
    return max(3, iters // 3) if speed_only and batch >= 32 else iters


def measure_speed(systems: list[System], images: list[torch.Tensor], batches: list[int], iters_base: int,
                  speed_only: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """Per-system rows (images/s and speed ratios at each batch) and every timed pair."""
    fp32 = {s.runtime: s for s in systems if s.kind == "fp32"}
    nncf_best = next(s for s in systems if s.name == NNCF_SQ)
    vs_fp32: dict[tuple[str, int], dict[str, Any]] = {}
    vs_nncf: dict[tuple[str, int], dict[str, Any]] = {}
    iters_used = {}
    for batch in batches:
        x = speed_input(images, batch)
        iters = iters_used[batch] = iterations(speed_only, batch, iters_base)
        note = f" (reduced from {iters_base} for a speed-only model at batch {batch})" if iters != iters_base else ""
        for system in (s for s in systems if s.kind != "fp32"):
            step(f"  batch {batch}: {system.key} vs {fp32[system.runtime].key}, {iters} pairs{note}")
            vs_fp32[system.key, batch] = paired(fp32[system.runtime], system, x, iters)
        for system in (s for s in systems if s.kind == "ours" and s.runtime == "openvino"):
            step(f"  batch {batch}: {system.key} vs {nncf_best.key}, {iters} pairs{note}")
            vs_nncf[system.key, batch] = paired(nncf_best, system, x, iters)
    rows = []
    for system in systems:
        row = {"system": system.name, "runtime": system.runtime, "kind": system.kind}
        for batch in batches:
            # A system in several pairs: the median of its per-pair median times.
            row[f"img_per_s@{batch}"] = batch / statistics.median(system.seconds[batch])
            row[f"median_s@{batch}"] = statistics.median(system.seconds[batch])
            row[f"speedup_vs_fp32_same_runtime@{batch}"] = vs_fp32.get((system.key, batch), {}).get("speedup")
            row[f"speedup_vs_nncf_smoothquant_openvino@{batch}"] = vs_nncf.get((system.key, batch), {}).get("speedup")
            row[f"iters@{batch}"] = iters_used[batch]
        rows.append(row)
    return rows, [*vs_fp32.values(), *vs_nncf.values()]


# -- one model --------------------------------------------------------------------------------------


def bench_model(model_name: str, recipes: list[str], batches: list[int], args: argparse.Namespace) -> dict[str, Any]:
    speed_only = model_name != ACCURACY_MODEL
    checkpoint = None if speed_only else args.checkpoint
    n_calib = args.speed_calib_images if speed_only else args.calib_images
    if speed_only:
        step(f"{model_name}: random weights, SPEED ONLY - its accuracy is not measured; calibration on {n_calib} images only (--speed-calib-images)")
    else:
        step(f"{model_name}: weights {checkpoint}")
    transform = data_transform(model_name)
    step(f"{model_name}: loading {n_calib} calibration images from {args.calib_dir}")
    calib = calibration_images(args.calib_dir, n_calib, transform, args.workers)
    result: dict[str, Any] = {"model": model_name, "speed_only": speed_only, "calibration_images": sum(len(x) for x in calib),
                              "skipped_recipes": {}, "calibration_seconds": {}, "sizes": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_deploy-") as tmp:
        folder = Path(tmp)
        step(f"{model_name}: FP32 ONNX export (QVit in FP32 mode = timm), simplify")
        # Never calibrated, only run in FP32 mode (= timm), so the recipe it is built with does not matter.
        reference = build_qvit(model_name, DEFAULT_RECIPE, checkpoint)
        fp32_onnx = export_fp32(reference, folder)
        files: list[tuple[str, Path]] = [("fp32.onnx", fp32_onnx)]
        entries: list[tuple[str, str, Path]] = [(FP32, "fp32", fp32_onnx)]

        for name, xml, seconds in nncf_variants(fp32_onnx, calib, folder, f"{model_name}: "):
            result["calibration_seconds"][name] = seconds
            files.append((f"{name}: IR .bin", xml.with_suffix(".bin")))
            entries.append((name, "nncf", xml))

        val = labels = None
        if not speed_only:
            step(f"{model_name}: loading {args.val_images} evaluation images from {args.val_dir}")
            val, labels = validation_images(args.val_dir, args.val_images, transform, args.workers)
            result["evaluation_images"] = len(labels)
        fake_quant: dict[str, np.ndarray] = {}
        known = set(available_recipes())
        for recipe in recipes:
            if recipe not in known:
                result["skipped_recipes"][recipe] = "no such recipe"
                step(f"{model_name}: recipe {recipe}: skipped (no such recipe; available: {', '.join(sorted(known))})")
                continue
            step(f"{model_name}: {recipe}: calibrate on {result['calibration_images']} images, export Q/DQ (uint8 activations, zero points), simplify"
                 + (f", fake-quant logits on {len(labels)} images" if labels is not None else ""))
            try:
                path, seconds, logits = our_int8(model_name, recipe, checkpoint, calib, folder, val)
            except UserError as exc:  # not deployable to the CPU runtimes as calibrated
                result["skipped_recipes"][recipe] = str(exc)
                step(f"{model_name}: recipe {recipe}: skipped ({' '.join(str(exc).split())})")
                continue
            result["calibration_seconds"][recipe] = seconds
            if logits is not None:
                fake_quant[recipe] = logits
            files.append((f"{recipe}: int8.onnx", path))
            entries.append((recipe, "ours", path))

        fp32_bytes = fp32_onnx.stat().st_size
        result["sizes"] = [{"file": label, "bytes": p.stat().st_size, "ratio_to_fp32_onnx": p.stat().st_size / fp32_bytes} for label, p in files]

        step(f"{model_name}: compiling every model ({args.threads} threads); our exports in the forms convert_tensorrt.py writes")
        systems = load_systems(entries, args.threads)
        if not speed_only:
            step(f"{model_name}: PyTorch FP32 logits")
            result["accuracy"] = measure_accuracy(systems, val, torch_logits(reference, val), labels, fake_quant)
        step(f"{model_name}: speed at batch {', '.join(map(str, batches))}")
        result["speed"], result["pairs"] = measure_speed(systems, calib, batches, args.iters, speed_only)
    return result


# -- tables -----------------------------------------------------------------------------------------


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def speed_table(result: dict[str, Any], batches: list[int]) -> list[str]:
    iters = ", ".join(f"batch {b}: {result['speed'][0][f'iters@{b}']}" for b in batches)
    lines = [f"\nSpeed: {result['model']}{' (random weights, speed only)' if result['speed_only'] else ''}; "
             f"images/s = batch / median time (a system in several pairs: median of its pairs' medians; not paired, so drift shows in them); "
             f"speed ratios = reference time / system time, median of the per-pair ratios over {iters} alternating pairs (>1: faster)"]  # fmt: skip
    cols = [f"img/s @{b}" for b in batches] + [f"vs FP32 same runtime @{b}" for b in batches] + [f"vs NNCF SQ on (OpenVINO) @{b}" for b in batches]
    lines += ["| system | runtime | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in result["speed"]:
        cells = [fmt(r[f"img_per_s@{b}"], ".1f") for b in batches]
        cells += [fmt(r[f"speedup_vs_fp32_same_runtime@{b}"], ".2f", "x") for b in batches]
        cells += [fmt(r[f"speedup_vs_nncf_smoothquant_openvino@{b}"], ".2f", "x") for b in batches]
        lines.append(f"| {r['system']} | {TITLES[r['runtime']]} | " + " | ".join(cells) + " |")
    return lines


def size_table(result: dict[str, Any]) -> list[str]:
    lines = [f"\nFiles: {result['model']}; calibration s = nncf.quantize, or utils.engine.calibrate with every pass the recipe has",
             "| file | MB | ratio to fp32.onnx | calibration s |", "|---|---:|---:|---:|"]
    for r in result["sizes"]:
        system = r["file"].split(":")[0]
        seconds = result["calibration_seconds"].get(system)
        lines.append(f"| {r['file']} | {r['bytes'] / 1e6:.2f} | {r['ratio_to_fp32_onnx']:.3f} | {fmt(seconds, '.1f')} |")
    return lines


def report(meta: dict[str, Any], results: list[dict[str, Any]], batches: list[int]) -> str:
    lines = ["", header(meta)]
    for result in results:
        if result["speed_only"]:
            lines.append(f"\n{result['model']}: random weights - accuracy NOT measured (speed only; calibrated on {result['calibration_images']} images)")
        else:
            lines += accuracy_table(f"\nAccuracy: {result['model']}, {result['evaluation_images']} evaluation images, against the PyTorch FP32 logits; "
                                    f"calibration on {result['calibration_images']} images", result["accuracy"])  # fmt: skip
        lines += speed_table(result, batches)
        lines += size_table(result)
        for recipe, why in result["skipped_recipes"].items():
            lines.append(f"skipped recipe {recipe}: {' '.join(why.split())}")
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> str:
    models, recipes, batches = check_arguments(args)
    torch.set_num_threads(args.threads)
    quiet_tools()
    meta = {"versions": versions(), "threads": args.threads, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": cpu_name(), "arguments": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    step(header(meta))
    results = [bench_model(name, recipes, batches, args) for name in models]
    if args.json is not None:
        from utils.run_dir import write_json_atomic

        write_json_atomic(args.json, {"meta": meta, "models": results})
    text = report(meta, results, batches)
    return text + (f"\n\nJSON: {args.json}" if args.json is not None else "")


def main() -> int:
    args = build_parser().parse_args()
    return run_script(lambda: bench(args), (UserError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
