#!/usr/bin/env python
"""Held-out accuracy of deployed INT8, ours against NNCF: K-fold cross-validation of the calibration images.

    pip install -r requirements-bench.txt                       # nncf: the benchmarks only
    python -m bench.crossval_deploy                             # DeiT-tiny, cpu_int8, 5 folds of the 1000 train images
    python -m bench.crossval_deploy --recipes cpu_int8,trt_int8_search --folds 10 --json crossval.json
    python -m bench.crossval_deploy --images 40 --folds 2       # a quick look

Why: the val images are a report that nothing is tuned against, and recipe values are chosen on a
held-out part of the calibration images (bench/holdout_split.py: 800 calibrate, 200 judge). Judged
on 200 images, an agreement of 0.96 is known to about +-0.014 (one standard error), and the gap to a
peer cannot be told from noise. Cross-validation judges every calibration image once, by systems
calibrated on the other K-1 folds - ours and NNCF's on the same images - so the comparison is made on
all of them, none of which any system calibrated on.

Image i of the sorted ``<wnid>/<file>`` list of ``--calib-dir`` (or of its ``--images``) is in fold i % K; with K = 5 and every image the last
fold is bench/holdout_split.py's held/, the images cpu_int8's values were chosen on (its row is a
selection score; the other folds' are not). For each fold, on the other folds' images (in one seeded
random order, so that the passes on the first N images - scale search, bias correction - see every class):

* NNCF's PTQ of the one FP32 ONNX, SmoothQuant on and off (``subset_size`` = all those images), in
  OpenVINO - exactly as bench/bench_deploy.py builds it;
* each of ``--recipes`` calibrated by utils.engine.calibrate, exported and run in ONNX Runtime and in
  OpenVINO in the forms convert_tensorrt.py ships, and its PyTorch fake-quant model;

then the fold's images through each. Pooled over the folds: top-1 agreement and mean logit cosine
with the PyTorch FP32 logits, top-1 against the labels, and for each INT8 system against NNCF's most
faithful variant the images whose FP32 class only one of the two changes, with the exact McNemar
p-value; per fold: agreement and cosine. ``--json PATH`` writes every number. Bad input ends with one
``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if not __package__:  # run as a file: the library imports from the repository root only as a package
    sys.exit("error: run it from the repository root as: python -m bench.crossval_deploy ...")

import numpy as np
import torch

from bench.common import SHARED, build_qvit
from bench.deploy_systems import (ACCURACY_MODEL, TITLES, accuracy_rows, accuracy_table, check_tools, cpu_name, data_transform,
                                  export_fp32, header, load_images, load_systems, nncf_variants, our_int8, parse_list, quiet_tools, step,
                                  torch_logits, versions)  # fmt: skip
from quant_config import DEFAULT_RECIPE, ConfigError, resolve_recipe_path
from utils.errors import ArgumentParser, UserError, run_script

if TYPE_CHECKING:
    from models.quant_vit import QVit


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=ACCURACY_MODEL, help=f"timm model (default {ACCURACY_MODEL})")
    p.add_argument("--checkpoint", type=Path, default=SHARED / "weights" / "deit_tiny_patch16_224.pth", help="its trained weights")
    p.add_argument("--recipes", default="cpu_int8", help="our recipes, comma-separated: shipped names or YAML files (default cpu_int8)")
    p.add_argument("--calib-dir", type=Path, default=SHARED / "data" / "imagenet-mini" / "train", help="ImageNet-layout calibration split")
    p.add_argument("--images", type=int, default=None, help="use this many images of --calib-dir, evenly spread (default all)")
    p.add_argument("--folds", type=int, default=5, help="K: folds, each judged by systems calibrated on the others (default 5)")
    p.add_argument("--threads", type=int, default=2, help="threads of PyTorch and of every runtime (default 2)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every number to PATH (JSON)")
    return p


@dataclass(frozen=True)
class Fold:
    """One fold: the images it judges, and the others in the seeded order the systems calibrate on."""

    index: int
    held: list[tuple[str, int]]
    calibration: list[tuple[str, int]]


def make_folds(samples: list[tuple[str, int]], folds: int, seed: int = 0) -> list[Fold]:
    """Sample i goes to fold i % ``folds``; each fold's calibration images are all the others, shuffled by
    ``seed`` (the calibration passes that take the first N images then see a random subset of classes)."""
    result = []
    for k in range(folds):
        rest = [s for i, s in enumerate(samples) if i % folds != k]
        order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
        result.append(Fold(k, [s for i, s in enumerate(samples) if i % folds == k], [rest[i] for i in order]))
    return result


def check_arguments(args: argparse.Namespace) -> tuple[list[str], list[Fold]]:
    """Everything checked before anything slow starts; returns the recipes and the folds."""
    from utils.checkpoint import check_model_name
    from utils.data import evenly_spaced, scan_split

    for flag, value, least in (("--folds", args.folds, 2), ("--threads", args.threads, 1), ("--workers", args.workers, 0)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.images is not None and args.images < args.folds:
        raise UserError(f"--images {args.images}: fewer images than --folds {args.folds}")
    recipes = parse_list("--recipes", args.recipes)
    for recipe in recipes:
        resolve_recipe_path(recipe)  # a shipped name or a YAML file; the error lists the shipped ones
    if len({Path(r).stem for r in recipes}) < len(recipes):
        raise UserError(f"--recipes {args.recipes!r}: two recipes with the same file name")
    if not args.checkpoint.is_file():
        raise UserError(f"--checkpoint {args.checkpoint}: no such file (cross-validated accuracy needs trained weights)")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: no such directory {args.json.parent}")
    check_model_name(args.model)
    samples = scan_split(args.calib_dir)
    if args.images is not None:
        samples = evenly_spaced(samples, args.images)
    if len(samples) < args.folds:
        raise UserError(f"--calib-dir {args.calib_dir}: {len(samples)} images, fewer than --folds {args.folds}")
    check_tools()
    return recipes, make_folds(samples, args.folds)


# -- one fold ---------------------------------------------------------------------------------------


def run_fold(fold: Fold, recipes: list[str], reference: QVit, fp32_onnx: Path, transform: Callable, args: argparse.Namespace,
             folder: Path) -> dict[str, Any]:  # fmt: skip
    """Every system calibrated on ``fold.calibration`` and run on ``fold.held``: their logits (by system
    and runtime), the FP32 logits, the labels and the calibration seconds."""
    step(f"fold {fold.index + 1}/{args.folds}: loading {len(fold.calibration)} calibration and {len(fold.held)} held-out images")
    calib, _, bad_calib = load_images(fold.calibration, transform, args.workers)
    held, labels, bad_held = load_images(fold.held, transform, args.workers)
    if bad_calib or bad_held:
        step(f"  {bad_calib} calibration and {bad_held} held-out image(s) unreadable, skipped")
    n = sum(len(x) for x in calib)
    outputs: dict[tuple[str, str], np.ndarray] = {}
    seconds: dict[str, float] = {}
    entries: list[tuple[str, str, Path]] = []
    for recipe in recipes:  # ours first: a recipe the CPU runtimes cannot run as calibrated stops the run early
        step(f"  {recipe}: calibrate on {n} images, export, fake-quant logits")
        path, seconds[recipe], outputs[f"{recipe} (fake-quant)", "torch"] = our_int8(args.model, recipe, args.checkpoint, calib, folder, held)
        entries.append((recipe, "ours", path))
    for name, xml, nncf_seconds in nncf_variants(fp32_onnx, calib, folder, "  "):
        seconds[name] = nncf_seconds
        entries.append((name, "nncf", xml))
    for system in load_systems(entries, args.threads):
        step(f"  logits: {system.key}")
        outputs[system.name, system.runtime] = system.logits(held)
    return {"fold": fold.index, "calibration_images": n, "held_images": len(labels), "calibration_seconds": seconds,
            "outputs": outputs, "fp32": torch_logits(reference, held), "labels": labels}  # fmt: skip


# -- pooling ----------------------------------------------------------------------------------------


def pool(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """The folds' logits concatenated: accuracy rows over every image (and the McNemar column against
    NNCF's best), and agreement / cosine per fold."""
    from utils.metrics import logit_cosine, top1_agreement

    keys = list(folds[0]["outputs"])
    fp32 = np.concatenate([f["fp32"] for f in folds])
    labels = np.concatenate([f["labels"] for f in folds])
    rows = accuracy_rows([(name, runtime, np.concatenate([f["outputs"][name, runtime] for f in folds])) for name, runtime in keys], fp32, labels)
    for row, key in zip(rows[1:], keys):
        row["per_fold"] = [{"fold": f["fold"], "top1_agreement_with_fp32": top1_agreement(f["outputs"][key], f["fp32"]),
                            "logit_cosine_with_fp32": logit_cosine(f["outputs"][key], f["fp32"])} for f in folds]  # fmt: skip
    return {"accuracy": rows, "images": len(labels)}


