#!/usr/bin/env python
"""Accuracy of every shipped recipe on real data: the README's accuracy tables, rerunnable.

    python -m bench.accuracy_table --model deit_tiny_patch16_224 \\
        --checkpoint ../shared/weights/deit_tiny_patch16_224.pth --data ../shared/data/imagenet-mini
    python -m bench.accuracy_table ... --recipes fqvit_w8a8_att8 --observers minmax,percentile,omse,kl

Each recipe runs with its own observers, or once per ``--observers`` name (``test_qvit.py --observer``).

Each cell is one ordinary ``test_qvit.py`` run (its folder lands under ``--log-dir``); the script then
prints a Markdown table of FP32 / INT8 top-1, the drop, FP32-vs-INT8 top-1 agreement, the mean logit
cosine and the calibration seconds, and writes the table beside the run folders.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

if not __package__:  # run as a file: the library imports from the repository root only as a package
    sys.exit("error: run it from the repository root as: python -m bench.accuracy_table ...")

import test_qvit
from quant_config import available_recipes
from utils.run_dir import write_text_atomic

OBSERVERS = ("minmax", "percentile", "omse", "kl")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data", help="ImageNet-layout root with train/ (calibration) and val/ (evaluation)")
    p.add_argument("--calib-dir", help="calibration split (instead of DATA/train), e.g. bench/holdout_split.py's calib/")
    p.add_argument("--val-dir", help="evaluation split (instead of DATA/val), e.g. bench/holdout_split.py's held/")
    p.add_argument("--recipes", default=",".join(available_recipes()))
    p.add_argument("--observers", default="recipe",
                   help=f"'recipe' (each recipe's own observers) or a comma list of {', '.join(OBSERVERS)} for --observer")
    p.add_argument("--calib-size", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--log-dir", default="log/accuracy")
    args = p.parse_args()
    if not args.data and not (args.calib_dir and args.val_dir):
        p.error("give --data, or both --calib-dir and --val-dir")
    splits = [arg for name in ("data", "calib_dir", "val_dir") if getattr(args, name)
              for arg in ("--" + name.replace("_", "-"), getattr(args, name))]

    rows = []
    for recipe in args.recipes.split(","):
        for observer in args.observers.split(","):
            argv = ["--model", args.model, *splits, "--config", recipe,
                    "--calib-size", str(args.calib_size), "--batch-size", str(args.batch_size),
                    "--log-dir", args.log_dir, "--no-progress", "--no-profile"]
            if observer != "recipe":
                argv += ["--observer", observer]
            if args.checkpoint:
                argv += ["--checkpoint", args.checkpoint]
            print(f"== {recipe} / {observer}", flush=True)
            cli = test_qvit.build_parser().parse_args(argv)
            try:
                run_dir = test_qvit.run(cli)
            except Exception as exc:  # keep the other cells
                print(f"   failed: {exc}", flush=True)
                continue
            s = json.loads((run_dir / "qvit_summary.json").read_text())
            rows.append((recipe, observer, s, run_dir))
    if not rows:  # nothing measured: no table file whose emptiness could be mistaken for a result
        print("error: every run failed; no table written", file=sys.stderr)
        return 1

    lines = [
        f"{args.model}, {rows[0][2]['calib_samples']} calibration images, "
        f"{rows[0][2]['int8']['samples']} evaluation images, {dt.date.today().isoformat()}",
        "",
        "| recipe | observer | FP32 top-1 | INT8 top-1 | drop | agreement | logit cosine | calibration s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for recipe, observer, s, _ in rows:
        drop = s["fp32"]["top1"] - s["int8"]["top1"]
        lines.append(
            f"| {recipe} | {observer} | {s['fp32']['top1']:.1f} | {s['int8']['top1']:.1f} | {drop:.1f} | "
            f"{s['agreement_top1']:.3f} | {s['logit_cosine_mean']:.4f} | {s['timings_s']['calibration']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    out = Path(args.log_dir) / f"accuracy_{dt.datetime.now():%Y%m%d-%H%M%S}.md"
    write_text_atomic(out, table + "\n\nRun folders:\n" + "\n".join(f"- {r[3]}" for r in rows) + "\n")
    print(out)
    return 0 if len(rows) == len(args.recipes.split(",")) * len(args.observers.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
