#!/usr/bin/env python
"""Deployable INT8: export a calibrated QVit to ONNX with Q/DQ and int8 weights, simplify, verify and
benchmark in the CPU runtimes (ONNX Runtime, OpenVINO), then build TensorRT engines.

    python convert_tensorrt.py --model deit_tiny_patch16_224 --checkpoint W.pth --calibrated RUN/calibrated.pt \\
        [--runtimes ort,openvino,tensorrt] [--batch 1,32] [--onnx-only] [--fp16-engine] [--out export/] [--val-dir DIR]

Steps, each with a progress line:
  1. export   FP32 and Q/DQ INT8 ONNX (utils/onnx_export.py says which points are exported, mapped or
              float); every quantized weight stored as int8 feeding a DequantizeLinear
  2. simplify onnxslim, onnx.checker, every Q directly followed by its DQ, no QuantizeLinear on a weight;
              each CPU runtime's own form of int8.onnx: the OpenVINO IR (int8.xml/.bin, int8 weights),
              ONNX Runtime's int8.ort.onnx (Linear biases inside MatMulIntegerToFloat, utils/ort_model.py)
  3. verify   each CPU runtime against PyTorch (FP32 to 1e-4; INT8 top-1 agreement and logit
              differences against the fake-quant model and FP32), then INT8 vs FP32 latency and
              throughput at each --batch in that runtime, the two models timed alternately
  4. TensorRT where `tensorrt` and an NVIDIA GPU are present (utils/tensorrt_engine.py): INT8 engine from
              the Q/DQ model (FP16 from the FP32 model with --fp16-engine) for batches up to the largest
              --batch; the same checks as step 3 on the engines, throughput, the engine inspector's
              precisions per layer; otherwise the script stops after step 3 (exit 2 unless TensorRT
              was left out of --runtimes, or --onnx-only was given)
With --integer-only the script writes the recipe's integer-only program instead (models/integer):
  1. export   fp32.onnx, and int_only.onnx: standard ONNX operators on integer tensors only between the
              image's QuantizeLinear and the int32 logits' DequantizeLinear (utils/integer_onnx.py)
  2. simplify onnxslim, onnx.checker, ONNX shape inference finds no float tensor inside
  3. verify   in ONNX Runtime: the same logits as the PyTorch integer executor on every image (bit for
              bit), agreement with the fake-quant model and FP32; int_only.onnx against fp32.onnx at each
              --batch; with --golden N, golden vectors of N images (golden/: every tensor and constant)
A runtime that is not installed is skipped with one line. With TensorRT among the runtimes every
activation is exported symmetric (TensorRT takes zero point 0 only); without it, uint8 activations keep
their zero points. A recipe some runtime cannot run as calibrated (FQ-ViT's log2 softmax and PTF, other
widths; uint8 activations for TensorRT) is refused before anything is written, naming the points,
unless --allow-fallback is given.
Everything goes into a new folder ``<out>/<time>/`` (written under a hidden name and
renamed when complete). Bad input ends with one ``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quant_config import ConfigError
from utils.errors import ArgumentParser, UserError, parse_batches, run_script
from utils.metrics import logit_cosine, top1_accuracy, top1_agreement


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name the calibrated file was made for")
    p.add_argument("--checkpoint", default=None, help="local weights (default: timm pretrained)")
    p.add_argument("--calibrated", required=True, help="calibrated quantizer state written by test_qvit.py --save-calibrated")
    p.add_argument("--runtimes", default=None, help="where to verify and benchmark: ort, openvino, tensorrt (default all three; ort with --integer-only)")
    p.add_argument("--batch", default="1,32", help="batch sizes to benchmark (default 1,32)")
    p.add_argument("--onnx-only", action="store_true", help="leave TensorRT out: stop after the CPU runtimes")
    p.add_argument("--allow-fallback", action="store_true", help="export points a runtime cannot run as calibrated mapped or in float instead of refusing")
    p.add_argument("--fp16-engine", action="store_true", help="also build an FP16 TensorRT engine for comparison")
    p.add_argument("--out", default="export", help="output root (default export/)")
    p.add_argument("--val-dir", default=None, help="ImageNet-layout images to verify on (default: generated images, agreement only)")
    p.add_argument("--verify-images", type=int, default=256, help="images used for verification (default 256)")
    p.add_argument("--bench-iters", type=int, default=10, help="timed runs per benchmark cell (median; default 10)")
    p.add_argument("--threads", type=int, default=0, help="CPU runtime threads (default 0: the runtime's choice)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--integer-only", action="store_true",
                   help="write the integer-only program as int_only.onnx (integer tensors only, standard operators), verified in ONNX Runtime")
    p.add_argument("--golden", type=int, default=0, metavar="N",
                   help="with --integer-only: golden vectors of N verification images for hardware (golden/: every layer's integers and constants)")
    return p


def collect_logits(loader, models: dict[str, Callable]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Every model's logits (numpy) over ``loader``'s batches in one pass, and the labels (None without)."""
    outputs: dict[str, list] = {name: [] for name in models}
    labels = []
    for x, y, _ in loader:
        if x is None:  # a batch of unreadable files only
            continue
        for name, model in models.items():
            outputs[name].append(model(x))
        if y is not None:
            labels.append(y.numpy())
    if not any(outputs.values()):
        raise UserError("no readable image among the verification images")
    return {name: np.concatenate(parts) for name, parts in outputs.items()}, (np.concatenate(labels) if labels else None)


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None, fp32: np.ndarray | None = None) -> dict:
    """Top-1 agreement and logit |difference| with ``reference``; agreement and logit cosine with ``fp32``, top-1 (%) with ``labels``."""
    diff = np.abs(logits - reference)
    result = {"top1_agreement": top1_agreement(logits, reference), "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean())}
    if fp32 is not None:
        result["top1_agreement_with_fp32"] = top1_agreement(logits, fp32)
        result["logit_cosine_with_fp32"] = logit_cosine(logits, fp32)
    if labels is not None:
        result["top1"] = top1_accuracy(logits, labels)
    return result


def describe(check: dict, against: str) -> str:
    """One line of :func:`compare`'s result."""
    fp32 = ""
    if "top1_agreement_with_fp32" in check:
        fp32 = f", with FP32 {check['top1_agreement_with_fp32']:.4f} (logit cosine {check['logit_cosine_with_fp32']:.4f})"
    return (f"top-1 agreement with {against} {check['top1_agreement']:.4f}{fp32}; "
            f"logit |diff| to {against} max {check['max_abs_logit_diff']:.3g}, mean {check['mean_abs_logit_diff']:.3g}")  # fmt: skip


def check_arguments(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """Every argument checked before anything is loaded; returns the batch sizes and the runtimes."""
    from utils.runtimes import parse_runtimes

    batches = parse_batches("--batch", args.batch)
    runtimes = parse_runtimes(args.runtimes or ("ort" if args.integer_only else "ort,openvino,tensorrt"))
    if args.integer_only and runtimes != ["ort"]:
        raise UserError(f"--integer-only verifies int_only.onnx in ONNX Runtime: use --runtimes ort, not {args.runtimes!r}")
    if args.golden and not args.integer_only:
        raise UserError("--golden writes the integer program's tensors: it needs --integer-only")
    if args.golden < 0:
        raise UserError(f"--golden must be 0 or more images, got {args.golden}")
    if args.onnx_only:
        runtimes = [r for r in runtimes if r != "tensorrt"]
    for flag, value in (("--verify-images", args.verify_images), ("--bench-iters", args.bench_iters)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.threads < 0:
        raise UserError(f"--threads must be 0 (the runtime's choice) or more, got {args.threads}")
    needed = ("onnx", "onnxslim", "onnxconverter_common") if args.fp16_engine else ("onnx", "onnxslim")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not installed: pip install -r requirements.txt")
    if not Path(args.calibrated).is_file():
        raise UserError(f"--calibrated {args.calibrated}: no such file (write one with test_qvit.py --save-calibrated)")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise UserError(f"--checkpoint {args.checkpoint}: no such file")
    if args.val_dir and not Path(args.val_dir).is_dir():
        raise UserError(f"--val-dir {args.val_dir}: no such directory")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--out {out}: not writable ({exc.strerror})") from None
    return batches, runtimes


def load_model(args: argparse.Namespace):
    """The QVit of ``--calibrated`` on ``--model``'s weights, and the model's data config."""
    from timm.data import resolve_data_config

    from utils.checkpoint import restore_calibrated

    qvit = restore_calibrated(Path(args.calibrated), args.model, args.checkpoint)
    return qvit, resolve_data_config(model=qvit.model)


def plan_export(qvit, runtimes: list[str], allow_fallback: bool) -> list:
    """Each point's export plan for ``runtimes``; refuses (naming the points) what some runtime would not run as calibrated."""
    from utils.onnx_export import check_deployable, export_plan
    from utils.runtimes import CPU_RUNTIMES, TITLES
    from utils.tensorrt_engine import check_deployable as check_tensorrt

    plan = export_plan(qvit, zero_points=uses_zero_points(runtimes))
    if not allow_fallback:
        if "tensorrt" in runtimes:
            check_tensorrt(plan, qvit.recipe.name)
        cpu = [TITLES[r] for r in runtimes if r in CPU_RUNTIMES]
        if cpu:
            check_deployable(plan, qvit.recipe.name, " and ".join(cpu), "8-bit uniform",
                             "Calibrate with test_qvit.py --config cpu_int8 (or trt_int8), or pass --allow-fallback to export them mapped or in float")  # fmt: skip
    return plan


def uses_zero_points(runtimes: list[str]) -> bool:
    """uint8 activations keep their zero points unless TensorRT (zero point 0 only) is to run the same file."""
    return "tensorrt" not in runtimes


def export_step(qvit, folder: Path, size: tuple[int, int], plan: list, runtimes: list[str], opset: int) -> dict:
    from utils.onnx_export import export_onnx

    print(f"[1/4] export: {qvit.recipe.name} to ONNX opset {opset}, FP32 and Q/DQ INT8 with int8 weights")
    export_onnx(qvit, folder / "fp32.raw.onnx", size, quantized=False, opset=opset)
    export_onnx(qvit, folder / "int8.raw.onnx", size, quantized=True, opset=opset, zero_points=uses_zero_points(runtimes))
    counts = {k: sum(p.plan == k for p in plan) for k in ("qdq", "mapped", "float")}
    print(f"      {counts['qdq']} points exported as calibrated, {counts['mapped']} mapped to symmetric int8, {counts['float']} left in float")
    for p in plan:
        if p.plan != "qdq":
            print(f"      {p.plan:6s} {p.name}: {p.reason}")
    return {"points": [{"name": p.name, "plan": p.plan, "reason": p.reason} for p in plan]}


def simplify_step(folder: Path, runtimes: list[str]) -> dict:
    import onnx

    from utils.onnx_export import check_qdq, simplify, weight_initializers
    from utils.runtimes import CPU_RUNTIMES, save_deployed, unavailable_reason

    print("[2/4] simplify and check")
    for name in ("fp32", "int8"):
        tool = simplify(folder / f"{name}.raw.onnx", folder / f"{name}.onnx")
        (folder / f"{name}.raw.onnx").unlink()
    model = onnx.load(str(folder / "int8.onnx"))
    problems = check_qdq(model, zero_points=uses_zero_points(runtimes))
    if problems:
        raise UserError(f"Q/DQ layout broken after simplification: {problems[0]} (and {len(problems) - 1} more)")
    sizes = {name: (folder / f"{name}.onnx").stat().st_size for name in ("fp32", "int8")}
    weights = weight_initializers(model)
    print(f"      {tool}; onnx.checker passed; every QuantizeLinear directly followed by its DequantizeLinear")
    print(f"      {len(weights)} weights stored as int8; int8.onnx {sizes['int8'] / 2**20:.1f} MiB = {sizes['int8'] / sizes['fp32']:.2f}x fp32.onnx")
    report = {"simplifier": tool, "int8_weights": len(weights), "bytes": sizes}
    for runtime in (r for r in CPU_RUNTIMES if r in runtimes and unavailable_reason(r) is None):
        path, facts = save_deployed(runtime, folder / "int8.onnx")
        report.update(facts)
        if runtime == "openvino":
            types = facts["openvino_ir_constant_bytes"]
            print(f"      OpenVINO IR {path.name}/.bin: {facts['openvino_model']['qkv_split']} qkv as q, k, v; "
                  f"constants {', '.join(f'{t} {n / 2**20:.1f} MiB' for t, n in sorted(types.items(), key=lambda kv: -kv[1]))}")  # fmt: skip
        else:
            rewrite = facts["ort_model"]
            print(f"      ONNX Runtime form {path.name}: {rewrite['linears_fused']} Linears with their bias as MatMulIntegerToFloat "
                  f"({rewrite['qkv_split']} qkv as q, k, v), {rewrite['activations_shifted']} int8 activation Q/DQ nodes as uint8 + 128, "
                  f"{rewrite['layout_moves']} layout changes moved onto codes, {rewrite['scales_folded']} q scales folded, "
                  f"{rewrite['activation_matmuls']} activation matmuls and {rewrite['patch_embeddings']} patch embedding integer")  # fmt: skip
    return report


def verification_images(args: argparse.Namespace, data_config: dict, size: tuple[int, int]):
    """Batches of (images, labels or None, unreadable count), and what they are in words."""
    import torch
    from timm.data import create_transform

    from utils.data import calibration_subset, make_loader, scan_split

    if args.val_dir:
        samples = calibration_subset(scan_split(Path(args.val_dir)), args.verify_images, seed=0)
        return make_loader(samples, create_transform(**data_config), 32, 2), f"{len(samples)} images from {args.val_dir}"
    generator = torch.Generator().manual_seed(0)
    loader = [(torch.randn(min(32, args.verify_images - i), 3, *size, generator=generator), None, 0) for i in range(0, args.verify_images, 32)]
    return loader, f"{args.verify_images} generated images (agreement only; pass --val-dir for accuracy)"


def verify_step(args: argparse.Namespace, qvit, plan: list, folder: Path, runtimes: list[str], loader, source: str) -> tuple[dict, dict, dict, np.ndarray | None]:
    """PyTorch FP32 and fake-quant logits, and each available CPU runtime's, compared; returns the
    report, the compiled runtime models (for the benchmark), every model's logits and the labels."""
    import torch

    from utils.onnx_export import qdq_hooks
    from utils.runtimes import CPU_RUNTIMES, DEPLOYED_SUFFIXES, TITLES, load_model, unavailable_reason

    print(f"[3/4] verify in the CPU runtimes on {source}")
    compiled: dict[str, dict] = {}
    skipped = {}
    for runtime in (r for r in runtimes if r in CPU_RUNTIMES):
        reason = unavailable_reason(runtime)
        if reason is not None:
            skipped[runtime] = reason
            print(f"      {TITLES[runtime]}: skipped ({reason})")
            continue
        int8 = folder / ("int8" + DEPLOYED_SUFFIXES[runtime])
        compiled[runtime] = {"fp32": load_model(runtime, folder / "fp32.onnx", args.threads), "int8": load_model(runtime, int8, args.threads)}

    def torch_logits(x: torch.Tensor, fake_quant: bool) -> np.ndarray:
        with torch.no_grad(), (qdq_hooks(qvit, plan) if fake_quant else qvit.fp32()):
            return qvit(x).numpy()

    models = {"torch_fp32": lambda x: torch_logits(x, False), "torch_int8": lambda x: torch_logits(x, True)}
    for runtime, pair in compiled.items():
        for precision, model in pair.items():
            models[f"{runtime}_{precision}"] = lambda x, m=model: m(x.numpy())
    logits, labels = collect_logits(loader, models)
    reference, reference_fp32 = logits["torch_int8"], logits["torch_fp32"]
    report: dict = {"images": len(reference), "skipped": skipped, "pytorch_int8": compare(reference, reference_fp32, labels, reference_fp32)}
    if labels is not None:
        report["pytorch_fp32_top1"] = top1_accuracy(reference_fp32, labels)
    fake_quant = report["pytorch_int8"]
    if compiled:
        from utils.int8_kernels import SATURATION_NOTE, int8_pairs_saturate

        report["int8_pairs_saturate"] = int8_pairs_saturate()
        if report["int8_pairs_saturate"]:
            print(f"      warning: {SATURATION_NOTE}")
    print(f"      PyTorch fake-quant: top-1 agreement with FP32 {fake_quant['top1_agreement']:.4f}, logit cosine {fake_quant['logit_cosine_with_fp32']:.4f}"
          + (f", top-1 {fake_quant['top1']:.2f}% (FP32 {report['pytorch_fp32_top1']:.2f}%)" if labels is not None else ""))  # fmt: skip
    for runtime in compiled:
        fp32_diff = float(np.abs(logits[f"{runtime}_fp32"] - reference_fp32).max())
        check = compare(logits[f"{runtime}_int8"], reference, labels, reference_fp32)
        report[runtime] = {"fp32_max_abs_diff": fp32_diff, "int8": check}
        print(f"      {TITLES[runtime]} FP32: max |{runtime} - PyTorch| = {fp32_diff:.2e} ({'within' if fp32_diff <= 1e-4 else 'ABOVE'} 1e-4)")
        print(f"      {TITLES[runtime]} INT8: {describe(check, 'PyTorch fake-quant')}")
        if labels is not None:
            print(f"      {TITLES[runtime]} INT8 top-1 {check['top1']:.2f}% (PyTorch fake-quant {report['pytorch_int8']['top1']:.2f}%, FP32 {report['pytorch_fp32_top1']:.2f}%)")
    return report, compiled, logits, labels


def benchmark_step(compiled: dict[str, dict], batches: list[int], size: tuple[int, int], iters: int) -> dict:
    """INT8 against FP32 in each runtime, timed alternately: medians and the median paired speedup."""
    from utils.runtimes import TITLES
    from utils.timing import timed_pairs

    result = {}
    for runtime, pair in compiled.items():
        rows = []
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, 3, *size), dtype=np.float32)
            t32, t8, ratio = timed_pairs(lambda: pair["fp32"](x), lambda: pair["int8"](x), iters)
            rows.append({"batch": batch, "fp32_ms": 1e3 * t32, "int8_ms": 1e3 * t8, "fp32_img_s": batch / t32, "int8_img_s": batch / t8, "speedup": 1 / ratio})
            print(f"      {TITLES[runtime]} batch {batch}: FP32 {1e3 * t32:.1f} ms ({batch / t32:.1f} img/s), "
                  f"INT8 {1e3 * t8:.1f} ms ({batch / t8:.1f} img/s), {1 / ratio:.2f}x (median of paired runs)")  # fmt: skip
        result[runtime] = rows
    return result


class StepClock:
    """Each step's seconds: :meth:`done` ends the step running since the last one (one line, kept in ``seconds``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step], self.start = now - self.start, now
        print(f"      {step}: {self.seconds[step]:.1f} s")


def convert(args: argparse.Namespace) -> Path:
    batches, runtimes = check_arguments(args)
    qvit, data_config = load_model(args)
    if args.integer_only:
        return convert_integer(args, qvit, data_config, batches)
    size = tuple(data_config["input_size"][1:])
    plan = plan_export(qvit, runtimes, args.allow_fallback)

    from utils.run_dir import RunDir, write_json_atomic
    from utils.tensorrt_engine import unavailable_reason

    run = RunDir(Path(args.out))
    with run:
        folder, clock = run.path, StepClock()
        report: dict = {"model": args.model, "recipe": qvit.recipe.name, "calibrated": str(args.calibrated), "runtimes": runtimes}
        report.update(export_step(qvit, folder, size, plan, runtimes, args.opset))
        clock.done("export")
        report.update(simplify_step(folder, runtimes))
        clock.done("simplify")
        loader, source = verification_images(args, data_config, size)
        report["verify"], compiled, logits, labels = verify_step(args, qvit, plan, folder, runtimes, loader, source)
        clock.done("verify")
        report["benchmark"] = benchmark_step(compiled, batches, size, args.bench_iters)
        clock.done("benchmark")
        print("[4/4] TensorRT")
        reason = unavailable_reason() or (None if "tensorrt" in runtimes else "not requested (--onnx-only or --runtimes)")
        if reason is None:
            report["tensorrt"] = tensorrt_engines(args, folder, batches, size, loader, logits, labels)
            reason = report["tensorrt"].get("reason")
        else:
            report["tensorrt"] = {"built": False, "reason": reason}
        if report["tensorrt"].get("built"):
            clock.done("tensorrt")
        report["seconds"] = clock.seconds
        write_json_atomic(folder / "conversion.json", report)
    if reason is not None:
        print(f"      skipped: {reason}")
        if "tensorrt" in runtimes:
            raise UserError(f"no TensorRT engine: {reason}; ONNX models are in {run.final} (use --onnx-only to stop there)")
    return run.final


def integer_program(qvit):
    """The calibrated model's integer program and its ONNX form; what they cannot express is a one-line
    UserError, before anything is written."""
    from models.integer import IntegerUnsupported
    from models.integer.lower import lower
    from utils.integer_onnx import to_onnx

    try:
        program = lower(qvit)
        return program, to_onnx(program)
    except IntegerUnsupported as exc:
        raise UserError(f"--integer-only: {exc}") from None


def convert_integer(args: argparse.Namespace, qvit, data_config: dict, batches: list[int]) -> Path:
    """--integer-only: int_only.onnx, simplified and checked integer-only, verified against the PyTorch
    integer executor in ONNX Runtime, timed against fp32.onnx, and golden vectors with --golden."""
    import torch

    from models.integer.golden import write_golden
    from models.integer.program import run as run_program
    from utils.integer_onnx import float_tensors, save_int_only
    from utils.onnx_export import export_onnx, simplify
    from utils.run_dir import RunDir, write_json_atomic
    from utils.runtimes import load_model as load_runtime_model
    from utils.runtimes import unavailable_reason

    program, int_only = integer_program(qvit)
    reason = unavailable_reason("ort")
    if reason is not None:
        raise UserError(f"--integer-only verifies int_only.onnx in ONNX Runtime: {reason}")
    size = tuple(data_config["input_size"][1:])
    run = RunDir(Path(args.out))
    with run:
        folder, clock = run.path, StepClock()
        report: dict = {"model": args.model, "recipe": qvit.recipe.name, "calibrated": str(args.calibrated), "integer_only": True}
        print(f"[1/3] export: {qvit.recipe.name}'s integer program ({len(program.nodes)} integer operations) to int_only.onnx, and fp32.onnx")
        export_onnx(qvit, folder / "fp32.raw.onnx", size, quantized=False, opset=args.opset)
        clock.done("export")
        print("[2/3] simplify and check")
        simplify(folder / "fp32.raw.onnx", folder / "fp32.onnx")
        (folder / "fp32.raw.onnx").unlink()
        model, tool = save_int_only(int_only, folder / "int_only.onnx")
        floats = float_tensors(model)
        if floats:
            raise RuntimeError(f"int_only.onnx holds float tensors after simplification: {', '.join(floats[:5])}")
        sizes = {name: (folder / f"{name}.onnx").stat().st_size for name in ("fp32", "int_only")}
        ops = sorted({n.op_type for n in model.graph.node})
        print(f"      {tool}; onnx.checker passed; shape inference: every tensor between QuantizeLinear and DequantizeLinear is an integer")
        print(f"      {len(model.graph.node)} nodes of {len(ops)} standard operators ({', '.join(ops)})")
        print(f"      int_only.onnx {sizes['int_only'] / 2**20:.1f} MiB = {sizes['int_only'] / sizes['fp32']:.3f}x fp32.onnx")
        report.update(simplifier=tool, nodes=len(model.graph.node), operators=ops, bytes=sizes)
        clock.done("simplify")
        loader, source = verification_images(args, data_config, size)
        print(f"[3/3] verify in ONNX Runtime on {source}")
        compiled = {"fp32": load_runtime_model("ort", folder / "fp32.onnx", args.threads), "int_only": load_runtime_model("ort", folder / "int_only.onnx", args.threads)}
        constants = program.constants(torch.device("cpu"))

        def torch_logits(x: torch.Tensor, mode: str) -> np.ndarray:
            with torch.no_grad():
                if mode == "integer":
                    return run_program(program, x, constants=constants)[program.output].numpy()
                if mode == "fp32":
                    with qvit.fp32():
                        return qvit(x).numpy()
                return qvit(x).numpy()

        models = {f"torch_{m}": (lambda x, m=m: torch_logits(x, m)) for m in ("fp32", "fake_quant", "integer")}
        models.update({f"ort_{name}": (lambda x, f=f: f(x.numpy())) for name, f in compiled.items()})
        logits, labels = collect_logits(loader, models)
        fp32 = logits["torch_fp32"]
        identical = bool(np.array_equal(logits["ort_int_only"], logits["torch_integer"]))
        report["verify"] = verify = {
            "images": len(fp32),
            "ort_equals_pytorch_integer": identical,
            "ort_fp32_max_abs_diff": float(np.abs(logits["ort_fp32"] - fp32).max()),
            "integer_vs_fake_quant": compare(logits["torch_integer"], logits["torch_fake_quant"], labels, fp32),
            "fake_quant": compare(logits["torch_fake_quant"], fp32, labels, fp32),
        }
        print(f"      ONNX Runtime int_only.onnx vs the PyTorch integer executor: {'identical logits on every image' if identical else 'DIFFERENT logits'}"
              f" ({len(fp32)} images)")  # fmt: skip
        if not identical:
            print("warning: ONNX Runtime and the PyTorch integer executor disagree; please report this", file=sys.stderr)
        print(f"      integer program: {describe(verify['integer_vs_fake_quant'], 'PyTorch fake-quant')}")
        if labels is not None:
            print(f"      integer program top-1 {verify['integer_vs_fake_quant']['top1']:.2f}% (fake-quant {verify['fake_quant']['top1']:.2f}%, "
                  f"FP32 {top1_accuracy(fp32, labels):.2f}%)")  # fmt: skip
        clock.done("verify")
        report["benchmark"] = {"ort": benchmark_step({"ort": {"fp32": compiled["fp32"], "int8": compiled["int_only"]}}, batches, size, args.bench_iters)["ort"]}
        clock.done("benchmark")
        if args.golden:
            images = torch.cat([x for x, _, _ in loader if x is not None])[: args.golden]
            report["golden"] = facts = write_golden(program, images, folder / "golden")
            print(f"      golden vectors of {facts['images']} image(s): {facts['tensors']} tensors, {facts['constants']} constants in golden/ (docs/integer.md)")
            clock.done("golden")
        report["seconds"] = clock.seconds
        write_json_atomic(folder / "conversion.json", report)
    return run.final


def tensorrt_engines(args: argparse.Namespace, folder: Path, batches: list[int], size: tuple[int, int], loader,
                     reference: dict[str, np.ndarray], labels: np.ndarray | None) -> dict:  # fmt: skip
    """Step 4: build the engines, check them against step 3's PyTorch logits ``reference``, inspect, time.

    A TensorRT failure (parser, builder, runtime) ends the step with its ``reason``; engines already
    written stay.
    """
    import onnx
    import torch

    from utils.tensorrt_engine import EngineError, EngineRunner, build_engine, inspect_engine

    max_batch = max(batches)
    # precision: (source ONNX, PyTorch reference logits, its name, also compare with FP32)
    plans = {"int8": ("int8.onnx", "torch_int8", "PyTorch fake-quant", True), "fp16": ("fp32.onnx", "torch_fp32", "FP32", False)}
    precisions = ["int8", "fp16"] if args.fp16_engine else ["int8"]
    result: dict = {"built": False, "device": torch.cuda.get_device_name(), "max_batch": max_batch, "engines": {}}
    try:
        for precision in precisions:
            source = plans[precision][0]
            print(f"      building the {precision.upper()} engine from {source} (batch 1-{max_batch}) ...", flush=True)
            info = build_engine(folder / source, folder / f"{precision}.engine", precision, max_batch, size)
            print(f"      {precision}.engine: {info['bytes'] / 2**20:.1f} MiB, built in {info['build_s']:.1f} s (TensorRT {info['tensorrt']})")
            result["engines"][precision] = info
        runners = {precision: EngineRunner(folder / f"{precision}.engine") for precision in precisions}
        logits, _ = collect_logits(loader, {p: (lambda x, r=r: r(x).float().cpu().numpy()) for p, r in runners.items()})
        for precision, runner in runners.items():
            source, key, against, with_fp32 = plans[precision]
            engine = result["engines"][precision]
            engine["verify"] = check = {"reference": against, **compare(logits[precision], reference[key], labels, reference["torch_fp32"] if with_fp32 else None)}
            print(f"      {precision.upper()} engine: {describe(check, against)}")
            if labels is not None:
                print(f"      {precision.upper()} engine top-1: {check['top1']:.2f}%")
            engine["inspection"] = summary = inspect_engine(runner, onnx.load(str(folder / source)))
            layers = ", ".join(f"{name} {n}" for name, n in summary["precisions"].items())
            fused = {True: "yes", False: "no", None: "unknown"}[summary["attention_fused"]]
            print(f"      {precision.upper()} engine layers: {len(summary['layers'])} ({layers}); attention fused: {fused}")
            if summary["fallbacks"]:
                names = ", ".join(f"{f['onnx']} ({f['precision']})" for f in summary["fallbacks"])
                print(f"warning: {precision}.engine ran {len(summary['fallbacks'])} Conv/Gemm/MatMul with Q/DQ inputs in float: {names}", file=sys.stderr)
        rows = [engine_timing(runners, batch, args.bench_iters) for batch in batches]
    except EngineError as exc:
        return {**result, "reason": str(exc)}
    return {**result, "built": True, "benchmark": rows}


def engine_timing(runners: dict, batch: int, iters: int) -> dict:
    """The engines' seconds per ``batch`` (the device synchronised after each run); INT8 and FP16 timed
    alternately, with the median of the paired ratios."""
    import torch

    from utils.timing import timed, timed_pairs

    x = torch.randn(batch, *runners["int8"].sample_shape, device="cuda")
    row: dict = {"batch": batch}
    if "fp16" in runners:
        t16, t8, ratio = timed_pairs(lambda: runners["fp16"](x), lambda: runners["int8"](x), iters)
        times = {"int8": t8, "fp16": t16}
        row["int8_speedup_vs_fp16"] = 1 / ratio
    else:
        times = {"int8": timed(lambda: runners["int8"](x), iters)}
    for precision, seconds in times.items():
        row.update({f"{precision}_ms": 1e3 * seconds, f"{precision}_img_s": batch / seconds})
    line = ", ".join(f"{p.upper()} {1e3 * t:.2f} ms ({batch / t:.0f} img/s)" for p, t in times.items())
    if "fp16" in times:
        line += f", INT8 {row['int8_speedup_vs_fp16']:.2f}x FP16 (median of paired runs)"
    print(f"      TensorRT batch {batch}: {line}")
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_script(lambda: convert(args), (UserError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
