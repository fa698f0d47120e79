"""GPTQ weight rounding: each Linear's weights rounded so that its *output* error is small, not its weights'.

Round-to-nearest treats every weight alone. GPTQ (Frantar et al., arXiv 2210.17323, Sec. 3-4; the
Optimal Brain Quantization update of Frantar & Alistarh, arXiv 2208.11580, Eq. 2-3) quantizes a
Linear's input columns one at a time and moves the rounding error of each column onto the columns not
yet quantized, in the direction the layer's inputs make cheapest. With ``H = X^T X`` over the
calibration inputs ``X`` of the layer, the objective is ``|| X W^T - X Q^T ||^2`` and, for column
``i`` with ``Hinv`` the inverse of ``H`` restricted to the columns still free,

    q_i = quant(w_i),   W[:, j] -= (w_i - q_i) * Hinv[i, j] / Hinv[i, i]   for every free column j,

after which column ``i`` leaves ``Hinv`` (``Hinv -= Hinv[:, i] Hinv[i, :] / Hinv[i, i]``). Sec. 4
computes all those rows at once from the upper Cholesky factor of ``H^-1`` and applies them in blocks
(the "lazy batch" updates); the result is the same. ``act_order`` quantizes the columns with the
largest ``H_ii`` first (the authors' "act-order" heuristic: the columns fed by large inputs then
still have every other column to absorb their error). ``damp`` adds ``damp * mean(diag H)`` to the
diagonal so that ``H`` is safely invertible with few tokens.

The grid is the weight quantizer's own, calibrated before (per output channel scales from its
observer): GPTQ picks which level each weight takes, not the levels. Here ``X`` are the FP32
inputs seen in the calibration pass (one pass for all layers, so ``torchrun`` only sums ``H``);
the paper feeds each layer the outputs of the layers quantized before it. The patch embedding's
convolution (kernel = stride) is a Linear on the unfolded patches and is rounded the same way.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.ptq.collectives import all_reduce_
from models.ptq.tensor_quantizer import TensorQuantizer
from quant_config import GPTQSpec

__all__ = ["HessianCollector", "collect_hessians", "gptq_quantize", "input_rows"]


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as the rows its weight, flattened to (out, in), multiplies: a Linear's tokens, or
    a convolution's unfolded patches (the ViT patch embedding: kernel = stride, so one row per patch)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


class HessianCollector:
    """``H = sum x x^T`` of every hooked layer's input rows (at most ``rows`` per batch, evenly strided)."""

    def __init__(self, layers: dict[str, nn.Module], rows: int) -> None:
        self.rows = rows
        self.hessians: dict[str, Tensor] = {}
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = input_rows(module, args[0].detach())
            x = x[:: max(1, math.ceil(x.shape[0] / self.rows))].float()
            h = self.hessians.get(name)
            if h is None:
                h = self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            h.addmm_(x.T, x)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def synchronize(self) -> None:
        """Sum the processes' matrices (``torchrun``); nothing in one process."""
        for h in self.hessians.values():
            all_reduce_(h, "sum")


@contextlib.contextmanager
def collect_hessians(layers: dict[str, nn.Module], rows: int) -> Iterator[HessianCollector]:
    collector = HessianCollector(layers, rows)
    try:
        yield collector
    finally:
        collector.remove()


@torch.no_grad()
def gptq_quantize(weight: Tensor, hessian: Tensor, quantizer: TensorQuantizer, spec: GPTQSpec) -> Tensor:
    """The weight rounded by GPTQ onto ``quantizer``'s calibrated grid (per output channel or per tensor);
    a convolution's (out, in, kh, kw) is rounded as its (out, in * kh * kw) matrix."""
    W = weight.detach().float().reshape(weight.shape[0], -1).clone()
    H = hessian.detach().float().clone()
    columns = W.shape[1]
    dead = torch.diagonal(H) == 0  # inputs that were always 0: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(H), descending=True) if spec.act_order else torch.arange(columns, device=W.device)
    W, H = W[:, order], H[order][:, order]
    H.diagonal().add_(spec.damp * float(torch.diagonal(H).mean()))
    # Upper Cholesky factor of H^-1: its row i holds Hinv[i, i:] / sqrt(Hinv[i, i]) with the earlier columns removed.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    scale = quantizer.scale.float().reshape(-1)
    zero_point = quantizer.zero_point.float().reshape(-1)
    if not quantizer.per_channel:
        scale, zero_point = scale.expand(W.shape[0]), zero_point.expand(W.shape[0])
    method, bit_type = quantizer.method, quantizer.spec.bit_type
    Q = torch.empty_like(W)
    for start in range(0, columns, spec.block):
        end = min(start + spec.block, columns)
        block, errors = W[:, start:end].clone(), torch.empty(W.shape[0], end - start, device=W.device)
        for i in range(end - start):
            w, d = block[:, i], U[start + i, start + i]
            q = method.fake_quant(w, scale, zero_point, bit_type)
            Q[:, start + i] = q
            err = (w - q) / d
            block[:, i:] -= err[:, None] * U[start + i, start + i : end][None, :]
            errors[:, i] = err
        W[:, end:] -= errors @ U[start:end, end:]  # the block's errors onto every later column at once
    return Q[:, torch.argsort(order)].reshape(weight.shape).to(weight.dtype)
