#!/usr/bin/env python
"""ONNX Runtime (CPU) latency and throughput of the Q/DQ INT8 export against the FP32 export.

    python bench/bench_ort.py                                        # deit_tiny and vit_base, trt_int8, batch 1 and 32
    python bench/bench_ort.py --models vit_base_patch16_224 --batches 32 --iters 5

Per model: build (random weights unless ../shared holds DeiT-tiny's), calibrate the recipe on
``--calib-images`` images (real ones from ``--data`` when given, else random tensors; speed does not
depend on them), export both ONNX models as convert_tensorrt.py does, simplify, and time
``session.run`` (median of ``--iters`` after a warm-up run; FP32 and INT8 alternate (bench_qvit.timed_pairs) so
the shared machine's drift cancels in the ratio). Prints a table and the INT8/FP32 speedups.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench_qvit import SHARED_DEIT, batches, build, timed_pairs  # noqa: E402
from convert_tensorrt import ort_session  # noqa: E402
from quant_config import load_recipe  # noqa: E402
from utils.engine import calibrate  # noqa: E402
from utils.onnx_export import export_onnx, simplify  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deit_tiny_patch16_224,vit_base_patch16_224")
    p.add_argument("--recipe", default="trt_int8")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--data", type=Path, default=None, help="ImageNet-layout split for calibration (e.g. ../shared/data/imagenet-mini/train)")
    args = p.parse_args()

    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, recipe {args.recipe}")
    rows = []
    for model_name in args.models.split(","):
        checkpoint = SHARED_DEIT if model_name == "deit_tiny_patch16_224" and SHARED_DEIT.is_file() else None
        qvit = build(model_name, load_recipe(args.recipe), checkpoint)
        feed = [(x, None, 0) for x in batches(model_name, args.data, 16, -(-args.calib_images // 16))]
        calibrate(qvit, feed, torch.device("cpu"), progress=False)
        with tempfile.TemporaryDirectory() as folder:
            folder = Path(folder)
            sessions = {}
            for name, quantized in (("fp32", False), ("int8", True)):
                export_onnx(qvit, folder / f"{name}.raw.onnx", (224, 224), quantized=quantized)
                simplify(folder / f"{name}.raw.onnx", folder / f"{name}.onnx")
                sessions[name] = ort_session(folder / f"{name}.onnx")
            for batch in (int(b) for b in args.batches.split(",")):
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                t32, t8, time_ratio = timed_pairs(
                    lambda: sessions["fp32"].run(None, {"images": x}), lambda: sessions["int8"].run(None, {"images": x}), args.iters
                )
                ratio = 1 / time_ratio
                rows.append((model_name, batch, 1e3 * t32, 1e3 * t8, batch / t32, batch / t8, ratio))
                print(f"  {model_name} batch {batch}: FP32 {1e3 * t32:.1f} ms, INT8 {1e3 * t8:.1f} ms, {ratio:.2f}x", flush=True)

    print("\n| model | batch | FP32 ms | INT8 ms | FP32 img/s | INT8 img/s | INT8 speedup (paired median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.2f}x |")


if __name__ == "__main__":
    main()
