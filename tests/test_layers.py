"""Each quantized layer against a composition written out by hand from its quantizers (as
pytorch-quantization tests its layers), and the class registry that converts float modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from conftest import calibrated, tiny_images
from models.ptq.layers import QuantAttention, QuantBlock, QuantConv2d, QuantLayerNorm, QuantLinear, SmoothedGELU
from models.ptq.registry import QUANT_MODULES, convert_module, register
from models.ptq.tensor_quantizer import QuantState

RECIPES = ["fqvit_w8a8_att8", "fqvit_w8a8_att4", "trt_int8", "cpu_int8"]


@pytest.fixture(scope="module", params=RECIPES)
def qvit(request):
    return calibrated(request.param)


def block_input(qvit, x: torch.Tensor) -> torch.Tensor:
    """What blocks.0 receives: patch embedding, class token and position embedding, quantized as the model does."""
    model = qvit.model
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


@torch.no_grad()
def test_linear_is_f_linear_of_its_two_fake_quantized_operands(qvit):
    fc1 = qvit.model.blocks[0].mlp.fc1
    assert isinstance(fc1, QuantLinear)
    x = torch.randn(4, 17, fc1.in_features)
    expected = F.linear(fc1.input_quant.fake_quant(x), fc1.weight_quant.fake_quant(fc1.weight), fc1.quant_bias())
    assert torch.equal(fc1(x), expected)
    with qvit.fp32():  # and the float layer in FP32 mode
        assert torch.equal(fc1(x), F.linear(x, fc1.weight, fc1.bias))


@torch.no_grad()
def test_patch_embedding_conv_is_conv2d_of_its_fake_quantized_operands(qvit):
    conv = qvit.model.patch_embed.proj
    assert isinstance(conv, QuantConv2d)
    x = tiny_images(2, seed=40)
    expected = F.conv2d(conv.input_quant.fake_quant(x), conv.weight_quant.fake_quant(conv.weight), conv.quant_bias(), conv.stride)
    assert torch.equal(conv(x), expected)


@torch.no_grad()
def test_attention_is_the_hand_built_composition(qvit):
    attn = qvit.model.blocks[0].attn
    assert isinstance(attn, QuantAttention)
    x = torch.randn(2, 17, attn.qkv.in_features)
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    scores = attn.q_act.input_quant(q * attn.scale) @ attn.k_act.input_quant(k).transpose(-2, -1)
    softmax = attn.softmax
    # The integer softmax (tested in test_integer_ops.py) is taken as it is; a float one is written out.
    probs = softmax(scores) if softmax.integer else softmax.output_quant(softmax.input_quant(scores).softmax(-1))
    out = attn.proj((probs @ attn.v_act.input_quant(v)).transpose(1, 2).reshape(B, N, C))
    assert torch.equal(attn(x), out)


@torch.no_grad()
def test_block_quantizes_each_residual_sum_once(qvit):
    block = qvit.model.blocks[0]
    assert isinstance(block, QuantBlock)
    x = block_input(qvit, tiny_images(2, seed=41))
    calls = {"norm1": 0, "norm2": 0}
    hooks = [getattr(block, name).input_quant.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1)) for name in calls]
    try:
        out = block(x)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"norm1": 1, "norm2": 1}  # the skip path and the LayerNorm share one quantized tensor
    # Written out: the quantized residual stream feeds both the LayerNorm and the skip connection.
    h = block.norm1.input_quant(x)
    h = h + block.ls1(block.attn(F.layer_norm(h, block.norm1.normalized_shape, block.norm1.weight, block.norm1.bias, block.norm1.eps)))
    h = block.norm2.input_quant(h)
    h = h + block.ls2(block.mlp(F.layer_norm(h, block.norm2.normalized_shape, block.norm2.weight, block.norm2.bias, block.norm2.eps)))
    assert torch.equal(out, h)


@torch.no_grad()
def test_layernorm_normalizes_its_quantized_input(qvit):
    norm = qvit.model.norm
    assert isinstance(norm, QuantLayerNorm)
    x = torch.randn(2, 17, norm.normalized_shape[0]) * 3
    assert torch.equal(norm(x), F.layer_norm(norm.input_quant(x), norm.normalized_shape, norm.weight, norm.bias, norm.eps))


@torch.no_grad()
def test_uniform_points_equal_torch_fake_quantize_which_the_export_uses(qvit):
    """Every 8-bit uniform point's fake quantization is torch.fake_quantize_per_{tensor,channel}_affine,
    the op the ONNX export lowers to QuantizeLinear/DequantizeLinear."""
    checked = 0
    for name, q in qvit.quantizers().items():
        if q.spec is None or not q.method.qdq_exportable or q.spec.bit_type.bits != 8 or not q.is_calibrated:
            continue
        bt = q.spec.bit_type
        shape = (16, q.num_channels) if q.channel_axis != 0 else (q.num_channels, 16)
        x = torch.randn(*shape) * 4
        if q.per_channel:
            axis = q.channel_axis % x.dim()
            reference = torch.fake_quantize_per_channel_affine(x, q.scale, q.zero_point.round().int(), axis, bt.qmin, bt.qmax)
        else:
            reference = torch.fake_quantize_per_tensor_affine(x, float(q.scale), int(q.zero_point), bt.qmin, bt.qmax)
        assert torch.allclose(q.fake_quant(x), reference, rtol=0, atol=1e-6 * float(q.scale.max())), name
        checked += 1
    assert checked > 0


def test_registry_maps_each_float_class_and_refuses_a_second_entry():
    assert {nn.Linear, nn.Conv2d, nn.LayerNorm, Attention, Block} <= set(QUANT_MODULES)
    state = calibrated("trt_int8").state
    from quant_config import load_recipe

    linear = nn.Linear(4, 3)
    assert convert_module(linear, state, load_recipe("trt_int8")) and type(linear) is QuantLinear
    assert linear.weight_quant.is_weight and not linear.input_quant.is_weight
    relu = nn.ReLU()
    assert not convert_module(relu, QuantState(), load_recipe("trt_int8")) and type(relu) is nn.ReLU
    gelu, x = nn.GELU(), torch.randn(5, 7)
    expected = gelu(x)
    # The MLP activation becomes a GELU that can carry SmoothQuant's division; without factors it is GELU.
    assert convert_module(gelu, QuantState(), load_recipe("trt_int8")) and type(gelu) is SmoothedGELU
    assert torch.equal(gelu(x), expected) and not gelu.state_dict()
    with pytest.raises(ValueError, match="Linear already has a quantized counterpart"):
        register(nn.Linear)(lambda module, state, recipe: module)