def per_fold_table(rows: list[dict[str, Any]]) -> list[str]:
    folds = [f["fold"] for f in rows[-1]["per_fold"]]
    lines = ["\nPer fold: top-1 agreement / logit cosine with FP32",
             "| system | runtime | " + " | ".join(f"fold {k + 1}" for k in folds) + " |", "|---|---|" + "---:|" * len(folds)]  # fmt: skip
    for r in rows:
        if "per_fold" in r:
            cells = [f"{f['top1_agreement_with_fp32']:.3f} / {f['logit_cosine_with_fp32']:.4f}" for f in r["per_fold"]]
            lines.append(f"| {r['system']} | {TITLES[r['runtime']]} | " + " | ".join(cells) + " |")
    return lines


def report(meta: dict[str, Any], result: dict[str, Any], folds: list[dict[str, Any]]) -> str:
    calib = sorted({f["calibration_images"] for f in folds})
    title = (f"\nHeld-out accuracy: {meta['model']}, {len(folds)}-fold cross-validation of {result['images']} calibration images "
             f"(each judged by systems calibrated on the other folds' {'-'.join(map(str, calib))} images), against the PyTorch FP32 logits")  # fmt: skip
    lines = ["", header(meta), *accuracy_table(title, result["accuracy"]), *per_fold_table(result["accuracy"])]
    seconds = {name: np.median([f["calibration_seconds"][name] for f in folds]) for name in folds[0]["calibration_seconds"]}
    lines.append("\nCalibration seconds (median over folds): " + "; ".join(f"{name} {s:.0f}" for name, s in seconds.items()))
    return "\n".join(lines)


