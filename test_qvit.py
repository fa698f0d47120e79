#!/usr/bin/env python
"""Quantize a timm ViT/DeiT the FQ-ViT way, calibrate it, and evaluate FP32 against INT8.

    python test_qvit.py --model deit_tiny_patch16_224 --checkpoint W.pth --data /path/to/imagenet-mini
    python test_qvit.py --demo        # offline: random tiny ViT and generated images
    torchrun --nproc-per-node 2 test_qvit.py --device cuda ...   # data parallel, one GPU per process

Under torchrun every process calibrates and evaluates its own batches (statistics and results are
combined; the scales equal a single process's), and only rank 0 prints and writes the run folder.

Each run writes a new folder ``<log-dir>/<timestamp>/`` (``qvit_summary.json``, ``qvit_results.txt``
and, with ``--save-calibrated``, ``calibrated.pt``); the last line printed is that folder's path.
Bad input ends with one ``error: ...`` line and exit code 2, leaving no folder behind.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from quant_config import DEFAULT_RECIPE, ConfigError, QuantRecipe, available_recipes, load_recipe, resolve_recipe_path
from utils.errors import ArgumentParser, UserError, run_script

if TYPE_CHECKING:
    from utils.distributed import Dist

DEFAULT_MODEL = "vit_base_patch16_224"
DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_CLASSES, DEMO_CALIB_PER_CLASS, DEMO_VAL_PER_CLASS = 10, 10, 20


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="FQ-ViT post-training quantization of a timm ViT/DeiT: calibrate, then evaluate FP32 vs INT8.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"timm vit_*/deit_* model name (default {DEFAULT_MODEL}; {DEMO_MODEL} with --demo)")
    g.add_argument("--checkpoint", default=None, help="local state dict (plain or under 'model'/'state_dict') instead of timm's pretrained download")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="ImageNet-layout root holding train/<wnid>/*.JPEG (calibration) and val/<wnid>/*.JPEG (evaluation)")
    g.add_argument("--calib-dir", default=None, help="calibration split folder (overrides DATA/train)")
    g.add_argument("--val-dir", default=None, help="evaluation split folder (overrides DATA/val)")
    g.add_argument("--calib-size", type=int, default=None, help="calibration images drawn from the calibration split (default 1000; all with --demo)")
    g.add_argument("--seed", type=int, default=0, help="seed of the calibration subset draw")
    g.add_argument("--batch-size", type=int, default=32, help="batch size for calibration and evaluation")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loading worker processes")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only N images, evenly spread over the evaluation split (quick runs)")
    g = p.add_argument_group("quantization")
    g.add_argument("--config", default=None, help=f"recipe YAML path or shipped name ({', '.join(available_recipes())}; default {DEFAULT_RECIPE})")
    g.add_argument("--observer", default=None, help="observer of the activation and layernorm_input kinds: minmax, percentile, omse, kl (weights and the attention map keep the recipe's)")
    g.add_argument("--calibration-mode", default=None, help="layer_wise or channel_wise for the activation kind")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any recipe value, e.g. --set attention.bit_type.bits=4 (repeatable)")
    g.add_argument("--save-calibrated", nargs="?", const="", default=None, metavar="PATH", help="save the calibrated quantizer state (default RUN/calibrated.pt)")
    g.add_argument("--load-calibrated", default=None, metavar="PATH", help="skip calibration: load a file written by --save-calibrated (uses its recipe)")
    g = p.add_argument_group("profiling (per-point statistics, written with every run)")
    g.add_argument("--profile-samples", type=int, default=64, help="evaluation images (a fixed, evenly spread subset) the profiler runs on")
    g.add_argument("--no-profile", action="store_true", help="skip the profiler")
    g.add_argument("--profile", choices=("accumulated", "isolated"), default="accumulated",
                   help="accumulated: quantized model vs FP32 model; isolated: also each point alone (one extra run per point)")
    g.add_argument("--hist", default="all", metavar="all|none|worst:K", help="which points get a <name>_hist.png")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: cuda means cuda:LOCAL_RANK)")
    g.add_argument("--amp", action="store_true", help="run the FP32 baseline under CUDA autocast (float16); the quantized model is unaffected")
    g.add_argument("--log-dir", default="log/qvit", help="run folders are created under this directory")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--demo", action="store_true", help="offline demo: random tiny ViT and generated images (its accuracy means nothing)")
    return p


def recipe_overrides(args: argparse.Namespace, base: QuantRecipe) -> dict[str, Any]:
    """Dotted-key overrides from --observer, --calibration-mode and --set."""
    overrides: dict[str, Any] = {}
    if args.observer is not None:
        # The attention map keeps its own observer: its rare peaks near 1 carry the most information, and
        # clipping them (KL does) cost 7 points of DeiT-tiny top-1 here. --set attention.observer=... still works.
        for kind in ("activation", "layernorm_input"):
            if getattr(base, kind) is not None:
                overrides[f"{kind}.observer"] = args.observer
        if not overrides:
            raise UserError(f"--observer: recipe {base.name} quantizes no activations")
    if args.calibration_mode is not None:
        overrides["activation.calibration_mode"] = args.calibration_mode
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. activation.observer=kl")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: cannot parse the value") from None
    return overrides


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_arguments(args: argparse.Namespace) -> None:
    if args.calib_size is None:
        args.calib_size = DEMO_CLASSES * DEMO_CALIB_PER_CLASS if args.demo else 1000
    if not re.fullmatch(r"all|none|worst:[1-9]\d*", args.hist):
        raise UserError(f"--hist {args.hist!r}: expected all, none or worst:K (K >= 1)")
    for flag, value, low in (
        ("--calib-size", args.calib_size, 1),
        ("--batch-size", args.batch_size, 1),
        ("--workers", args.workers, 0),
        ("--profile-samples", args.profile_samples, 1),
        ("--limit", args.limit if args.limit is not None else 1, 1),
    ):
        if value < low:
            raise UserError(f"{flag} must be at least {low}, got {value}")
    if args.demo and any(v is not None for v in (args.data, args.calib_dir, args.val_dir, args.checkpoint, args.load_calibrated)):
        raise UserError("--demo makes its own model and images; drop --data/--calib-dir/--val-dir/--checkpoint/--load-calibrated")
    if args.load_calibrated and (args.config or args.observer or args.calibration_mode or args.set):
        raise UserError("--load-calibrated uses the recipe stored in the file; drop --config/--observer/--calibration-mode/--set")
    if args.load_calibrated and args.save_calibrated is not None:
        raise UserError("--save-calibrated with --load-calibrated would only copy the loaded file; drop one")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise UserError(f"checkpoint {args.checkpoint}: no such file")
    if args.save_calibrated and Path(args.save_calibrated).exists():
        raise UserError(f"--save-calibrated {args.save_calibrated}: file exists; choose a new path")


def split_dirs(args: argparse.Namespace) -> tuple[Path | None, Path]:
    calib = Path(args.calib_dir) if args.calib_dir else (Path(args.data) / "train" if args.data else None)
    val = Path(args.val_dir) if args.val_dir else (Path(args.data) / "val" if args.data else None)
    if val is None or (calib is None and not args.load_calibrated):
        raise UserError("no data: pass --data DIR (with train/ and val/), or --calib-dir and --val-dir; or try --demo")
    if args.data and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data}: no such directory")
    return calib, val


def run(args: argparse.Namespace) -> Path | None:
    check_arguments(args)
    device = resolve_device(args.device)
    if args.amp and device.type != "cuda":
        raise UserError("--amp needs a CUDA device (autocast float16 of the FP32 baseline)")
    from utils.distributed import process_group

    with process_group(device) as (where, device):
        return run_process(args, device, where)


def run_process(args: argparse.Namespace, device, where: Dist) -> Path | None:
    """One process's run (the only one without torchrun); rank 0 returns the run folder, the others None."""
    # Heavy imports only once the cheap checks passed.
    import torch
    from timm.data import create_transform, resolve_data_config

    from models.quant_vit import QVit, UnsupportedModelError
    from utils.checkpoint import (
        check_model_name,
        create_model,
        load_calibrated,
        load_checkpoint,
        read_calibrated,
        save_calibrated,
        weights_sha256,
    )
    from utils.data import calibration_subset, evenly_spaced, make_loader, scan_split
    from utils.demo import make_imagenet_folder
    from utils.distributed import check_same_everywhere, gather_calibration, gather_eval, shard_batches
    from utils.engine import calibrate, evaluate
    from utils.plots import select_histogram_points, write_point_histograms
    from utils.profiler import NoImagesError, run_profile
    from utils.report import profile_summary, results_table, versions
    from utils.run_dir import RunDir, write_json_atomic, write_text_atomic

    def say(*parts, **kwargs) -> None:  # one voice: rank 0's
        if where.main:
            print(*parts, **kwargs)

    record = None
    if args.load_calibrated:
        record, recipe = read_calibrated(args.load_calibrated)
        model_name = args.model or record["model"]
        if model_name != record["model"]:
            raise UserError(f"--load-calibrated {args.load_calibrated} was made for {record['model']}, not {model_name}")
        recipe_source = str(args.load_calibrated)
    else:
        recipe_path = resolve_recipe_path(args.config or DEFAULT_RECIPE)
        recipe = load_recipe(recipe_path)
        overrides = recipe_overrides(args, recipe)
        if overrides:
            recipe = recipe.with_overrides(overrides, where=f"{recipe_path} + command line")
        model_name = args.model or (DEMO_MODEL if args.demo else DEFAULT_MODEL)
        recipe_source = str(recipe_path)
    check_model_name(model_name)

    with contextlib.ExitStack() as stack:
        if args.demo:
            say("DEMO: a randomly initialised ViT on generated images; its accuracy numbers mean nothing.")
            # Every process makes the same images from the same seed, in a folder of its own.
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qvit-demo-")))
            calib_dir = make_imagenet_folder(root / "train", DEMO_CLASSES, DEMO_CALIB_PER_CLASS, seed=args.seed)
            val_dir = make_imagenet_folder(root / "val", DEMO_CLASSES, DEMO_VAL_PER_CLASS, seed=args.seed + 1)
        else:
            calib_dir, val_dir = split_dirs(args)
        val_samples = scan_split(val_dir)
        if args.limit is not None and args.limit < len(val_samples):
            val_samples = evenly_spaced(val_samples, args.limit)
        calib_samples = None if record else scan_split(calib_dir)

        weights = "checkpoint" if args.checkpoint else ("random init (demo)" if args.demo else "timm pretrained")
        processes = f", {where.world} processes" if where.active else ""
        say(f"Model {model_name} ({weights}), recipe {recipe.name}, device {device}{processes}")
        if args.demo:
            torch.manual_seed(args.seed)  # the same random weights in every run and every process
        model = create_model(model_name, pretrained=not args.checkpoint and not args.demo)
        checkpoint_sha = load_checkpoint(model, args.checkpoint, model_name) if args.checkpoint else None
        fingerprint = weights_sha256(model)
        check_same_everywhere(fingerprint, "weights", where)
        transform = create_transform(**resolve_data_config(model=model))
        try:
            qvit = QVit(model, recipe).to(device).eval()
        except UnsupportedModelError as exc:
            raise UserError(f"{model_name}: {exc}") from None
        loader_args = dict(transform=transform, batch_size=args.batch_size, workers=args.workers, pin_memory=device.type == "cuda")
        progress = not args.no_progress and where.main

        def share(samples: list) -> list:  # this process's whole batches
            return shard_batches(samples, args.batch_size, where.rank, where.world) if where.active else samples

        with RunDir(args.log_dir) if where.main else contextlib.nullcontext() as run_dir:
            calib_unreadable, calib_images, calib_seconds = 0, 0, 0.0
            if record is not None:
                load_calibrated(qvit, record, args.load_calibrated, fingerprint)
                say(f"Loaded calibrated quantizers from {args.load_calibrated}")
            else:
                if args.calib_size > len(calib_samples):
                    say(f"note: --calib-size {args.calib_size} exceeds the {len(calib_samples)} images in {calib_dir}; using all of them")
                subset = calibration_subset(calib_samples, args.calib_size, args.seed)
                say(f"Calibrating on {len(subset)} images from {calib_dir}")
                cal = gather_calibration(calibrate(qvit, make_loader(share(subset), **loader_args), device, progress), where)
                calib_unreadable, calib_images, calib_seconds = cal.unreadable, cal.images, cal.seconds
                if calib_unreadable:
                    say(f"note: skipped {calib_unreadable} unreadable calibration image(s)")
                if cal.uncalibrated:
                    say(f"note: {len(cal.uncalibrated)} quantization point(s) saw no data and stay uncalibrated")
                if args.save_calibrated is not None and where.main:
                    save_calibrated(qvit, run_dir.path / "calibrated.pt", model_name, fingerprint, checkpoint_sha)

            say(f"Evaluating FP32 and INT8 on {len(val_samples)} images from {val_dir}")
            ev = gather_eval(evaluate(qvit, make_loader(share(val_samples), **loader_args), device, progress, amp=args.amp), where)
            if not where.main:
                return None
            if ev is None:
                raise UserError(f"{val_dir}: no readable evaluation image")
            if ev.unreadable:
                print(f"note: skipped {ev.unreadable} unreadable evaluation image(s)")
            table = results_table(ev.fp32, ev.int8, ev.agreement_top1, ev.logit_cosine)
            print(table)
            header = f"{model_name} | recipe {recipe.name} | {calib_images} calibration images | {dt.datetime.now():%Y-%m-%d %H:%M}\n"
            if args.demo:
                header = "DEMO (random weights, generated images): these numbers mean nothing.\n" + header
            write_text_atomic(run_dir.path / "qvit_results.txt", header + table + "\n")
            summary = {
                "model": model_name,
                "weights": weights,
                "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                "checkpoint_sha256": checkpoint_sha,
                "weights_sha256": fingerprint,
                "config": recipe.to_dict(),
                "config_source": recipe_source,
                "calib_samples": calib_images,
                "calibration": {
                    "split": str(calib_dir) if calib_dir else None,
                    "requested": args.calib_size,
                    "seed": args.seed,
                    "unreadable": calib_unreadable,
                    "loaded_from": str(args.load_calibrated) if record is not None else None,
                },
                "evaluation": {"split": str(val_dir), "unreadable": ev.unreadable, "classes": int(len(set(ev.labels.tolist())))},
                "fp32": ev.fp32.to_dict(),
                "int8": ev.int8.to_dict(),
                "scale_search_ratios": qvit.searched_ratios,
                "agreement_top1": ev.agreement_top1,
                "logit_cosine_mean": ev.logit_cosine,
                "timings_s": {
                    "calibration": calib_seconds,
                    "eval_fp32": ev.seconds_fp32,
                    "eval_int8": ev.seconds_int8,
                    "eval_wall": ev.seconds_wall,
                },
                "eval_images_per_s": ev.samples / ev.seconds_wall,
                "peak_memory_mb": peak_memory_mb(device),
                "device": str(device),
                "processes": where.world,
                "amp_fp32": bool(args.amp),
                "batch_size": args.batch_size,
                "demo": bool(args.demo),
                "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": [Path(sys.argv[0]).name] + sys.argv[1:],
                "versions": versions(),
            }
            if not args.no_profile:
                subset = evenly_spaced(val_samples, args.profile_samples)
                views = "accumulated and isolated views" if args.profile == "isolated" else "accumulated view"
                print(f"Profiling {len(subset)} evaluation images ({views})")
                loader = make_loader(subset, **loader_args)
                try:
                    result = run_profile(qvit, loader, device, isolated=args.profile == "isolated", progress=progress)
                except NoImagesError as exc:  # the evaluation's numbers still stand
                    print(f"warning: profile skipped: {exc}", file=sys.stderr)
                else:
                    result.table.to_csv(run_dir.path / "qvit_statistics.csv", index=False)
                    write_point_histograms(result, run_dir.path, select_histogram_points(result, args.hist))
                    summary["profile"] = result.totals
                    print(profile_summary(result.totals))
            write_json_atomic(run_dir.path / "qvit_summary.json", summary)

    if args.save_calibrated:  # an explicit path gets a copy once the run folder is complete
        target = Path(args.save_calibrated)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        shutil.copyfile(run_dir.final / "calibrated.pt", tmp)
        os.replace(tmp, target)
        print(f"Saved calibrated quantizers to {target}")
    return run_dir.final


def peak_memory_mb(device: "torch.device") -> dict[str, float | None]:
    """This process's peak resident memory, its data loader workers' (the largest one), and the GPU's peak allocation."""
    import resource

    import torch

    kib = 1024.0  # Linux reports ru_maxrss in KiB
    return {
        "host_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kib,
        "host_loader_worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / kib,
        "device": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_script(lambda: run(args), (UserError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
