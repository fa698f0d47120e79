#!/usr/bin/env python
"""The integer-only program's speed and size: int_only.onnx in ONNX Runtime against fp32.onnx and against
cpu_int8's ONNX Runtime form, and the PyTorch integer executor against the FP32 / FP16 model.

    python -m bench.bench_integer                                   # deit_tiny + vit_base, batch 1 and 32
    python -m bench.bench_integer --models vit_base_patch16_224 --batches 32 --iters 5
    python -m bench.bench_integer --torch --device cuda --models vit_base_patch16_224 --batches 32   # a GPU

For each model, one process: the same weights (DeiT-tiny's real ones with ``--checkpoint``, random
ones otherwise: speed only), calibrated on ``--calib-images`` images (``--data``'s train split, or
random images) with ``--recipe`` (default fqvit_w8a8_att8) and with cpu_int8 (its Fisher scale search
and bias correction off: they change values, not the graph, and take minutes on ViT-B); then
``fp32.onnx``, ``int_only.onnx`` (utils/integer_onnx.py, simplified as convert_tensorrt.py does) and
cpu_int8's ``int8.ort.onnx`` in ONNX Runtime (``--threads``, default 2), each INT8 file timed against
``fp32.onnx`` and ``int_only.onnx`` against ``int8.ort.onnx``, alternately (utils.timing.timed_pairs:
medians of ``--iters`` pairs, the median of the per-pair ratios). With ``--torch``, the PyTorch integer
executor against the FP32 model (and FP16 on a GPU) on ``--device``. Prints a table; ``--json PATH``
writes every number.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:
    sys.exit("error: run it from the repository root as: python -m bench.bench_integer ...")

import torch

from bench.common import build_qvit, deit_checkpoint, image_batches
from bench.deploy_systems import cpu_name, parse_list, step
from models.integer import IntegerUnsupported
from quant_config import ConfigError, load_recipe
from utils.errors import ArgumentParser, UserError, parse_batches, run_script
from utils.run_dir import write_json_atomic
from utils.runtimes import load_model
from utils.timing import timed_pairs


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deit_tiny_patch16_224,vit_base_patch16_224")
    p.add_argument("--recipe", default="fqvit_w8a8_att8", help="the integer recipe (default fqvit_w8a8_att8)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--iters", type=int, default=10, help="timed pairs per cell (batch >= 32 on ViT-B: a third, at least 3)")
    p.add_argument("--calib-images", type=int, default=64)
    p.add_argument("--data", type=Path, default=None, help="ImageNet layout (its train/ calibrates); random images without")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch", action="store_true", help="also time the PyTorch integer executor against the FP32 (and, on a GPU, FP16) model")
    p.add_argument("--device", default="cpu", help="the PyTorch executor's device with --torch")
    p.add_argument("--json", type=Path, default=None)
    return p


def pair(name: str, first, second, x, iters: int) -> dict:
    """``second`` against ``first`` (paired): its speed ratio (>1: faster)."""
    t1, t2, ratio = timed_pairs(lambda: first(x), lambda: second(x), iters)
    return {"pair": name, "batch": len(x), "first_ms": 1e3 * t1, "second_ms": 1e3 * t2, "speedup": 1 / ratio, "iters": iters}


def half(model):
    """``model`` under CUDA autocast to float16 (the FP16 baseline)."""

    def run(x):
        with torch.autocast("cuda", dtype=torch.float16):
            return model(x)

    return run


def bench_model(model_name: str, args: argparse.Namespace, batches: list[int], folder: Path) -> dict:
    from models.integer.lower import lower
    from models.integer.program import run as run_program
    from utils.engine import calibrate
    from utils.integer_onnx import save_int_only
    from utils.onnx_export import export_onnx, simplify
    from utils.runtimes import save_deployed

    checkpoint = deit_checkpoint(model_name)
    calib = image_batches(model_name, args.data / "train" if args.data else None, 16, max(1, args.calib_images // 16))
    result: dict = {"model": model_name, "weights": "checkpoint" if checkpoint else "random (speed only)", "pairs": []}
    files = {}
    for recipe in (args.recipe, "cpu_int8"):
        overrides = {"scale_search": None, "bias_correction": None} if recipe == "cpu_int8" else None
        step(f"{model_name}: calibrate {recipe} on {sum(len(x) for x in calib)} images")
        qvit = build_qvit(model_name, load_recipe(recipe, overrides), checkpoint)
        calibrate(qvit, [(x, None, 0) for x in calib], torch.device("cpu"), progress=False)
        if recipe == args.recipe:
            program = lower(qvit)
            save_int_only(program, folder / "int_only.onnx")
            export_onnx(qvit, folder / "fp32.raw.onnx", (224, 224), quantized=False)
            simplify(folder / "fp32.raw.onnx", folder / "fp32.onnx")
            files.update(fp32=folder / "fp32.onnx", int_only=folder / "int_only.onnx")
            integer_qvit = qvit
        else:
            export_onnx(qvit, folder / "int8.raw.onnx", (224, 224), quantized=True, zero_points=True)
            simplify(folder / "int8.raw.onnx", folder / "int8.onnx")
            files["cpu_int8"] = save_deployed("ort", folder / "int8.onnx")[0]
    result["bytes"] = {name: path.stat().st_size for name, path in files.items()}
    result["int_only_vs_fp32_size"] = result["bytes"]["int_only"] / result["bytes"]["fp32"]
    sessions = {name: load_model("ort", path, args.threads) for name, path in files.items()}
    pool = torch.cat(calib)
    for batch in batches:
        x = torch.cat([pool] * (-(-batch // len(pool))))[:batch].numpy()
        iters = max(3, args.iters // 3) if checkpoint is None and batch >= 32 else args.iters
        for first, second in (("fp32", "int_only"), ("fp32", "cpu_int8"), ("cpu_int8", "int_only")):
            step(f"{model_name} batch {batch}: ONNX Runtime {second} vs {first}, {iters} pairs")
            result["pairs"].append(pair(f"ort {second} vs {first}", sessions[first], sessions[second], x, iters))
    if args.torch:
        device = torch.device(args.device)
        qvit = integer_qvit.to(device)
        constants = program.constants(device)
        for batch in batches:
            x = torch.cat([pool] * (-(-batch // len(pool))))[:batch].to(device)
            with torch.inference_mode():
                integer = lambda x: run_program(program, x, constants=constants)[program.output]  # noqa: E731
                with qvit.fp32():
                    step(f"{model_name} batch {batch}: PyTorch integer executor vs FP32 on {device}")
                    result["pairs"].append(pair(f"torch integer vs fp32 ({device})", qvit, integer, x, max(3, args.iters // 3)))
                    if device.type == "cuda":
                        result["pairs"].append(pair(f"torch integer vs fp16 ({device})", half(qvit), integer, x, max(3, args.iters // 3)))
    return result


def table(results: list[dict]) -> str:
    lines = ["| model | pair | batch | first ms | second ms | second's speed / first's |", "|---|---|---:|---:|---:|---:|"]
    for r in results:
        for p in r["pairs"]:
            lines.append(f"| {r['model']} | {p['pair']} | {p['batch']} | {p['first_ms']:.1f} | {p['second_ms']:.1f} | {p['speedup']:.2f}x |")
    lines.append("")
    for r in results:
        b = r["bytes"]
        lines.append(f"{r['model']} ({r['weights']}): int_only.onnx {b['int_only'] / 2**20:.1f} MiB = {r['int_only_vs_fp32_size']:.3f}x fp32.onnx; "
                     f"cpu_int8 {b['cpu_int8'] / 2**20:.1f} MiB")  # fmt: skip
    return "\n".join(lines)


def bench(args: argparse.Namespace) -> str:
    models = parse_list("--models", args.models)
    batches = parse_batches("--batches", args.batches)
    refusal = load_recipe(args.recipe).integer_refusal()
    if refusal is not None:
        raise UserError(f"--recipe {args.recipe}: {refusal}")
    if args.data is not None and not (args.data / "train").is_dir():
        raise UserError(f"--data {args.data}: no train/ folder")
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"--json {args.json}: no such directory {args.json.parent}")
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_integer-") as tmp:
        for model_name in models:
            folder = Path(tmp) / model_name
            folder.mkdir()
            results.append(bench_model(model_name, args, batches, folder))
    meta = {"cpu": cpu_name(), "threads": args.threads, "recipe": args.recipe, "torch": torch.__version__}
    if args.json:
        write_json_atomic(args.json, {"meta": meta, "results": results})
    return f"{meta}\n" + table(results)


def main(argv: list[str] | None = None) -> int:
    return run_script(lambda: bench(build_parser().parse_args(argv)), (UserError, ConfigError, IntegerUnsupported))


if __name__ == "__main__":
    sys.exit(main())
