#!/usr/bin/env python
"""Quantize a timm ViT/DeiT the FQ-ViT way, calibrate it, and evaluate FP32 against INT8.

    python test_qvit.py --model deit_tiny_patch16_224 --checkpoint W.pth --data /path/to/imagenet-mini
    python test_qvit.py --demo        # offline: random tiny ViT and generated images
    torchrun --nproc-per-node 2 test_qvit.py --device cuda ...   # data parallel, one GPU per process

Under torchrun every process calibrates and evaluates its own batches (statistics and results are
combined; the scales equal a single process's), and only rank 0 prints and writes the run folder.

Each run writes a new folder ``<log-dir>/<timestamp>/`` (``qvit_summary.json``, ``qvit_results.txt``
and, with ``--save-calibrated``, ``calibrated.pt``); the last three lines printed say what the folder
holds, where the calibrated quantizers were saved, and ``Run folder: PATH``.
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from quant_config import DEFAULT_RECIPE, ConfigError, QuantRecipe, available_recipes, load_recipe, resolve_recipe_path
from utils.errors import ArgumentParser, UserError, run_script
from utils.run_dir import RunDir, atomic_path, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    import torch

    from utils.distributed import Dist

DEFAULT_MODEL = "vit_base_patch16_224"
DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_CLASSES, DEMO_CALIB_PER_CLASS, DEMO_VAL_PER_CLASS = 10, 10, 10


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="FQ-ViT post-training quantization of a timm ViT/DeiT/Swin: calibrate, then evaluate FP32 vs INT8.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help=f"timm model name (default {DEFAULT_MODEL}; {DEMO_MODEL} with --demo): any whose modules with "
                   "weights QVit can quantize (ViT/DeiT/DeiT-III/registers, Swin v1, ...); --list-models shows which")
    g.add_argument("--list-models", nargs="?", const="vit_*,deit*,swin_*", default=None, metavar="GLOBS",
                   help="print the timm models matching GLOBS (comma-separated; default vit_*,deit*,swin_*) that QVit accepts, and exit")
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
    g.add_argument("--integer-only", action="store_true",
                   help="evaluate and profile the integer-only program (models/integer) instead of the fake-quant model; "
                        "the recipe must quantize every point with integer softmax and GELU (fqvit_w8a8_att8, fqvit_w8a8_att4, integer_w8a8)")
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
    if args.integer_only and args.profile == "isolated":
        raise UserError("--profile isolated quantizes one point of the fake-quant model at a time; with --integer-only the profile is the integer program's")
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


def list_models(globs: str) -> None:
    """The accepted timm model names, one per line (each checked on the meta device: nothing is downloaded)."""
    from utils.checkpoint import supported_models

    names = supported_models([g.strip() for g in globs.split(",") if g.strip()])
    if not names:
        raise UserError(f"--list-models {globs!r}: no timm model matching it is one QVit can quantize")
    print("\n".join(names))


def run(args: argparse.Namespace) -> Path | None:
    if args.list_models is not None:
        return list_models(args.list_models)
    check_arguments(args)
    from utils.device import resolve_device

    device = resolve_device(args.device)
    if args.amp and device.type != "cuda":
        raise UserError("--amp needs a CUDA device (autocast float16 of the FP32 baseline)")
    from utils.distributed import process_group

    with process_group(device) as (where, device):
        return run_process(args, device, where)


@dataclass
class Job:
    """What one run works on, settled before any heavy work: recipe, model name, image folders, and the
    calibrated file's record when quantizers are loaded instead of calibrated."""

    recipe: QuantRecipe
    recipe_source: str
    model_name: str
    record: dict | None = None
    calib_dir: Path | None = None
    val_dir: Path | None = None
    val_samples: list = field(default_factory=list)
    calib_samples: list | None = None


