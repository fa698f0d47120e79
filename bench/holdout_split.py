#!/usr/bin/env python
"""Split a calibration folder into calibration and held-out parts, to choose recipe values without
touching the evaluation images (how trt_int8's reparam alpha and attention observer were chosen).

    python -m bench.holdout_split ../shared/data/imagenet-mini/train /tmp/split
    python test_qvit.py --model deit_tiny_patch16_224 --checkpoint ../shared/weights/deit_tiny_patch16_224.pth \\
        --calib-dir /tmp/split/calib --val-dir /tmp/split/held --calib-size 800 --config trt_int8 \\
        --set "reparam={alpha: 0.5}" --no-profile          # compare the printed logit cosine across values

Every ``--every``-th image of the sorted ``<wnid>/<file>`` list (default 5th: 200 of 1000) goes to
``OUT/held``, the rest to ``OUT/calib``, as symbolic links in the same ImageNet layout.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if not __package__:  # run as a file: the library imports from the repository root only as a package
    sys.exit("error: run it from the repository root as: python -m bench.holdout_split ...")

from utils.data import IMAGE_EXTENSIONS


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="ImageNet-layout split, e.g. ../shared/data/imagenet-mini/train")
    p.add_argument("out", type=Path, help="new folder that receives calib/ and held/")
    p.add_argument("--every", type=int, default=5, help="hold out every N-th image (default 5)")
    args = p.parse_args()
    files = sorted(f for f in args.source.glob("*/*") if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        p.error(f"{args.source}: no images in <class>/<file> layout")
    if args.every < 2:
        p.error("--every must be at least 2")
    if args.out.exists():
        p.error(f"{args.out} exists; choose a new folder")
    held = 0
    for i, f in enumerate(files):
        part = "held" if i % args.every == args.every - 1 else "calib"
        held += part == "held"
        target = args.out / part / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f.resolve(), target)
    print(f"{len(files) - held} calibration and {held} held-out images under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
