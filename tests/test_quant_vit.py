"""QVit conversion, modes, calibration and state round trips on tiny random ViTs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from conftest import calibrated, make_tiny_vit, reloaded, tiny_images
from models.ptq.layers import QuantAttention, QuantBlock, QuantLayerNorm, QuantLinear
from models.ptq.tensor_quantizer import QuantMode
from models.quant_vit import QVit, UnsupportedModelError
from quant_config import ConfigError, load_recipe
from utils.checkpoint import load_calibrated, read_calibrated, save_calibrated, weights_sha256
from utils.errors import UserError

RECIPES = ["fqvit_w8a8_att8", "fqvit_w8a8_att4", "minmax_w8a8"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp32_mode_reproduces_timm_exactly(recipe):
    reference = make_tiny_vit()
    for block in reference.blocks:
        block.attn.fused_attn = False
    fused = make_tiny_vit()
    qvit = QVit(make_tiny_vit(), load_recipe(recipe))
    x = tiny_images()
    with torch.no_grad(), qvit.fp32():
        out = qvit(x)
    with torch.no_grad():
        assert torch.equal(out, reference(x))
        torch.testing.assert_close(out, fused(x), atol=1e-5, rtol=1e-5)


def test_conversion_keeps_timm_parameter_names_and_classes():
    timm_keys = set(make_tiny_vit().state_dict())
    qvit = QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att4"))
    keys = set(qvit.model.state_dict())
    assert timm_keys <= keys
    assert all(k.endswith(("scale", "zero_point", "calibrated")) for k in keys - timm_keys)
    # A timm state dict loads unchanged into the converted model.
    qvit.model.load_state_dict(make_tiny_vit(seed=3).state_dict(), strict=False)
    assert torch.equal(qvit.model.head.weight, make_tiny_vit(seed=3).head.weight)
    block = qvit.model.blocks[0]
    assert isinstance(block, QuantBlock) and isinstance(block.attn, QuantAttention)
    assert isinstance(block.norm1, QuantLayerNorm) and isinstance(block.mlp.fc1, QuantLinear)
    assert not block.attn.fused_attn


def test_fully_quantized_points_are_all_present():
    names = set(QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att4")).quantizers())
    expected = {
        "patch_embed.proj.input_quant",
        "patch_embed.proj.weight_quant",
        "blocks.0.norm1.input_quant",  # residual stream / LayerNorm input
        "blocks.0.attn.qkv.input_quant",
        "blocks.0.attn.qkv.weight_quant",
        "blocks.0.attn.q_act.input_quant",
        "blocks.0.attn.k_act.input_quant",
        "blocks.0.attn.v_act.input_quant",
        "blocks.0.attn.softmax.input_quant",
        "blocks.0.attn.softmax.output_quant",
        "blocks.0.attn.proj.input_quant",
        "blocks.0.norm2.input_quant",
        "blocks.0.mlp.fc1.input_quant",
        "blocks.0.mlp.fc2.input_quant",
        "norm.input_quant",
        "head.input_quant",
        "head.weight_quant",
    }
    assert expected <= names
    baseline = set(QVit(make_tiny_vit(), load_recipe("minmax_w8a8")).quantizers())
    assert not any("norm" in n or "softmax" in n for n in baseline)


def test_quantizers_each_get_only_their_kind():
    qvit = QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att4"))
    q = qvit.quantizers()
    assert q["blocks.0.attn.softmax.output_quant"].spec.quantizer == "log2"
    assert q["blocks.0.norm1.input_quant"].spec.power_of_two_factor
    assert q["blocks.0.attn.qkv.weight_quant"].spec.calibration_mode == "channel_wise"
    assert q["blocks.0.attn.softmax.input_quant"].spec.calibration_mode == "layer_wise"


def test_uncalibrated_model_refuses_to_quantize():
    qvit = QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att8"))
    with pytest.raises(RuntimeError, match="before calibration"):
        qvit(tiny_images())


@pytest.mark.parametrize("recipe", RECIPES)
def test_calibrated_model_is_close_to_fp32_but_not_equal(recipe):
    qvit = calibrated(recipe)
    x = tiny_images(16, seed=99)
    with torch.no_grad():
        out = qvit(x)
        with qvit.fp32():
            ref = qvit(x)
    assert not torch.equal(out, ref)
    assert F.cosine_similarity(out, ref).mean().item() > 0.99
    assert all(q.is_calibrated for q in qvit.quantizers().values())


def test_lower_bits_give_larger_error():
    x = tiny_images(16, seed=99)
    errors = []
    for bits in (4, 8):
        qvit = calibrated("minmax_w8a8", **{"activation.bit_type.bits": bits, "weight.bit_type.bits": bits})
        with torch.no_grad():
            out = qvit(x)
            with qvit.fp32():
                ref = qvit(x)
        errors.append((out - ref).square().mean().item())
    assert errors[0] > 4 * errors[1]


def test_state_dict_round_trip_gives_identical_outputs():
    source = calibrated("fqvit_w8a8_att4")
    target = QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att4"))
    target.load_state_dict(source.state_dict())
    assert target.is_calibrated
    x = tiny_images(8, seed=5)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_calibrated_file_round_trip(tmp_path):
    source = calibrated("fqvit_w8a8_att8")
    path = tmp_path / "calibrated.pt"
    save_calibrated(source, path, "tiny", weights_sha256(source.model), None)
    record, recipe = read_calibrated(path)
    assert recipe == source.recipe
    target = QVit(make_tiny_vit(), recipe)
    with pytest.raises(UserError, match="calibrated on other weights"):
        load_calibrated(target, record, path, "0" * 64)
    load_calibrated(target, record, path, weights_sha256(make_tiny_vit()))
    x = tiny_images(8, seed=6)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))



def test_ptf_channel_zero_points_reach_the_layernorm_and_survive_the_calibrated_file(tmp_path):
    overrides = {"layernorm_input.ptf_channel_zero_points": True}
    source = calibrated("fqvit_w8a8_att8", **overrides)
    q = source.model.blocks[1].norm1.input_quant
    zps = q.zero_point
    assert zps.shape == (q.num_channels,) and len(set(zps.tolist())) > 1  # one per channel, not shared
    assert zps.min() >= 0 and zps.max() <= 255 and torch.equal(zps, zps.round())
    x = torch.randn(2, 5, q.num_channels) * 3
    # Independent reference: per-channel uint8 fake quantization with those scales and zero points.
    ref = (torch.clamp(torch.round(x / q.scale) + zps, 0, 255) - zps) * q.scale
    with source.quantized(), torch.no_grad():
        assert torch.allclose(q(x), ref, atol=1e-6)
    target = reloaded(source, make_tiny_vit(), tmp_path / "calibrated.pt")
    assert target.recipe.layernorm_input.ptf_channel_zero_points
    images = tiny_images(8, seed=6)
    with torch.no_grad():
        assert torch.equal(target(images), source(images))


def test_mode_context_managers_restore_and_failed_calibration_finalizes_nothing():
    qvit = QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att8"))
    assert qvit.mode is QuantMode.QUANT
    with qvit.fp32():
        assert qvit.mode is QuantMode.FP32
        with qvit.quantized():
            assert qvit.mode is QuantMode.QUANT
        assert qvit.mode is QuantMode.FP32
    with pytest.raises(ValueError):
        with torch.no_grad(), qvit.calibrating():
            qvit(tiny_images())
            raise ValueError("boom")
    assert qvit.mode is QuantMode.QUANT
    assert not qvit.is_calibrated


def test_calibration_sees_fp32_activations():
    # Outputs during calibration equal the FP32 outputs: observers do not alter the forward pass.
    qvit = QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att4"))
    x = tiny_images()
    with torch.no_grad():
        with qvit.fp32():
            ref = qvit(x)
        with qvit.calibrating():
            out = qvit(x)
    assert torch.equal(out, ref)


def test_distilled_and_avg_pool_variants_convert():
    from timm.models.deit import VisionTransformerDistilled

    distilled = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10).eval()
    reference = copy.deepcopy(distilled)
    for b in reference.blocks:
        b.attn.fused_attn = False
    qvit = QVit(distilled, load_recipe("fqvit_w8a8_att8"))
    x = tiny_images(4)
    with torch.no_grad(), qvit.fp32():
        assert torch.equal(qvit(x), reference(x))
    avg = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10, global_pool="avg", fc_norm=True)
    assert "fc_norm.input_quant" in QVit(avg.eval(), load_recipe("fqvit_w8a8_att8")).quantizers()


def test_unsupported_architectures_are_named():
    with pytest.raises(UnsupportedModelError, match="needs a timm image classification model"):
        QVit(torch.nn.Linear(2, 2), load_recipe("fqvit_w8a8_att8"))
    map_pool = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10, global_pool="map")
    with pytest.raises(UnsupportedModelError, match="attn_pool"):
        QVit(map_pool, load_recipe("fqvit_w8a8_att8"))
    # Refused before conversion: the model is left exactly as it was.
    assert type(map_pool.blocks[0]) is Block and type(map_pool.head) is torch.nn.Linear


def test_layers_patterns_replace_only_the_matching_points():
    layers = {
        "blocks.*.mlp.fc2.input_quant": {"quantizer": "twin_uniform", "bit_type": {"symmetric": True, "bits": 6}},
        "blocks.1.*.weight_quant": {"bit_type": {"bits": 4}},
        "blocks.1.mlp.fc2.weight_quant": {"bit_type": {"bits": 6}},  # later patterns win
        "head.input_quant": None,
    }
    qvit = calibrated("fqvit_w8a8_att8", **{"layers": layers})
    points = qvit.quantizers()
    for name, q in points.items():
        bt = q.spec.bit_type
        if name.endswith("mlp.fc2.input_quant"):
            assert q.spec.quantizer == "twin_uniform" and bt.bits == 6 and q.kind == "activation"
            assert float(q.zero_point) > 0  # the negative step is finer: GELU's minimum is small
        elif name == "blocks.1.mlp.fc2.weight_quant":
            assert bt.bits == 6 and q.per_channel
        elif name.startswith("blocks.1.") and name.endswith("weight_quant"):
            assert bt.bits == 4 and q.per_channel and q.is_weight
        else:
            assert q.spec == getattr(qvit.recipe, q.kind) or name.endswith("softmax.input_quant"), name
    assert "head.input_quant" not in points and not qvit.model.head.input_quant.enabled
    x = tiny_images(4, seed=3)
    out = qvit(x)
    with qvit.fp32():
        ref = qvit(x)
    assert torch.isfinite(out).all() and 0.5 < F.cosine_similarity(out, ref).mean() < 1.0
    # A saved calibration loads into a model built from the same recipe.
    other = QVit(make_tiny_vit(), qvit.recipe)
    other.load_state_dict(qvit.state_dict())
    assert torch.equal(other(x), out)


def test_layers_patterns_that_match_nothing_or_break_a_rule_are_refused():
    with pytest.raises(ConfigError, match=r"pattern 'blocks.\*.mlp.fc3\*' matches no quantization point"):
        QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att8", {"layers": {"blocks.*.mlp.fc3*": None}}))
    with pytest.raises(ConfigError, match="power_of_two_factor applies only to layernorm_input"):
        QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att8", {"layers": {"blocks.0.mlp.fc1.input_quant": {"power_of_two_factor": True}}}))
    with pytest.raises(ConfigError, match="the integer softmax needs uniform, layer_wise scores"):
        QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att8", {"layers": {"*softmax.input_quant": {"quantizer": "twin_uniform", "bit_type": {"symmetric": True}}}}))