@dataclass
class Calibration:
    """Calibration's facts for the summary (zeros when quantizers were loaded from a file)."""

    images: int = 0
    unreadable: int = 0
    seconds: float = 0.0
    passes: dict[str, float] = field(default_factory=dict)  # each calibration pass's seconds


def run_process(args: argparse.Namespace, device, where: Dist) -> Path | None:
    """One process's run (the only one without torchrun); rank 0 returns the run folder, the others None."""
    say = print if where.main else (lambda *parts, **kwargs: None)  # one voice: rank 0's
    job = choose_recipe_and_model(args)
    with contextlib.ExitStack() as stack:
        find_images(args, job, stack, say)
        qvit, model_facts, loader_args = build_qvit(args, job, device, where, say)
        with RunDir(args.log_dir) if where.main else contextlib.nullcontext() as run_dir:
            calibration = calibrate_or_load(args, job, qvit, model_facts, loader_args, device, where, run_dir, say)
            program = integer_program(qvit, say) if args.integer_only else None
            say(f"Evaluating FP32 and {'the integer program' if program else 'INT8'} on {len(job.val_samples)} images from {job.val_dir}")
            ev = evaluate_step(args, job, qvit, loader_args, device, where, program)
            if ev is None:  # not rank 0
                return None
            write_results(args, job, ev, calibration, run_dir.path)
            summary = run_summary(args, job, qvit, model_facts, calibration, ev, device, where)
            if program is not None:
                summary["integer_program"] = program_facts(program)
            totals = None if args.no_profile else profile_step(args, job, qvit, loader_args, device, where, run_dir.path, program)
            if totals is not None:
                summary["profile"] = totals
            write_json_atomic(run_dir.path / "qvit_summary.json", summary)
    say(folder_contents(run_dir.final))
    if args.save_calibrated:
        copy_calibrated(run_dir.final / "calibrated.pt", Path(args.save_calibrated))
    elif args.save_calibrated == "":  # --save-calibrated without a path: the folder's copy is the one
        say(f"Saved calibrated quantizers: {run_dir.final / 'calibrated.pt'}")
    return run_dir.final


def folder_contents(folder: Path) -> str:
    """One line naming what the run folder holds (the histogram images counted, not listed)."""
    names = sorted(p.name for p in folder.iterdir())
    histograms = [n for n in names if n.endswith("_hist.png")]
    rest = [n for n in names if not n.endswith("_hist.png")]
    return "In the run folder: " + ", ".join(rest) + (f" and {len(histograms)} histogram images (*_hist.png)" if histograms else "")


def choose_recipe_and_model(args: argparse.Namespace) -> Job:
    """The recipe (the calibrated file's, or --config with --observer/--set applied) and the model name."""
    from utils.checkpoint import check_model_name, read_calibrated

    if args.load_calibrated:
        record, recipe = read_calibrated(args.load_calibrated)
        model_name = args.model or record["model"]
        if model_name != record["model"]:
            raise UserError(f"--load-calibrated {args.load_calibrated} was made for {record['model']}, not {model_name}")
        job = Job(recipe, str(args.load_calibrated), model_name, record=record)
    else:
        recipe_path = resolve_recipe_path(args.config or DEFAULT_RECIPE)
        recipe = load_recipe(recipe_path)
        overrides = recipe_overrides(args, recipe)
        if overrides:
            recipe = recipe.with_overrides(overrides, where=f"{recipe_path} + command line")
        job = Job(recipe, str(recipe_path), args.model or (DEMO_MODEL if args.demo else DEFAULT_MODEL))
    check_model_name(job.model_name)
    if args.integer_only:
        refusal = job.recipe.integer_refusal()
        if refusal is not None:
            raise UserError(f"--integer-only: {refusal}")
    return job


