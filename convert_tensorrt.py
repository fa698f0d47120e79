#!/usr/bin/env python
"""Deployable INT8: export a calibrated QVit to ONNX with Q/DQ, simplify, verify with ONNX Runtime, then TensorRT.

    python convert_tensorrt.py --model deit_tiny_patch16_224 --checkpoint W.pth --calibrated RUN/calibrated.pt \\
        [--batch 1,32] [--onnx-only] [--fp16-engine] [--out export/] [--val-dir DIR]

Steps, each with a progress line:
  1. export   FP32 and Q/DQ INT8 ONNX (utils/onnx_export.py says which points are exported, mapped or float)
  2. simplify onnxsim (onnxslim where onnxsim is absent), onnx.checker, every Q directly followed by its DQ
  3. verify   ONNX Runtime on CPU against PyTorch (FP32 to 1e-4; INT8 top-1 agreement and logit
              differences against the fake-quant model), and ORT latency/throughput INT8 vs FP32
  4. TensorRT where `tensorrt` and an NVIDIA GPU are present; otherwise the script stops after step 3
              (exit 0 with --onnx-only, exit 2 without).
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
from pathlib import Path

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
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, 3, *size), dtype=np.float32)
    for _ in range(2):
        session.run(None, {"images": x})
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, {"images": x})
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def convert(args: argparse.Namespace) -> Path:
    batches = parse_batches(args.batch)
    for flag, value in (("--verify-images", args.verify_images), ("--bench-iters", args.bench_iters)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
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

    import numpy as np
    import torch
    from timm.data import create_transform, resolve_data_config

    from models.quant_vit import QVit
    from utils.checkpoint import check_model_name, create_model, load_calibrated, load_checkpoint, read_calibrated, weights_sha256
    from utils.data import calibration_subset, make_loader, scan_split
    from utils.onnx_export import check_qdq, export_onnx, qdq_hooks, simplify
    from utils.run_dir import RunDir, write_json_atomic

    record, recipe = read_calibrated(calibrated)
    check_model_name(args.model)
    if record["model"] != args.model:
        raise UserError(f"--calibrated {calibrated} was made for {record['model']}, not {args.model}")
    model = create_model(args.model, pretrained=not args.checkpoint)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, args.model)
    qvit = QVit(model, recipe).eval()
    load_calibrated(qvit, record, calibrated, weights_sha256(model))
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
        agree = agree_fp32 = total = correct_ort = correct_torch = 0
        fp32_diff = 0.0
        diffs = []
        for x, y, _ in loader:
            if x is None:
                continue
            with torch.no_grad():
                with qvit.fp32():
                    ref_fp32 = qvit(x).numpy()
                with qdq_hooks(qvit, plan):
                    ref_int8 = qvit(x).numpy()
            out_fp32 = sessions["fp32"].run(None, {"images": x.numpy()})[0]
            out_int8 = sessions["int8"].run(None, {"images": x.numpy()})[0]
            fp32_diff = max(fp32_diff, float(np.abs(out_fp32 - ref_fp32).max()))
            diffs.append(np.abs(out_int8 - ref_int8))
            agree += int((out_int8.argmax(1) == ref_int8.argmax(1)).sum())
            agree_fp32 += int((out_int8.argmax(1) == ref_fp32.argmax(1)).sum())
            total += len(x)
            if y is not None:
                correct_ort += int((out_int8.argmax(1) == y.numpy()).sum())
                correct_torch += int((ref_int8.argmax(1) == y.numpy()).sum())
        if total == 0:
            raise UserError(f"--val-dir {args.val_dir}: no readable image")
        diff = np.concatenate([d.reshape(-1) for d in diffs])
        verify = {
            "images": total,
            "fp32_max_abs_diff": fp32_diff,
            "int8_top1_agreement_with_pytorch": agree / total,
            "int8_top1_agreement_with_fp32": agree_fp32 / total,
            "int8_max_abs_logit_diff": float(diff.max()),
            "int8_mean_abs_logit_diff": float(diff.mean()),
        }
        if args.val_dir:
            verify.update(ort_int8_top1=100 * correct_ort / total, pytorch_int8_top1=100 * correct_torch / total)
        report["verify"] = verify
        print(f"      FP32: max |ORT - PyTorch| = {fp32_diff:.2e} ({'within' if fp32_diff <= 1e-4 else 'ABOVE'} 1e-4)")
        print(f"      INT8: top-1 agreement with PyTorch fake-quant {agree / total:.4f}, with FP32 {agree_fp32 / total:.4f}; "
              f"logit |diff| to fake-quant max {diff.max():.3g}, mean {diff.mean():.3g}")
        if args.val_dir:
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
        if importlib.util.find_spec("tensorrt") is None:
            reason = "tensorrt is not installed (pip install -r requirements-trt.txt, on a machine with an NVIDIA GPU and driver)"
        elif not torch.cuda.is_available():
            reason = "no CUDA GPU visible"
        else:
            reason = "TensorRT engine building is not part of this version yet"
        report["tensorrt"] = {"built": False, "reason": reason}
        write_json_atomic(folder / "conversion.json", report)
    print(f"      skipped: {reason}")
    if not args.onnx_only:
        raise UserError(f"no TensorRT engine: {reason}; ONNX models are in {run.final} (use --onnx-only to stop there)")
    return run.final


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_script(lambda: convert(args), (UserError,))


if __name__ == "__main__":
    sys.exit(main())
