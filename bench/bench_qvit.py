#!/usr/bin/env python
"""Speed benchmark: FP32 vs fake-quant evaluation throughput, and calibration cost per observer.

    python -m bench.bench_qvit                                  # deit_tiny + vit_base, batch 32
    python -m bench.bench_qvit --models deit_tiny_patch16_224 --iters 5
    python -m bench.bench_qvit --device cuda --models vit_base_patch16_224 --batch 128 --calib-batches 8

Prints two tables and their ratios:
* evaluation images/s of the FP32 model (QVit in FP32 mode = timm with the softmax visible, and
  timm's fused attention for reference) and of each recipe's fake-quant model, with
  ``INT8 time / FP32 time`` (target <= 1.5x, the integer softmax included);
* calibration seconds per image for each observer (default recipe with ``--observer NAME``): what
  test_qvit.py runs (utils.engine.calibrate: the histograms' range pass, the counting pass and the
  final range searches), with the ratio to MinMax (target <= 3x for KL and OMSE).

``--device cuda`` times on the GPU (inputs already on it, synchronised around every timed call).

Timings are medians over ``--iters`` timed batches after one warm-up batch; FP32 and INT8 batches
alternate and the ratio is the median of the per-pair ratios. Inputs are real images
from ``--data`` when given (calibration statistics depend a little on the data), random tensors
otherwise; weights are random unless the model is DeiT-tiny and ../shared holds its checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: the library imports from the repository root only as a package
    sys.exit("error: run it from the repository root as: python -m bench.bench_qvit ...")

import torch

from bench.common import build_qvit, deit_checkpoint, image_batches
from models.quant_vit import QVit
from quant_config import available_recipes, load_recipe
from utils.checkpoint import create_model
from utils.engine import calibrate
from utils.timing import synchronized, timed, timed_pairs

OBSERVERS = ("minmax", "percentile", "omse", "kl")


def bench_eval(model_name: str, recipes: list[str], xs: list[torch.Tensor], iters: int, checkpoint: Path | None, device: torch.device) -> list[dict]:
    rows = []
    x = xs[0]
    fused = create_model(model_name, pretrained=False).eval().to(device)
    with torch.inference_mode():
        t_fused = timed(lambda: fused(x), iters)
    for name in recipes:
        # Built outside inference mode: a recipe's Fisher scale search back-propagates through the weights.
        # Block reconstruction only changes which integer each weight rounds to, not the evaluation's
        # cost: left out here, where it would take minutes per recipe on a CPU.
        qvit = build_qvit(model_name, load_recipe(name, {"reconstruction": None}), checkpoint).to(device)
        calibrate(qvit, [(cx, None, 0) for cx in xs[:2]], device, progress=False)

        def fp32(qvit: QVit = qvit) -> None:
            with qvit.fp32():
                qvit(x)

        with torch.inference_mode():
            t_fp32, t_int8, ratio = timed_pairs(fp32, lambda qvit=qvit: qvit(x), iters)
        rows.append(dict(model=model_name, recipe=name, fused=len(x) / t_fused, fp32=len(x) / t_fp32, int8=len(x) / t_int8, ratio=ratio))
    return rows


@torch.inference_mode()
def bench_calibration(model_name: str, xs: list[torch.Tensor], checkpoint: Path | None, device: torch.device) -> list[dict]:
    rows = []
    images = sum(len(x) for x in xs)
    for observer in OBSERVERS:
        # What `test_qvit.py --observer NAME` does: the activation and layernorm_input kinds.
        overrides = {f"{k}.observer": observer for k in ("activation", "layernorm_input")}
        qvit = build_qvit(model_name, load_recipe("fqvit_w8a8_att8", overrides), checkpoint).to(device)
        with qvit.fp32():
            qvit(xs[0][:2])  # warm-up allocations outside the timed region
        run = synchronized(lambda qvit=qvit: calibrate(qvit, [(x, None, 0) for x in xs], device, progress=False))
        start = time.perf_counter()
        run()
        seconds = time.perf_counter() - start
        rows.append(dict(model=model_name, observer=observer, s_per_img=seconds / images))
    base = rows[0]["s_per_img"]
    for row in rows:
        row["ratio"] = row["s_per_img"] / base
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deit_tiny_patch16_224,vit_base_patch16_224")
    p.add_argument("--recipes", default=",".join(available_recipes()))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5, help="timed batches per measurement (median)")
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--data", type=Path, default=None, help="ImageNet-layout split with real images (e.g. ../shared/data/imagenet-mini/train)")
    p.add_argument("--skip-calibration", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, batch {args.batch}")
    eval_rows, calib_rows = [], []
    for model_name in args.models.split(","):
        checkpoint = deit_checkpoint(model_name)
        xs = [x.to(device) for x in image_batches(model_name, args.data, args.batch, max(args.calib_batches, 2))]
        eval_rows += bench_eval(model_name, args.recipes.split(","), xs, args.iters, checkpoint, device)
        if not args.skip_calibration:
            calib_rows += bench_calibration(model_name, xs[: args.calib_batches], checkpoint, device)

    print("\nEvaluation throughput (images/s; ratio = median of paired INT8 time / FP32 time, target <= 1.5)")
    print("| model | recipe | FP32 timm fused | FP32 (QVit) | INT8 fake-quant | ratio |\n|---|---|---:|---:|---:|---:|")
    for r in eval_rows:
        print(f"| {r['model']} | {r['recipe']} | {r['fused']:.1f} | {r['fp32']:.1f} | {r['int8']:.1f} | {r['ratio']:.2f}x |")
    if calib_rows:
        print("\nCalibration (fqvit_w8a8_att8 --observer NAME, every pass and all scales; ratio to MinMax, target <= 3)")
        print("| model | observer | s / image | s per 1000 images | ratio |\n|---|---|---:|---:|---:|")
        for r in calib_rows:
            print(f"| {r['model']} | {r['observer']} | {r['s_per_img']:.4f} | {1000 * r['s_per_img']:.1f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