def find_images(args: argparse.Namespace, job: Job, stack: contextlib.ExitStack, say: Callable) -> None:
    """The calibration and evaluation folders (the demo's generated in a temporary folder ``stack`` removes) and their images."""
    from utils.data import evenly_spaced, scan_split
    from utils.demo import make_imagenet_folder

    if args.demo:
        say("DEMO: a randomly initialised ViT on generated images; its accuracy numbers mean nothing.")
        # Every process makes the same images from the same seed, in a folder of its own.
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qvit-demo-")))
        job.calib_dir = make_imagenet_folder(root / "train", DEMO_CLASSES, DEMO_CALIB_PER_CLASS, seed=args.seed)
        job.val_dir = make_imagenet_folder(root / "val", DEMO_CLASSES, DEMO_VAL_PER_CLASS, seed=args.seed + 1)
    else:
        job.calib_dir, job.val_dir = split_dirs(args)
    job.val_samples = scan_split(job.val_dir)
    if args.limit is not None and args.limit < len(job.val_samples):
        job.val_samples = evenly_spaced(job.val_samples, args.limit)
    job.calib_samples = None if job.record else scan_split(job.calib_dir)


def build_qvit(args: argparse.Namespace, job: Job, device, where: Dist, say: Callable) -> tuple[Any, dict, dict]:
    """The model with its weights (the same in every process), wrapped in a QVit on ``device``; what the
    summary says about the weights; the data loaders' arguments."""
    import torch
    from timm.data import create_transform, resolve_data_config

    from models.quant_vit import QVit, UnsupportedModelError
    from utils.checkpoint import create_model, load_checkpoint, weights_sha256
    from utils.distributed import check_same_everywhere

    weights = "checkpoint" if args.checkpoint else ("random init (demo)" if args.demo else "timm pretrained")
    processes = f", {where.world} processes" if where.active else ""
    say(f"Model {job.model_name} ({weights}), recipe {job.recipe.name}, device {device}{processes}")
    if args.demo:
        torch.manual_seed(args.seed)  # the same random weights in every run and every process
    model = create_model(job.model_name, pretrained=not args.checkpoint and not args.demo)
    checkpoint_sha = load_checkpoint(model, args.checkpoint, job.model_name) if args.checkpoint else None
    fingerprint = weights_sha256(model)
    check_same_everywhere(fingerprint, "weights", where)
    transform = create_transform(**resolve_data_config(model=model))
    try:
        qvit = QVit(model, job.recipe).to(device).eval()
    except UnsupportedModelError as exc:
        raise UserError(f"{job.model_name}: {exc}") from None
    loader_args = dict(transform=transform, batch_size=args.batch_size, workers=args.workers, pin_memory=device.type == "cuda")
    return qvit, {"weights": weights, "checkpoint_sha256": checkpoint_sha, "weights_sha256": fingerprint}, loader_args


def shard(args: argparse.Namespace, samples: list, where: Dist) -> list:
    """This process's whole batches of ``samples`` (all of them without torchrun)."""
    from utils.distributed import shard_batches

    return shard_batches(samples, args.batch_size, where.rank, where.world) if where.active else samples


def calibrate_or_load(args: argparse.Namespace, job: Job, qvit, model_facts: dict, loader_args: dict, device, where: Dist, run_dir, say: Callable) -> Calibration:
    """Load the quantizers of --load-calibrated, or calibrate on --calib-size images (saved with --save-calibrated)."""
    from utils.checkpoint import load_calibrated, save_calibrated
    from utils.data import calibration_subset, make_loader
    from utils.distributed import gather_calibration
    from utils.engine import calibrate

    if job.record is not None:
        load_calibrated(qvit, job.record, args.load_calibrated, model_facts["weights_sha256"])
        say(f"Loaded calibrated quantizers from {args.load_calibrated}")
        return Calibration()
    if args.calib_size > len(job.calib_samples):
        say(f"note: --calib-size {args.calib_size} exceeds the {len(job.calib_samples)} images in {job.calib_dir}; using all of them")
    subset = calibration_subset(job.calib_samples, args.calib_size, args.seed)
    say(f"Calibrating on {len(subset)} images from {job.calib_dir}")
    progress = not args.no_progress and where.main
    cal = gather_calibration(calibrate(qvit, make_loader(shard(args, subset, where), **loader_args), device, progress, report=say), where)
    if cal.unreadable:
        say(f"note: skipped {cal.unreadable} unreadable calibration image(s)")
    if cal.uncalibrated:
        say(f"note: {len(cal.uncalibrated)} quantization point(s) saw no data and stay uncalibrated")
    if args.save_calibrated is not None and where.main:
        save_calibrated(qvit, run_dir.path / "calibrated.pt", job.model_name, model_facts["weights_sha256"], model_facts["checkpoint_sha256"])
    return Calibration(cal.images, cal.unreadable, cal.seconds, cal.passes)


