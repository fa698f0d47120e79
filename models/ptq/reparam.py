"""Channel-wise reparameterization of post-LayerNorm activations into per-tensor-friendly ones.

The LayerNorm outputs of a ViT have a few channels far wider than the rest (the LayerNorm affine
amplifies the residual stream's outlier channels), so one per-tensor scale wastes most of its levels on
them. RepQ-ViT (Li et al., ICCV 2023, arXiv 2212.08254, Sec. 4.2 "Post-LayerNorm activations") calibrates
them per channel and then moves the per-channel factors out of the activation: into the LayerNorm's
affine parameters before it and into the input columns of the Linear after it. The float function is
unchanged, the activation quantizer stays per tensor, so TensorRT and ONNX Runtime deploy it as is.

This module implements the symmetric form used for int8 Q/DQ. For each LayerNorm output channel ``j``
with calibrated range ``[lo_j, hi_j]`` and the Linear ``y = W x + b`` that reads it:

* shift ``c_j = (lo_j + hi_j) / 2`` (0 without ``shift``) centres the channel on the grid's zero;
* scale ``s_j = a_j^alpha / w_j^(1 - alpha)`` with ``a_j`` the centred half-range and ``w_j = max_i |W_ij|``
  (SmoothQuant's migration strength, Xiao et al., ICML 2023, arXiv 2211.10438, Sec. 4: ``alpha = 1``
  equalizes the activation channels as RepQ-ViT does; smaller values leave part of the spread in the
  activation so the weight rows, quantized per output channel, do not inherit all of it);
* LayerNorm ``gamma' = gamma / s``, ``beta' = (beta - c) / s``; Linear ``W' = W diag(s)``, ``b' = b + W c``.

Then ``W' x' + b' = W (s * (x - c) / s) + W c + b = W x + b``: only float rounding changes the output.

The MLP's hidden activation (GELU output -> fc2, with ``mlp_alpha``) has the same problem at low
widths - a few wide channels - but no affine before it to fold ``1 / s`` into, so the division stays
in the graph as :class:`~models.ptq.layers.SmoothedGELU`, exactly SmoothQuant's deployed form (its
Sec. 4: the smoothing factor is fused into the previous layer where it can be, else kept as a scale);
fc2's input columns take ``s`` as above. Its factors have no shift: the GELU output's dense values
lie near 0, and centring them there lowered the held-out cosine (docs/recipes.md).

An attention's v (with ``value_alpha``) needs no runtime division at all: proj's input is the
attention-weighted sum of v over tokens, channel by channel, so dividing v's rows of qkv (weight and
bias) by ``s`` divides proj's input channels by ``s``, and proj's columns take ``s`` - the
value/output-projection equivalence RepQ-ViT and Outlier Suppression+ also use. Both v (a matmul
operand) and proj's input get the narrower channels. No shift: a quantized attention map's rows do not
sum to exactly 1, so ``attn @ (v - c)`` is not ``attn @ v - c``.

The factors are kept on the :class:`~models.quant_vit.QVit` (``reparam_factors``) and saved with the
calibrated quantizers, so a calibrated file can be replayed on the original weights.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from models.ptq.layers import SmoothedGELU
from models.ptq.observers import MinMaxObserver
from models.ptq.quantizers import UniformQuantizer
from quant_config import ConfigError, QuantizerSpec, ReparamSpec

__all__ = ["ReparamFactors", "activation_linear_pairs", "apply_factors", "compute_factors", "layernorm_linear_pairs",
           "observe_linear_inputs", "reparam_pairs", "value_projection_pairs"]

# (shift c, scale s) per LayerNorm, MLP activation or attention value, by its module path.
ReparamFactors = dict[str, tuple[Tensor, Tensor]]
# (source module, the Linear reading its output) by pair name.
Pairs = dict[str, tuple[nn.Module, nn.Linear]]


def layernorm_linear_pairs(model: nn.Module) -> dict[str, tuple[nn.LayerNorm, nn.Linear]]:
    """Every LayerNorm whose output feeds exactly one Linear: each ViT or Swin block's norm1 -> attn.qkv
    and norm2 -> mlp.fc1, and each Swin PatchMerging's norm -> reduction."""
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
    from timm.models.vision_transformer import Block

    pairs = {}
    for name, module in model.named_modules():
        if isinstance(module, (Block, SwinTransformerBlock)):
            pairs[f"{name}.norm1"] = (module.norm1, module.attn.qkv)
            pairs[f"{name}.norm2"] = (module.norm2, module.mlp.fc1)
        elif isinstance(module, PatchMerging):
            pairs[f"{name}.norm"] = (module.norm, module.reduction)
    return pairs


