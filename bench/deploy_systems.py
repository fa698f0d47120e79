"""What the deployment benchmarks share (bench_deploy.py, crossval_deploy.py): the systems compared (one
FP32 ONNX, NNCF's post-training quantization of it for OpenVINO, our recipes' Q/DQ exports in the forms
convert_tensorrt.py ships to ONNX Runtime and OpenVINO), the images they see, and their accuracy rows
against the PyTorch FP32 logits, with the paired (McNemar) comparison against NNCF's best variant.
"""
from __future__ import annotations

import importlib.util
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from bench.common import build_qvit
from utils.errors import UserError
from utils.metrics import logit_cosine, top1_accuracy, top1_agreement

if TYPE_CHECKING:
    from models.quant_vit import QVit

ACCURACY_MODEL = "deit_tiny_patch16_224"  # the one model with real weights here
NNCF_SQ = "NNCF PTQ, SmoothQuant on"
NNCF_NO_SQ = "NNCF PTQ, SmoothQuant off"
FP32 = "FP32"
TITLES = {"torch": "PyTorch", "ort": "ONNX Runtime", "openvino": "OpenVINO"}
LOADER_BATCH = 32


def parse_list(flag: str, text: str) -> list[str]:
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    if not names:
        raise UserError(f"{flag} {text!r}: no name given")
    return names


def check_tools() -> None:
    """NNCF and both CPU runtimes importable, checked before anything slow starts."""
    if importlib.util.find_spec("nncf") is None:
        raise UserError("nncf is not installed (the deployment benchmarks need it): pip install -r requirements-bench.txt")
    from utils.runtimes import CPU_RUNTIMES, unavailable_reason

    for runtime in CPU_RUNTIMES:
        reason = unavailable_reason(runtime)
        if reason:
            raise UserError(reason)


def quiet_tools() -> None:
    """Keep the progress lines readable: the ONNX tracer warns about every Python float/bool it records
    (the exports are checked by the accuracy rows), and NNCF's INFO lines would bury everything else."""
    import nncf

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    nncf.set_log_level(30)  # WARNING


# -- progress and versions --------------------------------------------------------------------------

_START = time.perf_counter()


def step(text: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {text}", flush=True)


def versions() -> dict[str, str]:
    import nncf
    import onnxruntime
    import openvino

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "nncf": nncf.__version__}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(meta: dict[str, Any]) -> str:
    v = meta["versions"]
    return (f"torch {v['torch']}, onnxruntime {v['onnxruntime']}, openvino {v['openvino']}, nncf {v['nncf']}; "
            f"{meta['threads']} threads everywhere; {meta['cpu']}; {meta['date']}")  # fmt: skip


# -- images -----------------------------------------------------------------------------------------


def data_transform(model_name: str) -> Callable:
    """timm's evaluation preprocessing for ``model_name`` (resize, centre crop, its mean and std)."""
    from timm.data import create_transform, resolve_data_config

    from utils.checkpoint import create_model

    return create_transform(**resolve_data_config(model=create_model(model_name, pretrained=False)))


def load_images(samples: list, transform: Callable, workers: int) -> tuple[list[torch.Tensor], np.ndarray, int]:
    """Decoded batches (kept in memory: every system sees exactly these tensors), labels, unreadable count."""
    from utils.data import make_loader

    images, labels, unreadable = [], [], 0
    for x, y, bad in make_loader(samples, transform, LOADER_BATCH, workers):
        unreadable += bad
        if x is not None:
            images.append(x)
            labels.append(y.numpy())
    if not images:
        raise UserError(f"no readable image among {len(samples)} ({unreadable} unreadable)")
    return images, np.concatenate(labels), unreadable


def calibration_images(calib_dir: Path, count: int, transform: Callable, workers: int) -> list[torch.Tensor]:
    from utils.data import calibration_subset, scan_split

    images, _, unreadable = load_images(calibration_subset(scan_split(calib_dir), count, seed=0), transform, workers)
    if unreadable:
        step(f"  {unreadable} unreadable calibration image(s) skipped")
    return images


def validation_images(val_dir: Path, count: int, transform: Callable, workers: int) -> tuple[list[torch.Tensor], np.ndarray]:
    from utils.data import evenly_spaced, scan_split

    images, labels, unreadable = load_images(evenly_spaced(scan_split(val_dir), count), transform, workers)
    if unreadable:
        step(f"  {unreadable} unreadable evaluation image(s) skipped")
    return images, labels


# -- systems ----------------------------------------------------------------------------------------


