#!/usr/bin/env python
"""Profiler cost: profiling N images against a quantized evaluation of the same images.

    python -m bench.bench_profiler                                   # deit_tiny, 64 images, both views
    python -m bench.bench_profiler --models deit_tiny_patch16_224,vit_base_patch16_224 --skip-isolated

For each model and recipe, prints the seconds of
* a fake-quant evaluation of the images (what ``test_qvit.py`` does for its INT8 numbers),
* the accumulated profile of the same images (FP32 and quantized model in lock-step, every point's
  statistics streamed, histograms on the first 16 images), as ``test_qvit.py`` runs it by default,
* the isolated view on top of it (``--profile isolated``: one extra partial forward per point),
and the ratios to the evaluation (target for the accumulated view: <= 3x). Evaluation and accumulated
profile alternate ``--iters`` times and the ratio is the median of the per-pair ratios (a shared
machine drifts by 10-20%); the isolated view is timed once. Inputs are real images from ``--data``
when given, random tensors otherwise; weights are random unless ../shared holds the DeiT-tiny checkpoint.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: the library imports from the repository root only as a package
    sys.exit("error: run it from the repository root as: python -m bench.bench_profiler ...")

import torch

from bench.common import build_qvit, deit_checkpoint, image_batches
from utils.engine import calibrate
from utils.profiler import run_profile
from utils.timing import timed_pairs


def bench(model_name: str, recipe: str, xs: list[torch.Tensor], iters: int, isolated: bool) -> dict:
    qvit = build_qvit(model_name, recipe, deit_checkpoint(model_name))
    feed = [(x, None, 0) for x in xs]
    calibrate(qvit, feed, torch.device("cpu"), progress=False)

    @torch.inference_mode()
    def evaluate() -> None:
        for x in xs:
            qvit(x)

    def accumulated() -> None:
        run_profile(qvit, feed)

    t_eval, t_acc, ratio = timed_pairs(evaluate, accumulated, iters)
    row = dict(model=model_name, recipe=recipe, images=sum(len(x) for x in xs), eval=t_eval, acc=t_acc, ratio=ratio)
    if isolated:
        start = time.perf_counter()
        totals = run_profile(qvit, feed, isolated=True).totals
        row.update(iso=time.perf_counter() - start, iso_part=totals["seconds_isolated"], points=totals["points"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deit_tiny_patch16_224")
    p.add_argument("--recipes", default="fqvit_w8a8_att8,fqvit_w8a8_att4")
    p.add_argument("--images", type=int, default=64, help="images profiled (test_qvit.py's --profile-samples default)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=3, help="evaluation / profile pairs timed (median)")
    p.add_argument("--data", type=Path, default=None, help="ImageNet-layout split with real images (e.g. ../shared/data/imagenet-mini/val)")
    p.add_argument("--skip-isolated", action="store_true", help="time the accumulated view only")
    args = p.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images in batches of {args.batch}")
    rows = []
    for model_name in args.models.split(","):
        count = -(-args.images // args.batch)
        xs = image_batches(model_name, args.data, args.batch, count)
        xs[-1] = xs[-1][: args.images - args.batch * (count - 1)]
        for recipe in args.recipes.split(","):
            rows.append(bench(model_name, recipe, xs, args.iters, not args.skip_isolated))

    print("\nSeconds; ratios to the fake-quant evaluation of the same images (accumulated: paired median, target <= 3)")
    print("| model | recipe | points | eval INT8 | accumulated profile | ratio | isolated profile | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        iso = f"{r['iso']:.1f} | {r['iso'] / r['eval']:.1f}x" if "iso" in r else "- | -"
        points = r.get("points", "-")
        print(f"| {r['model']} | {r['recipe']} | {points} | {r['eval']:.2f} | {r['acc']:.2f} | {r['ratio']:.2f}x | {iso} |")


if __name__ == "__main__":
    main()
