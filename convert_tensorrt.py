#!/usr/bin/env python
"""Deployable INT8: export a calibrated QVit to ONNX with Q/DQ, simplify, verify with ONNX Runtime, then TensorRT.

    python convert_tensorrt.py --model deit_tiny_patch16_224 --checkpoint W.pth --calibrated RUN/calibrated.pt \\
        [--batch 1,32] [--onnx-only] [--fp16-engine] [--out export/] [--val-dir DIR]

Steps, each with a progress line:
  1. export   FP32 and Q/DQ INT8 ONNX (utils/onnx_export.py says which points are exported, mapped or float)
  2. simplify onnxsim (onnxslim where onnxsim is absent), onnx.checker, every Q directly followed by its DQ
  3. verify   ONNX Runtime on CPU against PyTorch (FP32 to 1e-4; INT8 top-1 agreement and logit
              differences against the fake-quant model), and ORT latency/throughput INT8 vs FP32
  4. TensorRT where `tensorrt` and an NVIDIA GPU are present (utils/tensorrt_engine.py): INT8 engine from
              the Q/DQ model (FP16 from the FP32 model with --fp16-engine) for batches up to the largest
              --batch; the same checks as step 3 on the engines, throughput, the engine inspector's
              precisions per layer; otherwise the script stops after step 3 (exit 0 with --onnx-only, 2 without).
A recipe TensorRT cannot run as calibrated (anything but symmetric int8 points: FQ-ViT's uint8, log2, PTF)
is refused before anything is written unless --onnx-only is given.
Everything goes into a new folder ``<out>/<time>/`` (written under a hidden name and
renamed when complete). Bad input ends with one ``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quant_config import ConfigError
from utils.errors import ArgumentParser, UserError, run_script


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name the calibrated file was made for")
    p.add_argument("--checkpoint", default=None, help="local weights (default: timm pretrained)")
    p.add_argument("--calibrated", required=True, help="calibrated quantizer state written by test_qvit.py --save-calibrated")
    p.add_argument("--batch", default="1,32", help="batch sizes to benchmark (default 1,32)")
    p.add_argument("--onnx-only", action="store_true", help="stop after ONNX export, simplification and ONNX Runtime verification")
    p.add_argument("--fp16-engine", action="store_true", help="also build an FP16 TensorRT engine for comparison")
    p.add_argument("--out", default="export", help="output root (default export/)")
    p.add_argument("--val-dir", default=None, help="ImageNet-layout images to verify on (default: generated images, agreement only)")
    p.add_argument("--verify-images", type=int, default=256, help="images used for verification (default 256)")
    p.add_argument("--bench-iters", type=int, default=10, help="timed runs per benchmark cell (median; default 10)")
    p.add_argument("--opset", type=int, default=17)
    return p


def parse_batches(text: str) -> list[int]:
    if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", text):
        raise UserError(f"--batch {text!r}: expected positive integers separated by commas, e.g. 1,32")
    return sorted({int(b) for b in text.split(",")})


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench(session, batch: int, size: tuple[int, int], iters: int) -> float:
    """Median seconds of one run at ``batch`` (after two warm-up runs)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, *size), dtype=np.float32)
    for _ in range(2):
        session.run(None, {"images": x})
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, {"images": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    return float((logits.argmax(1) == reference.argmax(1)).mean())


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100 * float((logits.argmax(1) == labels).mean())


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None, fp32: np.ndarray | None = None) -> dict:
    """Top-1 agreement and logit |difference| with ``reference``; agreement with ``fp32``, top-1 (%) with ``labels``."""
    diff = np.abs(logits - reference)
    result = {"top1_agreement": agreement(logits, reference), "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean())}
    if fp32 is not None:
        result["top1_agreement_with_fp32"] = agreement(logits, fp32)
    if labels is not None:
        result["top1"] = top1(logits, labels)
    return result


def describe(check: dict, against: str) -> str:
    """One line of :func:`compare`'s result."""
    fp32 = f", with FP32 {check['top1_agreement_with_fp32']:.4f}" if "top1_agreement_with_fp32" in check else ""
    return (f"top-1 agreement with {against} {check['top1_agreement']:.4f}{fp32}; "
            f"logit |diff| to {against} max {check['max_abs_logit_diff']:.3g}, mean {check['mean_abs_logit_diff']:.3g}")  # fmt: skip


def convert(args: argparse.Namespace) -> Path:
    batches = parse_batches(args.batch)
    for flag, value in (("--verify-images", args.verify_images), ("--bench-iters", args.bench_iters)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    needed = ("onnx", "onnxruntime", "onnxconverter_common") if args.fp16_engine else ("onnx", "onnxruntime")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{', '.join(missing)} not installed: pip install -r requirements.txt")
    calibrated = Path(args.calibrated)
    if not calibrated.is_file():
        raise UserError(f"--calibrated {calibrated}: no such file (write one with test_qvit.py --save-calibrated)")
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

    import torch
    from timm.data import create_transform, resolve_data_config

    from models.quant_vit import QVit
    from utils.checkpoint import check_model_name, create_model, load_calibrated, load_checkpoint, read_calibrated, weights_sha256
    from utils.data import calibration_subset, make_loader, scan_split
    from utils.onnx_export import check_qdq, export_onnx, export_plan, qdq_hooks, simplify
    from utils.run_dir import RunDir, write_json_atomic
    from utils.tensorrt_engine import check_deployable, unavailable_reason

    record, recipe = read_calibrated(calibrated)
    check_model_name(args.model)
    if record["model"] != args.model:
        raise UserError(f"--calibrated {calibrated} was made for {record['model']}, not {args.model}")
    model = create_model(args.model, pretrained=not args.checkpoint)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, args.model)
    qvit = QVit(model, recipe).eval()
    load_calibrated(qvit, record, calibrated, weights_sha256(model))
    if not args.onnx_only:
        check_deployable(export_plan(qvit), recipe.name)
    data_config = resolve_data_config(model=model)
    size = tuple(data_config["input_size"][1:])

    import onnx

    run = RunDir(out)
    with run:
        folder = run.path
        report: dict = {"model": args.model, "recipe": recipe.name, "calibrated": str(calibrated)}
        # 1. export
        print(f"[1/4] export: {args.model} ({recipe.name}) to ONNX opset {args.opset}, FP32 and Q/DQ INT8")
        export_onnx(qvit, folder / "fp32.raw.onnx", size, quantized=False, opset=args.opset)
        plan = export_onnx(qvit, folder / "int8.raw.onnx", size, quantized=True, opset=args.opset)
        counts = {k: sum(p.plan == k for p in plan) for k in ("qdq", "mapped", "float")}
        print(f"      {counts['qdq']} points exported as calibrated, {counts['mapped']} mapped to symmetric int8, {counts['float']} left in float")
        for p in plan:
            if p.plan != "qdq":
                print(f"      {p.plan:6s} {p.name}: {p.reason}")
        report["points"] = [{"name": p.name, "plan": p.plan, "reason": p.reason} for p in plan]

        # 2. simplify and check
        print("[2/4] simplify and check")
        for name in ("fp32", "int8"):
            tool = simplify(folder / f"{name}.raw.onnx", folder / f"{name}.onnx")
            (folder / f"{name}.raw.onnx").unlink()
        problems = check_qdq(onnx.load(str(folder / "int8.onnx")))
        if problems:
            raise UserError(f"Q/DQ layout broken after simplification: {problems[0]} (and {len(problems) - 1} more)")
        print(f"      {tool}; onnx.checker passed; every QuantizeLinear directly followed by its DequantizeLinear")
        report["simplifier"] = tool

        # 3. verify with ONNX Runtime
        transform = create_transform(**data_config)
        if args.val_dir:
            samples = calibration_subset(scan_split(Path(args.val_dir)), args.verify_images, seed=0)
            loader = make_loader(samples, transform, 32, 2)
            source = f"{len(samples)} images from {args.val_dir}"
        else:
            generator = torch.Generator().manual_seed(0)
            loader = [(torch.randn(min(32, args.verify_images - i), 3, *size, generator=generator), None, 0) for i in range(0, args.verify_images, 32)]
            source = f"{args.verify_images} generated images (agreement only; pass --val-dir for accuracy)"
        print(f"[3/4] verify with ONNX Runtime on {source}")
        sessions = {name: ort_session(folder / f"{name}.onnx") for name in ("fp32", "int8")}

        def torch_logits(x: torch.Tensor, fake_quant: bool) -> np.ndarray:
            with torch.no_grad(), (qdq_hooks(qvit, plan) if fake_quant else qvit.fp32()):
                return qvit(x).numpy()

        logits, labels = collect_logits(
            loader,
            {
                "torch_fp32": lambda x: torch_logits(x, False),
                "torch_int8": lambda x: torch_logits(x, True),
                **{f"ort_{name}": (lambda x, s=session: s.run(None, {"images": x.numpy()})[0]) for name, session in sessions.items()},
            },
        )
        reference, reference_fp32 = logits["torch_int8"], logits["torch_fp32"]
        fp32_diff = float(np.abs(logits["ort_fp32"] - reference_fp32).max())
        ort = compare(logits["ort_int8"], reference, labels, reference_fp32)
        verify = {
            "images": len(reference),
            "fp32_max_abs_diff": fp32_diff,
            "int8_top1_agreement_with_pytorch": ort["top1_agreement"],
            "int8_top1_agreement_with_fp32": ort["top1_agreement_with_fp32"],
            "int8_max_abs_logit_diff": ort["max_abs_logit_diff"],
            "int8_mean_abs_logit_diff": ort["mean_abs_logit_diff"],
        }
        if labels is not None:
            verify.update(ort_int8_top1=ort["top1"], pytorch_int8_top1=top1(reference, labels))
        report["verify"] = verify
        print(f"      FP32: max |ORT - PyTorch| = {fp32_diff:.2e} ({'within' if fp32_diff <= 1e-4 else 'ABOVE'} 1e-4)")
        print(f"      INT8: {describe(ort, 'PyTorch fake-quant')}")
        if labels is not None:
            print(f"      INT8 top-1: ORT {verify['ort_int8_top1']:.2f}%, PyTorch fake-quant {verify['pytorch_int8_top1']:.2f}%")
        rows = []
        for batch in batches:
            t32 = bench(sessions["fp32"], batch, size, args.bench_iters)
            t8 = bench(sessions["int8"], batch, size, args.bench_iters)
            rows.append({"batch": batch, "fp32_ms": 1e3 * t32, "int8_ms": 1e3 * t8, "fp32_img_s": batch / t32, "int8_img_s": batch / t8, "speedup": t32 / t8})
            print(f"      ORT batch {batch}: FP32 {1e3 * t32:.1f} ms ({batch / t32:.1f} img/s), INT8 {1e3 * t8:.1f} ms ({batch / t8:.1f} img/s), {t32 / t8:.2f}x")
        report["ort_benchmark"] = rows

        # 4. TensorRT
        print("[4/4] TensorRT")
        reason = unavailable_reason() or ("not requested (--onnx-only)" if args.onnx_only else None)
        if reason is None:
            report["tensorrt"] = tensorrt_engines(args, folder, batches, size, loader, logits, labels)
            reason = report["tensorrt"].get("reason")
        else:
            report["tensorrt"] = {"built": False, "reason": reason}
        write_json_atomic(folder / "conversion.json", report)
    if reason is not None:
        print(f"      skipped: {reason}")
        if not args.onnx_only:
            raise UserError(f"no TensorRT engine: {reason}; ONNX models are in {run.final} (use --onnx-only to stop there)")
    return run.final


def tensorrt_engines(args: argparse.Namespace, folder: Path, batches: list[int], size: tuple[int, int], loader,
                     reference: dict[str, np.ndarray], labels: np.ndarray | None) -> dict:  # fmt: skip
    """Step 4: build the engines, check them against step 3's PyTorch logits ``reference``, inspect, time.

    A TensorRT failure (parser, builder, runtime) ends the step with its ``reason``; engines already
    written stay.
    """
    import onnx
    import torch

    from utils.tensorrt_engine import EngineError, EngineRunner, benchmark, build_engine, inspect_engine

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
        rows = []
        for batch in batches:
            times = {precision: benchmark(runner, batch, args.bench_iters) for precision, runner in runners.items()}
            row: dict = {"batch": batch}
            for precision, seconds in times.items():
                row.update({f"{precision}_ms": 1e3 * seconds, f"{precision}_img_s": batch / seconds})
            line = ", ".join(f"{p.upper()} {1e3 * t:.2f} ms ({batch / t:.0f} img/s)" for p, t in times.items())
            if "fp16" in times:
                row["int8_speedup_vs_fp16"] = times["fp16"] / times["int8"]
                line += f", INT8 {row['int8_speedup_vs_fp16']:.2f}x FP16"
            rows.append(row)
            print(f"      TensorRT batch {batch}: {line}")
    except EngineError as exc:
        return {**result, "reason": str(exc)}
    return {**result, "built": True, "benchmark": rows}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_script(lambda: convert(args), (UserError, ConfigError))


if __name__ == "__main__":
    sys.exit(main())