@dataclass
class System:
    """One model file in one runtime."""

    name: str  # FP32, NNCF_SQ, NNCF_NO_SQ or a recipe name
    kind: str  # "fp32", "nncf" or "ours"
    runtime: str
    path: Path
    run: Callable[[np.ndarray], np.ndarray]
    seconds: dict[int, list[float]] = field(default_factory=dict)  # batch -> median seconds of each pair it was in

    @property
    def key(self) -> str:
        return f"{self.name} [{TITLES[self.runtime]}]"

    def logits(self, images: list[torch.Tensor]) -> np.ndarray:
        return np.concatenate([self.run(x.numpy()) for x in images])


def export_fp32(qvit: QVit, folder: Path) -> Path:
    """The one FP32 ONNX every FP32 baseline and NNCF start from, exported from an uncalibrated QVit
    (its FP32 mode is timm; calibrating with a recipe's ``reparam`` would fold factors into the weights)."""
    from utils.onnx_export import export_onnx, simplify

    export_onnx(qvit, folder / "fp32.raw.onnx", (224, 224), quantized=False)
    simplify(folder / "fp32.raw.onnx", folder / "fp32.onnx")
    return folder / "fp32.onnx"


@torch.inference_mode()
def torch_logits(qvit: QVit, images: list[torch.Tensor]) -> np.ndarray:
    with qvit.fp32():
        return np.concatenate([qvit(x).numpy() for x in images])


def our_int8(model_name: str, recipe_name: str, checkpoint: Path | None, calib: list[torch.Tensor], folder: Path,
             val: list[torch.Tensor] | None) -> tuple[Path, float, np.ndarray | None]:  # fmt: skip
    """Calibrate ``recipe_name`` on ``calib``, export Q/DQ with uint8 activations and zero points, simplify.
    Returns the ONNX path, the calibration seconds and the fake-quant logits on ``val`` (None without)."""
    from utils.engine import calibrate
    from utils.onnx_export import check_deployable, export_onnx, export_plan, simplify

    qvit = build_qvit(model_name, recipe_name, checkpoint)
    result = calibrate(qvit, [(x, None, 0) for x in calib], torch.device("cpu"), progress=False)
    # A recipe with points Q/DQ cannot express (log2 softmax, PTF, other widths) would deploy as a
    # different model from the one calibrated: refuse it like convert_tensorrt.py does.
    check_deployable(export_plan(qvit, zero_points=True), recipe_name, "ONNX Runtime and OpenVINO", "8-bit uniform", "Not benchmarked.")
    stem = Path(recipe_name).stem  # a shipped name or a recipe file's path
    raw, final = folder / f"{stem}.int8.raw.onnx", folder / f"{stem}.int8.onnx"
    export_onnx(qvit, raw, (224, 224), quantized=True, zero_points=True)
    simplify(raw, final)
    # The calibrated fake-quant model's logits: a gap between them and the runtimes' is the export's.
    fake_quant = fake_quant_logits(qvit, val) if val is not None else None
    return final, result.seconds, fake_quant


@torch.inference_mode()
def fake_quant_logits(qvit: QVit, images: list[torch.Tensor]) -> np.ndarray:
    return np.concatenate([qvit(x).numpy() for x in images])


def nncf_int8(fp32_onnx: Path, calib: list[torch.Tensor], smooth_quant: bool, xml: Path) -> float:
    """NNCF's PTQ of the FP32 ONNX for OpenVINO, saved as IR at ``xml``; returns its seconds."""
    import nncf
    import openvino as ov

    # One image per item, so that subset_size counts images and NNCF sees every calibration image.
    items = [x[i : i + 1].numpy() for x in calib for i in range(len(x))]
    # SmoothQuant off: a negative alpha removes the step (convolution's default is already -1).
    advanced = None if smooth_quant else nncf.AdvancedQuantizationParameters(smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    start = time.perf_counter()
    quantized = nncf.quantize(ov.convert_model(str(fp32_onnx)), nncf.Dataset(items, lambda item: item),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items), advanced_parameters=advanced)  # fmt: skip
    seconds = time.perf_counter() - start
    ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return seconds


def deployed(kind: str, runtime: str, path: Path) -> Path:
    """The file a runtime runs: our INT8 exports in each runtime's own form, as convert_tensorrt.py
    writes it (OpenVINO IR, ONNX Runtime's int8.ort.onnx)."""
    if kind != "ours" or runtime not in ("ort", "openvino"):
        return path
    from utils.runtimes import save_deployed

    return save_deployed(runtime, path)[0]