def integer_program(qvit, say: Callable):
    """The calibrated QVit's integer program (models/integer); a point it cannot express is a UserError."""
    from models.integer import IntegerUnsupported
    from models.integer.lower import lower

    try:
        program = lower(qvit)
    except IntegerUnsupported as exc:
        raise UserError(f"--integer-only: {exc}") from None
    say(f"Integer program: {len(program.nodes)} integer operations, {sum(v.dtype != 'float32' for v in program.values.values())} integer tensors")
    return program


def program_facts(program) -> dict:
    """What qvit_summary.json records about the integer program."""
    from collections import Counter

    return {"nodes": len(program.nodes), "operations": dict(Counter(n.op for n in program.nodes)),
            "tensor_types": dict(Counter(v.dtype for v in program.values.values()))}  # fmt: skip


def evaluate_step(args: argparse.Namespace, job: Job, qvit, loader_args: dict, device, where: Dist, program=None):
    """FP32 and INT8 (the fake-quant model, or the integer ``program``) over the evaluation images, combined
    over the processes; None except on rank 0."""
    from utils.data import make_loader
    from utils.distributed import gather_eval
    from utils.engine import evaluate

    quantized = None
    if program is not None:
        from models.integer.program import run as run_program

        constants = program.constants(device)
        quantized = lambda x: run_program(program, x, constants=constants)[program.output]  # noqa: E731
    progress = not args.no_progress and where.main
    loader = make_loader(shard(args, job.val_samples, where), **loader_args)
    ev = gather_eval(evaluate(qvit, loader, device, progress, amp=args.amp, quantized=quantized), where)
    if not where.main:
        return None
    if ev is None:
        raise UserError(f"{job.val_dir}: no readable evaluation image")
    print(f"evaluate: {ev.samples} images, {ev.seconds_wall:.1f} s (FP32 {ev.seconds_fp32:.1f} s, {'integer program' if program else 'INT8'} {ev.seconds_int8:.1f} s)")
    if ev.unreadable:
        print(f"note: skipped {ev.unreadable} unreadable evaluation image(s)")
    for model, count in (("FP32", ev.non_finite_fp32), ("INT8", ev.non_finite_int8)):
        if count:
            print(f"warning: {count} of {ev.samples} images got NaN or infinite {model} logits; scored as wrong (no class, cosine 0)", file=sys.stderr)
    return ev


def write_results(args: argparse.Namespace, job: Job, ev, calibration: Calibration, folder: Path) -> None:
    """The FP32 vs INT8 table, printed and written to qvit_results.txt."""
    from utils.console_tables import results_table

    table = results_table(ev.fp32, ev.int8, ev.agreement_top1, ev.logit_cosine)
    print(table)
    quantized = "INT8 is the integer-only program" if args.integer_only else "INT8 is the fake-quant model"
    header = f"{job.model_name} | recipe {job.recipe.name} | {calibration.images} calibration images | {quantized} | {dt.datetime.now():%Y-%m-%d %H:%M}\n"
    if args.demo:
        header = "DEMO (random weights, generated images): these numbers mean nothing.\n" + header
    write_text_atomic(folder / "qvit_results.txt", header + table + "\n")


