"""Fisher sensitivity of each quantization point, and what keeping the most sensitive ones in float buys.

Estimator (a second-order Taylor expansion of the loss with the empirical Fisher information in place
of the Hessian, as in Fisher pruning, Theis et al. 2018, arXiv 1801.05787, Eq. 4-6, and the Fisher
approximation of BRECQ, Li et al. 2021, arXiv 2102.05426, Sec. 3.2): quantizing point ``p`` adds the
noise ``d = Q(x) - x`` to its tensor ``x``, and the loss grows by about

    S_p = 1 / (2N) * sum_n sum_i (g_{n,i} * d_{n,i})^2

where ``g_n = dL_n / dx`` is the gradient of image ``n``'s cross-entropy loss (true label) at the
point in the FP32 model, and the sum over ``i`` runs over the tensor's elements: the *diagonal*
empirical Fisher ``F_ii = mean_n g_{n,i}^2`` weighted by each element's own quantization noise. Gradients
are taken image by image (batch size 1), so a weight's gradient is that image's own and the estimator
is the per-sample one the Fisher needs, not the square of a batch mean. S_p >= 0 by construction, and
S_p = 0 for a point whose output does not reach the loss (its gradient is zero) or that adds no noise.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from models.ptq.tensor_quantizer import TensorQuantizer
from models.quant_vit import QVit
from utils.data import Batch
from utils.metrics import classification_metrics
from utils.profiler import point_name

__all__ = ["KeepFpResult", "block_sensitivity", "evaluate_keep_fp", "fisher_sensitivity", "mixed_precision_layers"]

log = logging.getLogger(__name__)


def fisher_sensitivity(qvit: QVit, batches: Iterable[Batch], device: torch.device | str = "cpu", progress: bool = False) -> pd.DataFrame:
    """Per point: ``fisher`` (S_p above, in nats), ``noise_energy`` (mean sum d^2 per image) and
    ``grad_energy`` (mean sum g^2 per image), sorted as the model's quantizers; ``attrs["images"]``."""
    from tqdm import tqdm

    if not qvit.is_calibrated:
        raise RuntimeError("fisher_sensitivity() needs a calibrated QVit")
    device = torch.device(device)
    quantizers = qvit.quantizers()
    index = {id(q): i for i, q in enumerate(quantizers.values())}
    sums = np.zeros((len(quantizers), 3))  # fisher, noise energy, gradient energy
    noise: dict[int, Tensor] = {}

    def on_forward(module: TensorQuantizer, args: tuple, output: Tensor) -> Tensor:
        x = args[0].detach()
        noise[id(module)] = module.fake_quant(x) - x if module.enabled else torch.zeros_like(x)
        # A distinct node, so its gradient is the gradient at the quantizer's output alone (the image
        # itself needs none: a leaf that asks for one).
        y = output.view_as(output) if output.requires_grad else output.detach().requires_grad_()
        y.register_hook(lambda grad, key=id(module): on_gradient(key, grad))
        return y

    def on_gradient(key: int, grad: Tensor) -> None:
        d, g = noise[key].double(), grad.detach().double()
        row = sums[index[key]]
        row[0] += float((g * d).square().sum())
        row[2] += float(g.square().sum())

    images = 0
    start = time.perf_counter()
    handles = [q.register_forward_hook(on_forward) for q in quantizers.values()]
    try:
        with torch.enable_grad(), qvit.fp32():
            for x, y, _ in tqdm(batches, desc="sensitivity", unit="batch", disable=not progress, leave=False):
                if x is None:
                    continue
                for image, label in zip(x.to(device), y.to(device)):
                    noise.clear()
                    loss = F.cross_entropy(qvit(image[None]), label[None])
                    for key, d in noise.items():
                        sums[index[key], 1] += float(d.double().square().sum())
                    loss.backward()
                    images += 1
    finally:
        for h in handles:
            h.remove()
        qvit.zero_grad(set_to_none=True)
        noise.clear()
    if images == 0:
        raise ValueError("no readable image for the sensitivity analysis")
    log.info("Fisher sensitivity of %d points on %d images in %.1f s", len(quantizers), images, time.perf_counter() - start)
    table = pd.DataFrame(
        {
            "name": [point_name(p) for p in quantizers],
            "kind": [q.kind for q in quantizers.values()],
            "enabled": [q.enabled for q in quantizers.values()],
            "fisher": sums[:, 0] / (2 * images),
            "noise_energy": sums[:, 1] / images,
            "grad_energy": sums[:, 2] / images,
        }
    )
    table["rank"] = table["fisher"].rank(ascending=False, method="first").astype(int)
    table.attrs["images"] = images
    return table


