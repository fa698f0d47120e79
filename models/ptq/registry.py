"""Which quantized class replaces each float module class (NVIDIA ModelOpt's ``QuantModuleRegistry`` idea).

:data:`QUANT_MODULES` maps a float class to its converter, ``convert(module, state, recipe)``, which
turns the module into its quantized subclass from :mod:`models.ptq.layers` in place, handing the layer
only the specs of its own tensors. A new architecture is new entries here (``@register(FloatClass)``),
not new branches in :class:`models.quant_vit.QVit`. Lookup is by exact class: a subclass of a
registered class may compute something else and must be registered itself.
"""
from __future__ import annotations

from collections.abc import Callable

from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import Mlp
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Attention, Block
from torch import nn

from models.ptq.layers import QuantAttention, QuantBlock, QuantConv2d, QuantLayerNorm, QuantLinear, SmoothedGELU, link_reader
from models.ptq.swin_layers import QuantSwinBlock, QuantWindowAttention
from models.ptq.tensor_quantizer import QuantState
from quant_config import QuantRecipe

__all__ = ["QUANT_MODULES", "Converter", "convert_module", "register"]

Converter = Callable[[nn.Module, QuantState, QuantRecipe], nn.Module]
QUANT_MODULES: dict[type[nn.Module], Converter] = {}


def register(*float_classes: type[nn.Module]) -> Callable[[Converter], Converter]:
    """Decorator: ``convert`` is how each of ``float_classes`` becomes quantized."""

    def add(convert: Converter) -> Converter:
        for cls in float_classes:
            if cls in QUANT_MODULES:
                raise ValueError(f"{cls.__name__} already has a quantized counterpart")
            QUANT_MODULES[cls] = convert
        return convert

    return add


def convert_module(module: nn.Module, state: QuantState, recipe: QuantRecipe) -> bool:
    """Convert ``module`` in place if its class is registered; returns whether it was."""
    convert = QUANT_MODULES.get(type(module))
    if convert is None:
        return False
    convert(module, state, recipe)
    return True


@register(nn.Linear)
def _linear(module: nn.Module, state: QuantState, recipe: QuantRecipe) -> nn.Module:
    return QuantLinear.convert(module, state, activation=recipe.activation, weight=recipe.weight)


@register(nn.Conv2d)
def _conv2d(module: nn.Module, state: QuantState, recipe: QuantRecipe) -> nn.Module:
    return QuantConv2d.convert(module, state, activation=recipe.activation, weight=recipe.weight)


@register(nn.LayerNorm, TimmLayerNorm)
def _layernorm(module: nn.Module, state: QuantState, recipe: QuantRecipe) -> nn.Module:
    return QuantLayerNorm.convert(module, state, layernorm_input=recipe.layernorm_input)


@register(nn.GELU)
def _gelu(module: nn.Module, state: QuantState, recipe: QuantRecipe) -> nn.Module:
    # The MLP activation: its SmoothQuant division (set only by reparam), the integer program's GELU.
    return SmoothedGELU.convert(module, state, integer=recipe.integer_gelu)


@register(Mlp)
def _mlp(module: nn.Module, state: QuantState, recipe: QuantRecipe) -> nn.Module:
    # The integer GELU's table follows fc2's input grid. Set before the children are converted in
    # place, the link survives their conversion.
    link_reader(module.act, module.fc2)
    return module


@register(SwinTransformer)
def _swin(module: nn.Module, state: QuantState, recipe: QuantRecipe) -> nn.Module:
    # The patch embedding's LayerNorm writes the first block's LayerNorm input (stage 0 has no merging).
    first = module.layers[0]
    if isinstance(first.downsample, nn.Identity) and not isinstance(module.patch_embed.norm, nn.Identity):
        link_reader(module.patch_embed.norm, first.blocks[0].norm1)
    return module


@register(PatchMerging)
def _patch_merging(module: nn.Module, state: QuantState, recipe: QuantRecipe) -> nn.Module:
    link_reader(module.norm, module.reduction)  # the integer LayerNorm writes the reduction's input codes
    return module


def _attention(quant_cls: type) -> Converter:
    """An attention's converter: its operands and softmax get the activation and attention-map specs."""
    return lambda module, state, recipe: quant_cls.convert(module, state, activation=recipe.activation, attention=recipe.attention,
                                                           integer_softmax=recipe.integer_softmax)  # fmt: skip


def _block(quant_cls: type) -> Converter:
    """A block's converter: a new forward only (its LayerNorms' quantizers come with their own entry)."""
    return lambda module, state, recipe: quant_cls.convert(module)


register(Attention)(_attention(QuantAttention))
register(WindowAttention)(_attention(QuantWindowAttention))
register(Block)(_block(QuantBlock))
register(SwinTransformerBlock)(_block(QuantSwinBlock))