def run_summary(args: argparse.Namespace, job: Job, qvit, model_facts: dict, calibration: Calibration, ev, device, where: Dist) -> dict:
    """Everything qvit_summary.json records about the run (the profile's totals are added after)."""
    from utils.console_tables import versions

    return {
        "model": job.model_name,
        "weights": model_facts["weights"],
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "checkpoint_sha256": model_facts["checkpoint_sha256"],
        "weights_sha256": model_facts["weights_sha256"],
        "config": job.recipe.to_dict(),
        "config_source": job.recipe_source,
        "calib_samples": calibration.images,
        "calibration": {
            "split": str(job.calib_dir) if job.calib_dir else None,
            "requested": args.calib_size,
            "seed": args.seed,
            "unreadable": calibration.unreadable,
            "loaded_from": str(args.load_calibrated) if job.record is not None else None,
            "passes_s": calibration.passes,
        },
        "evaluation": {"split": str(job.val_dir), "unreadable": ev.unreadable, "classes": int(len(set(ev.labels.tolist()))),
                       "non_finite_logits": {"fp32": ev.non_finite_fp32, "int8": ev.non_finite_int8}},
        "fp32": ev.fp32.to_dict(),
        "int8": ev.int8.to_dict(),
        "scale_search_ratios": qvit.searched_ratios,
        "agreement_top1": ev.agreement_top1,
        "logit_cosine_mean": ev.logit_cosine,
        "timings_s": {"calibration": calibration.seconds, "eval_fp32": ev.seconds_fp32, "eval_int8": ev.seconds_int8, "eval_wall": ev.seconds_wall},
        "eval_images_per_s": ev.samples / ev.seconds_wall,
        "peak_memory_mb": peak_memory_mb(device),
        "device": str(device),
        "processes": where.world,
        "amp_fp32": bool(args.amp),
        "integer_only": bool(args.integer_only),
        "batch_size": args.batch_size,
        "demo": bool(args.demo),
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name] + sys.argv[1:],
        "versions": versions(),
    }


def profile_step(args: argparse.Namespace, job: Job, qvit, loader_args: dict, device, where: Dist, folder: Path, program=None) -> dict | None:
    """The profiler on --profile-samples evaluation images: qvit_statistics.csv, histograms; its totals
    (with ``program``: the integer program's integers at each point against FP32)."""
    from utils.data import evenly_spaced, make_loader
    from utils.plots import select_histogram_points, write_point_histograms
    from utils.profiler import NoImagesError, run_profile
    from utils.console_tables import profile_summary

    subset = evenly_spaced(job.val_samples, args.profile_samples)
    views = "accumulated and isolated views" if args.profile == "isolated" else "accumulated view"
    if program is not None:
        views = "the integer program against FP32"
    print(f"Profiling {len(subset)} evaluation images ({views})")
    start = time.perf_counter()
    try:
        result = run_profile(qvit, make_loader(subset, **loader_args), device, isolated=args.profile == "isolated",
                             progress=not args.no_progress and where.main, program=program)  # fmt: skip
    except NoImagesError as exc:  # the evaluation's numbers still stand
        print(f"warning: profile skipped: {exc}", file=sys.stderr)
        return None
    result.table.to_csv(folder / "qvit_statistics.csv", index=False)
    histograms = write_point_histograms(result, folder, select_histogram_points(result, args.hist))
    print(f"profile: {len(subset)} images and {len(histograms)} histogram images, {time.perf_counter() - start:.1f} s")
    print(profile_summary(result.totals))
    return result.totals


def copy_calibrated(source: Path, target: Path) -> None:
    """--save-calibrated PATH gets a copy once the run folder is complete."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    print(f"Saved calibrated quantizers: {target}")


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

    def labelled() -> str | None:
        result = run(args)
        return f"Run folder: {result}" if isinstance(result, Path) else result  # the last line

    return run_script(labelled, (UserError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
