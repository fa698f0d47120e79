"""Scale search: each activation scale chosen by what its error does downstream, not by the tensor alone.

Range estimators (MinMax, percentile, KL, OMSE) judge a quantized tensor by itself. What matters is
the output of the operation that reads it: a Linear weights its input channels unequally, and the
attention matmul weighs each attention probability by the value rows it mixes. PTQ4ViT (arXiv
2111.12293, Sec. 3.2: "Hessian guided metric" / output similarity) and APQ-ViT (arXiv 2303.14341)
therefore search each scale against the layer output. Here, after calibration, for every
``activation`` / ``attention`` / ``layernorm_input`` point with a scale ``s`` (and its zero point kept,
so the range is ``r * [lo, hi]``), the candidates ``r`` in ``[min_ratio, 1]`` are scored by

    sum over batches of || op(Q_{r s}(x)) - op_fp(x) ||^2

where ``op`` is the consumer with its other operand as deployed: ``F.linear(., Q(W))`` for a Linear
input (``op_fp`` uses the float weight, so the weight's own error is in the baseline), ``. @ k^T`` /
``q @ .^T`` for the query and key, ``. @ v`` for the attention map, ``A @ .`` for the values. Every
point is scored on the float model's activations in one pass (no sequential dependency, so one pass
and ``torchrun`` combine: the sums are all-reduced), on an evenly strided subset of at most ``rows``
rows per batch (quantization is elementwise, so a row subset is an unbiased sample of the error).
With ``r = 1`` a candidate, the chosen scale never scores worse than the calibrated one on that data.

``metric: fisher`` scores a candidate instead by PTQ4ViT's Hessian-guided form in its diagonal-Fisher
approximation (the estimator of ``utils/sensitivity.py``; BRECQ arXiv 2102.05426 Sec. 3.2):

    sum over batches of || g * (Q_{r s}(x) - x) ||^2,   g = dL/dx

with ``L`` the cross-entropy of the FP32 model against its own top-1 class (no labels needed; images it
is sure of weigh little, those near a flip a lot). Errors are weighted by how much the loss feels them:
the class token's row counts for more than a background patch's, and clipping the few attention
peaks the prediction rests on is expensive although it lowers the plain output MSE. One backward pass
per batch, then an elementwise score per candidate (no extra matmuls).

Weights and log2 grids (their scale must stay a power of two) are left alone. A per-channel point
(FQ-ViT's PTF LayerNorm input: scales ``s * 2^k_c``) moves all its scales by the same ratio, which keeps
the power-of-two steps between channels. The ``output`` metric scores only the inputs of matmuls (Linear
inputs, q, k, v and the attention map); ``fisher`` also the LayerNorm inputs, the integer softmax's
scores and the patch embedding's image.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.ptq.layers import QuantAttention, QuantLinear
from models.ptq.collectives import all_reduce_
from models.ptq.tensor_quantizer import TensorQuantizer
from quant_config import ScaleSearchSpec

__all__ = ["ScaleSearch", "searchable", "search_scales"]


def searchable(q: TensorQuantizer) -> bool:
    """Whether the search refines this point: an enabled, calibrated activation, attention map or LayerNorm
    input (per channel: all its scales move together, so PTF's power-of-two ratios stay) whose scale
    need not be a power of two (log2's must)."""
    return (
        q.spec is not None
        and q.enabled
        and q.is_calibrated
        and q.kind in ("activation", "attention", "layernorm_input")
        and not q.method.power_of_two_scale
    )


@dataclass
class _Point:
    quantizer: TensorQuantizer
    ratios: list[float]
    errors: Tensor  # (K,) float64 on the quantizer's device, summed over batches
    scale: float | Tensor  # the calibrated parameters, read once (tensors for a per-channel point)
    zero_point: float | Tensor

    @classmethod
    def of(cls, q: TensorQuantizer, ratios: list[float]) -> "_Point":
        errors = torch.zeros(len(ratios), dtype=torch.float64, device=q.scale.device)
        if q.per_channel:
            return cls(q, ratios, errors, q.scale.detach().clone(), q.zero_point.detach().clone())
        return cls(q, ratios, errors, q.scale_value, float(q.zero_point))

    @torch.no_grad()
    def score(self, x: Tensor, op: Callable[[Tensor], Tensor], reference: Tensor) -> None:
        q = self.quantizer
        zero_point = q.broadcast(self.zero_point, x) if q.per_channel else self.zero_point
        errors = []
        for ratio in self.ratios:
            scale = q.broadcast(self.scale * ratio, x) if q.per_channel else self.scale * ratio
            out = op(q.fake_quant_with(x, scale, zero_point))
            errors.append((out - reference).square().sum(dtype=torch.float64))
        # Out of place: the buffer may have been made in inference mode, the fisher batches run outside it.
        self.errors = self.errors + torch.stack(errors)


def _rows(t: Tensor, limit: int) -> Tensor:
    """At most about ``limit`` rows of ``t`` (..., rows, features): every k-th along the rows axis."""
    lead = math.prod(t.shape[:-2])
    stride = max(1, math.ceil(lead * t.shape[-2] / limit))
    return t[..., ::stride, :]


class ScaleSearch:
    """Hooks that score candidate scales while the float model runs; :meth:`apply` sets the winners.

    The ``fisher`` metric needs gradients: its batches must run outside ``torch.inference_mode`` (the
    hooks turn gradients on themselves and never touch the parameters' ``.grad``).
    """

    def __init__(self, model: nn.Module, spec: ScaleSearchSpec) -> None:
        self.spec = spec
        self.points: dict[str, _Point] = {}
        self._hooks: list = []
        self._captured: list[tuple[_Point, Tensor]] = []  # fisher: this batch's tensors, in the graph
        ratios = torch.linspace(spec.min_ratio, 1.0, spec.candidates, dtype=torch.float64).tolist()
        for name, q in model.named_modules():
            if isinstance(q, TensorQuantizer) and searchable(q):
                self.points[name] = _Point.of(q, ratios)
        self._by_quantizer = {id(p.quantizer): p for p in self.points.values()}
        if spec.metric == "fisher":
            self._hooks.append(model.register_forward_pre_hook(self._track_input))
            self._hooks.append(model.register_forward_hook(self._backward))
            self._hooks += [point.quantizer.register_forward_hook(self._capture) for point in self.points.values()]
        else:
            for module in model.modules():
                if isinstance(module, QuantLinear):
                    self._hooks.append(module.register_forward_pre_hook(self._linear_hook(module)))
                elif isinstance(module, QuantAttention):
                    self._hooks.append(module.register_forward_hook(self._attention_hook(module)))

    # -- fisher --------------------------------------------------------------------------------------
    @staticmethod
    def _track_input(_model: nn.Module, args: tuple) -> tuple:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("the fisher scale search needs gradients: run its batches outside torch.inference_mode")
        # A fresh leaf that wants a gradient: every activation after it joins the graph, frozen weights or not.
        return (args[0].detach().clone().requires_grad_(True), *args[1:])

    def _capture(self, quantizer: TensorQuantizer, _args: tuple, output: Tensor) -> None:
        self._captured.append((self._point(quantizer), output))

    def _backward(self, _model: nn.Module, _args: tuple, logits: Tensor) -> None:
        captured, self._captured = self._captured, []
        if not captured:
            return
        loss = F.cross_entropy(logits, logits.detach().argmax(dim=1), reduction="sum")
        grads = torch.autograd.grad(loss, [t for _, t in captured], allow_unused=True)
        with torch.no_grad():
            for (point, x), g in zip(captured, grads):
                if g is None:
                    continue
                x, g = x.detach(), g.detach()
                if x.dim() >= 2:
                    x, g = _rows(x, self.spec.rows), _rows(g, self.spec.rows)
                point.score(x, lambda t, g=g: t * g, x * g)

    def _point(self, q: TensorQuantizer) -> _Point | None:
        return self._by_quantizer.get(id(q))

    # -- output ----------------------------------------------------------------------------------------
    def _linear_hook(self, module: QuantLinear):
        def hook(_module: nn.Module, args: tuple) -> None:
            point = self._point(module.input_quant)
            if point is None:
                return
            x = _rows(args[0].detach().reshape(-1, module.in_features), self.spec.rows)
            weight = module.weight_quant.quantize(module.weight) if module.weight_quant.enabled else module.weight
            point.score(x, lambda t: F.linear(t, weight, module.bias), F.linear(x, module.weight, module.bias))

        return hook

    def _attention_hook(self, module: QuantAttention):
        def hook(_module: nn.Module, args: tuple, _output: Tensor) -> None:
            x = args[0].detach()
            B, N, _ = x.shape
            # Not module.qkv(x): that would run (and score) the qkv input's hook a second time.
            qkv = F.linear(x, module.qkv.weight, module.qkv.bias).reshape(B, N, 3, module.num_heads, module.head_dim)
            qkv = qkv.permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            q, k = module.q_norm(q) * module.scale, module.k_norm(k)
            kt = k.transpose(-2, -1)
            q_rows = _rows(q, self.spec.rows)
            attn = (q @ kt).softmax(dim=-1)
            attn_rows = _rows(attn, self.spec.rows)
            ops = (
                (module.q_act.input_quant, q_rows, lambda t: t @ kt),
                (module.k_act.input_quant, k, lambda t: q_rows @ t.transpose(-2, -1)),
                (module.softmax.output_quant, attn_rows, lambda t: t @ v),
                (module.v_act.input_quant, v, lambda t: attn_rows @ t),
            )
            for quantizer, tensor, op in ops:
                point = self._point(quantizer)
                if point is not None:
                    point.score(tensor, op, op(tensor))

        return hook

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def apply(self) -> dict[str, float]:
        """Set every point's scale to its best candidate (errors summed over processes); returns the ratios."""
        chosen = {}
        for name, point in self.points.items():
            errors = all_reduce_(point.errors, "sum")
            if not bool(errors.any()):
                continue  # the point saw no data in this pass: keep its calibrated scale
            ratio = point.ratios[int(errors.argmin())]
            point.quantizer.rescale(ratio)
            chosen[name] = ratio
        return chosen


@contextlib.contextmanager
def search_scales(model: nn.Module, spec: ScaleSearchSpec) -> Iterator[ScaleSearch]:
    """Score candidates on every batch run inside; the caller applies them on a clean exit."""
    search = ScaleSearch(model, spec)
    try:
        yield search
    finally:
        search.remove()