def crossval(args: argparse.Namespace) -> str:
    recipes, folds = check_arguments(args)
    torch.set_num_threads(args.threads)
    quiet_tools()
    meta = {"versions": versions(), "threads": args.threads, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cpu": cpu_name(), "model": args.model, "arguments": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    step(header(meta))
    transform = data_transform(args.model)
    # Never calibrated, only run in FP32 mode (= timm), so the recipe it is built with does not matter.
    reference = build_qvit(args.model, DEFAULT_RECIPE, args.checkpoint)
    results = []
    with tempfile.TemporaryDirectory(prefix="crossval_deploy-") as tmp:
        step(f"{args.model}: FP32 ONNX export (QVit in FP32 mode = timm), simplify")
        fp32_onnx = export_fp32(reference, Path(tmp))
        for fold in folds:
            folder = Path(tmp) / f"fold{fold.index}"
            folder.mkdir()
            results.append(run_fold(fold, recipes, reference, fp32_onnx, transform, args, folder))
    pooled = pool(results)
    if args.json is not None:
        from utils.run_dir import write_json_atomic

        per_fold = [{k: v for k, v in f.items() if k not in ("outputs", "fp32", "labels")} for f in results]
        write_json_atomic(args.json, {"meta": meta, "folds": per_fold, **pooled})
    return report(meta, pooled, results) + (f"\n\nJSON: {args.json}" if args.json is not None else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_script(lambda: crossval(args), (UserError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