def _block_group(name: str) -> str:
    """A point's block: ``block 3`` (ViT), ``stage 1 block 0`` / ``stage 1 PatchMerging`` (Swin), else embed or head."""
    if match := re.match(r"blocks\.(\d+)\.", name):
        return f"block {match.group(1)}"
    if match := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name):
        return f"stage {match.group(1)} block {match.group(2)}"
    if match := re.match(r"layers\.(\d+)\.downsample\.", name):
        return f"stage {match.group(1)} PatchMerging"
    return "embed" if name.startswith(("patch_embed", "cls_token", "pos_embed")) else "head"


def block_sensitivity(table: pd.DataFrame) -> pd.DataFrame:
    """Fisher scores summed per transformer block (a Swin's per stage and block; ``embed`` and ``head``
    for the points outside), in model order."""
    group = table["name"].map(_block_group)
    order = {g: i for i, g in enumerate(dict.fromkeys(group))}
    result = table.assign(group=group).groupby("group", sort=False)["fisher"].agg(["sum", "max", "count"])
    result = result.rename(columns={"sum": "fisher_sum", "max": "fisher_max", "count": "points"})
    return result.sort_index(key=lambda idx: idx.map(order)).reset_index()


def mixed_precision_layers(qvit: QVit, table: pd.DataFrame, keep: int, bits: int) -> tuple[dict[str, dict], list[str]]:
    """A recipe ``layers`` section promoting the ``keep`` most Fisher-sensitive points that have fewer than
    ``bits`` bits to ``bits`` (mixed precision: HAWQ's idea, arXiv 1905.03696, with the diagonal-Fisher
    estimate above in place of the Hessian trace). Points already that wide are passed over, so ``keep``
    counts real promotions. The recipe's own ``layers`` entries come first and the promotions last, which
    wins where both name a point. Returns the section and the promoted quantizer paths."""
    quantizers = {point_name(path): (path, q) for path, q in qvit.quantizers().items()}
    layers = dict(qvit.recipe.layers or {})
    promoted: list[str] = []
    for name in table.sort_values("rank")["name"]:
        if len(promoted) == keep:
            break
        path, q = quantizers[name]
        if not q.enabled or q.spec.bit_type.bits >= bits:
            continue
        layers[path] = {"bit_type": {"bits": bits}}
        promoted.append(path)
    return layers, promoted


@dataclass
class KeepFpResult:
    keep: int
    kept: list[str]
    top1: float
    top5: float
    agreement_top1: float
    logit_cosine: float


@torch.inference_mode()
def evaluate_keep_fp(
    qvit: QVit, batches: Iterable[Batch], ranking: Sequence[str], keeps: Sequence[int], device: torch.device | str = "cpu", progress: bool = False
) -> tuple[dict[str, float], list[KeepFpResult]]:
    """FP32 once per batch, then the quantized model once per K with the first K names of ``ranking``
    switched to float; returns the FP32 top-1/top-5 and one result per K."""
    from tqdm import tqdm

    device = torch.device(device)
    by_name = {point_name(p): q for p, q in qvit.quantizers().items()}
    unknown = [n for n in ranking[: max(keeps, default=0)] if n not in by_name]
    if unknown:
        raise ValueError(f"not quantization points of this model: {', '.join(unknown)}")
    enabled = {name: q.enabled for name, q in by_name.items()}
    labels, fp32_top5 = [], []
    top5 = {k: [] for k in keeps}
    cosine = dict.fromkeys(keeps, 0.0)
    try:
        for x, y, _ in tqdm(batches, desc="keep-fp", unit="batch", disable=not progress, leave=False):
            if x is None:
                continue
            x = x.to(device)
            with qvit.fp32():
                reference = qvit(x)
            fp32_top5.append(reference.topk(5, dim=1).indices.cpu())
            labels.append(y)
            for k in keeps:
                for name, q in by_name.items():
                    q.enabled = enabled[name] and name not in ranking[:k]
                logits = qvit(x)
                top5[k].append(logits.topk(5, dim=1).indices.cpu())
                cosine[k] += float(F.cosine_similarity(reference.float(), logits.float(), dim=1).sum())
    finally:
        for name, q in by_name.items():
            q.enabled = enabled[name]
    if not labels:
        raise ValueError("no readable image to evaluate")
    y_all = torch.cat(labels).numpy()
    fp32 = torch.cat(fp32_top5).numpy()
    fp32_metrics = classification_metrics(y_all, fp32)
    results = []
    for k in keeps:
        pred = torch.cat(top5[k]).numpy()
        metrics = classification_metrics(y_all, pred)
        results.append(
            KeepFpResult(k, list(ranking[:k]), metrics.top1, metrics.top5, float((pred[:, 0] == fp32[:, 0]).mean()), cosine[k] / len(y_all))
        )
    return {"top1": fp32_metrics.top1, "top5": fp32_metrics.top5, "samples": len(y_all)}, results