def activation_linear_pairs(model: nn.Module) -> dict[str, tuple[SmoothedGELU, nn.Linear]]:
    """Every timm MLP whose GELU output reaches fc2 through nothing but dropout (no norm in between):
    ``{mlp path}.act -> (act, fc2)``, each ViT or Swin block's ``mlp.act``."""
    from timm.layers import Mlp

    return {
        f"{name}.act": (module.act, module.fc2)
        for name, module in model.named_modules()
        if type(module) is Mlp and isinstance(module.act, SmoothedGELU) and isinstance(module.norm, nn.Identity)
    }


def value_projection_pairs(model: nn.Module) -> dict[str, tuple[nn.Linear, nn.Linear]]:
    """Every ViT or Swin attention whose output reaches proj unchanged (no norm in between):
    ``{attention path}.v -> (qkv, proj)``. proj's input channel ``j`` is the attention-weighted sum of
    v's channel ``j`` (the attention map mixes tokens, never channels), so a factor on v's rows of qkv
    reaches it exactly."""
    from timm.models.swin_transformer import WindowAttention
    from timm.models.vision_transformer import Attention

    return {
        f"{name}.v": (module.qkv, module.proj)
        for name, module in model.named_modules()
        if isinstance(module, (Attention, WindowAttention)) and isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)
    }


# The migrations beside the LayerNorm one: the spec key of their strength, the pairs, what a model lacks without them.
_MIGRATIONS = (
    ("mlp_alpha", activation_linear_pairs, "MLP whose GELU feeds its fc2"),
    ("value_alpha", value_projection_pairs, "attention whose output feeds its proj"),
)


def _pair_groups(model: nn.Module, spec: ReparamSpec) -> list[tuple[Pairs, float, bool]]:
    """The pairs ``spec`` reparameterizes, grouped by kind with the kind's strength and whether it shifts
    (only a LayerNorm output is ever shifted)."""
    groups: list[tuple[Pairs, float, bool]] = [(layernorm_linear_pairs(model), spec.alpha, spec.shift)]
    for key, find, what in _MIGRATIONS:
        alpha = getattr(spec, key)
        if alpha is not None:
            found = find(model)
            if not found:
                raise ConfigError(f"reparam.{key}: {type(model).__name__} has no {what}")
            groups.append((found, alpha, False))
    return groups


def reparam_pairs(model: nn.Module, spec: ReparamSpec) -> Pairs:
    """The (source, Linear) pairs ``spec`` reparameterizes: every LayerNorm's, with ``mlp_alpha`` every MLP
    activation's, with ``value_alpha`` every attention's v."""
    return {name: pair for pairs, _, _ in _pair_groups(model, spec) for name, pair in pairs.items()}


@contextlib.contextmanager
def observe_linear_inputs(pairs: Pairs) -> Iterator[dict[str, MinMaxObserver]]:
    """Within: every forward feeds each pair's Linear input to a per-channel MinMax observer.

    Yields ``{pair name: observer}``; ``observer.compute_range()`` gives the channels' [lo, hi].
    """
    observers = {name: MinMaxObserver(QuantizerSpec(), UniformQuantizer(), channel_axis=-1) for name in pairs}
    handles = [
        linear.register_forward_pre_hook(lambda module, args, observer=observers[name]: observer.update(args[0]))
        for name, (_, linear) in pairs.items()
    ]
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def compute_factors(model: nn.Module, ranges: dict[str, tuple[Tensor, Tensor]], spec: ReparamSpec) -> ReparamFactors:
    """The shift and scale of every channel from its observed range (see the module docstring)."""
    factors: ReparamFactors = {}
    for pairs, alpha, shift_on in _pair_groups(model, spec):
        for name, (_, linear) in pairs.items():
            factors[name] = _channel_factors(*ranges[name], linear, alpha, shift_on)
    return factors