def nncf_variants(fp32_onnx: Path, calib: list[torch.Tensor], folder: Path, what: str) -> list[tuple[str, Path, float]]:
    """NNCF's PTQ with SmoothQuant on and off: (name, IR .xml, seconds) each; ``what`` prefixes the progress lines."""
    variants = []
    for name, smooth_quant in ((NNCF_SQ, True), (NNCF_NO_SQ, False)):
        step(f"{what}{name}: nncf.quantize on {sum(len(x) for x in calib)} images")
        xml = folder / f"nncf_{'sq' if smooth_quant else 'nosq'}.xml"
        variants.append((name, xml, nncf_int8(fp32_onnx, calib, smooth_quant, xml)))
    return variants


def load_systems(entries: list[tuple[str, str, Path]], threads: int) -> list[System]:
    """Each (name, kind, path) compiled in every runtime it deploys to: NNCF's IR in OpenVINO, the rest in
    ONNX Runtime and OpenVINO (our exports in the form each runtime gets)."""
    from utils.runtimes import load_model

    return [System(name, kind, runtime, path, load_model(runtime, deployed(kind, runtime, path), threads))
            for name, kind, path in entries for runtime in (("openvino",) if kind == "nncf" else ("ort", "openvino"))]  # fmt: skip


# -- accuracy ---------------------------------------------------------------------------------------


def accuracy_row(name: str, runtime: str, logits: np.ndarray, fp32: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    return {
        "system": name,
        "runtime": runtime,
        "top1_agreement_with_fp32": top1_agreement(logits, fp32),
        "logit_cosine_with_fp32": logit_cosine(logits, fp32),
        "top1": top1_accuracy(logits, labels),
    }


def measure_accuracy(systems: list[System], images: list[torch.Tensor], fp32: np.ndarray, labels: np.ndarray,
                     fake_quant: dict[str, np.ndarray]) -> list[dict[str, Any]]:  # fmt: skip
    outputs = [(f"{recipe} (fake-quant)", "torch", logits) for recipe, logits in fake_quant.items()]
    for system in systems:
        step(f"  accuracy: {system.key}")
        outputs.append((system.name, system.runtime, system.logits(images)))
    return accuracy_rows(outputs, fp32, labels)


def accuracy_rows(outputs: list[tuple[str, str, np.ndarray]], fp32: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    """The FP32 row, then one per (system, runtime, logits), each INT8 one with its McNemar column."""
    rows = [accuracy_row(name, runtime, logits, fp32, labels) for name, runtime, logits in outputs]
    compare_with_best_nncf(rows, [logits for *_, logits in outputs], fp32)
    return [accuracy_row(FP32, "torch", fp32, fp32, labels), *rows]


def compare_with_best_nncf(rows: list[dict[str, Any]], outputs: list[np.ndarray], fp32: np.ndarray) -> None:
    """Each INT8 row gets ``vs_nncf_best``: the images whose FP32 class it alone changes, those NNCF's most
    faithful variant alone changes, and the exact McNemar p-value: whether an agreement gap of a few images
    is a difference at all."""
    import dataclasses

    from utils.metrics import changed_classes

    nncf = [i for i, r in enumerate(rows) if r["system"] in (NNCF_SQ, NNCF_NO_SQ)]
    if not nncf:
        return
    best = max(nncf, key=lambda i: (rows[i]["top1_agreement_with_fp32"], rows[i]["logit_cosine_with_fp32"]))
    for i, row in enumerate(rows):
        if i != best and row["system"] != FP32:
            row["vs_nncf_best"] = {"nncf": rows[best]["system"], **dataclasses.asdict(changed_classes(outputs[i], outputs[best], fp32))}


def accuracy_table(title: str, rows: list[dict[str, Any]]) -> list[str]:
    """``title`` over a markdown table of accuracy rows (measure_accuracy's, compare_with_best_nncf's column)."""
    lines = [title, "| system | runtime | top-1 agreement with FP32 | logit cosine with FP32 | top-1 (%) | FP32 class changed: here only / in NNCF's best only (exact McNemar p) |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        vs = r.get("vs_nncf_best")
        paired = "-" if vs is None else f"{vs['only_first']} / {vs['only_second']} (p {vs['p_value']:.2f})"
        lines.append(f"| {r['system']} | {TITLES[r['runtime']]} | {r['top1_agreement_with_fp32']:.4f} | {r['logit_cosine_with_fp32']:.4f} | {r['top1']:.2f} | {paired} |")
    return lines