def _channel_factors(lo: Tensor, hi: Tensor, linear: nn.Linear, alpha: float, shift_on: bool) -> tuple[Tensor, Tensor]:
    """One pair's (shift, scale) from its channels' observed range and the Linear reading them."""
    if shift_on:
        shift = (lo + hi) / 2
        half_range = (hi - lo) / 2
    else:
        shift = torch.zeros_like(lo)
        half_range = torch.maximum(lo.abs(), hi.abs())
    # A constant channel (half-range 0) or a column of zero weights would give a zero or infinite factor.
    half_range = half_range.clamp_min(1e-5)
    column_max = linear.weight.detach().abs().amax(dim=0).float().clamp_min(1e-5)
    scale = half_range.pow(alpha) / column_max.pow(1.0 - alpha)
    # A common factor changes nothing after calibration; normalising keeps the values near their size.
    return shift, scale / scale.mean()


def _fold_into_linear(linear: nn.Linear, shift: Tensor, scale: Tensor) -> None:
    """``W' = W diag(s)``, ``b' = b + W c``: the Linear reads ``(x - c) / s`` and gives what it gave for ``x``."""
    weight = linear.weight.float()
    if bool(shift.any()):
        if linear.bias is None:
            # A normal tensor even when folding runs under inference mode (calibration), so autograd can use it.
            with torch.inference_mode(False):
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=weight.device, dtype=linear.weight.dtype))
        linear.bias.add_((weight @ shift).to(linear.bias.dtype))
    linear.weight.copy_((weight * scale).to(linear.weight.dtype))


@torch.no_grad()
def apply_factors(model: nn.Module, factors: ReparamFactors) -> None:
    """Fold ``factors`` into the LayerNorm affines (or set them on the MLP activations) and into the
    Linear weights and biases, in place."""
    layernorms, activations, values = layernorm_linear_pairs(model), activation_linear_pairs(model), value_projection_pairs(model)
    pairs = {**layernorms, **activations, **values}
    unknown = sorted(set(factors) - set(pairs))
    if unknown:
        raise ValueError(f"reparameterization factors for modules that are not LayerNorm->Linear, GELU->Linear or v->proj pairs: {', '.join(unknown[:3])}")
    for name, (shift, scale) in factors.items():
        source, linear = pairs[name]
        shift = shift.to(linear.weight.device, torch.float32)
        scale = scale.to(linear.weight.device, torch.float32)
        if name not in layernorms and bool(shift.any()):
            raise ValueError(f"{name}: a GELU output or an attention's v is divided, never shifted (its factors carry a shift)")
        if name in activations:
            source.set_channel_scale(scale)
        elif name in values:
            # v is the last third of qkv's output rows; dividing a row and its bias divides that channel.
            v_rows = slice(2 * linear.in_features, 3 * linear.in_features)
            source.weight[v_rows] = (source.weight[v_rows].float() / scale[:, None]).to(source.weight.dtype)
            if source.bias is not None:
                source.bias[v_rows] = (source.bias[v_rows].float() / scale).to(source.bias.dtype)
        elif source.weight is None or source.bias is None:
            raise ValueError(f"{name} has no affine parameters to fold the reparameterization into")
        else:
            source.bias.copy_(((source.bias.float() - shift) / scale).to(source.bias.dtype))
            source.weight.copy_((source.weight.float() / scale).to(source.weight.dtype))
        _fold_into_linear(linear, shift, scale)
