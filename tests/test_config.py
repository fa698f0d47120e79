"""Recipes: shipped files load, every invalid value is refused with a clear message."""
from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
import yaml

from quant_config import DEFAULT_RECIPE, ConfigError, available_recipes, load_recipe, recipe_from_dict


def base() -> dict:
    return yaml.safe_load(open(load_recipe.__globals__["CONFIG_DIR"] / "fqvit_w8a8_att4.yaml"))


def test_shipped_recipes_load():
    names = available_recipes()
    assert {"fqvit_w8a8_att4", "fqvit_w8a8_att8", "minmax_w8a8"} <= set(names)
    assert DEFAULT_RECIPE == "fqvit_w8a8_att8"
    att4 = load_recipe("fqvit_w8a8_att4")
    assert att4.integer_softmax and att4.attention.quantizer == "log2" and att4.attention.bit_type.bits == 4
    assert att4.layernorm_input.power_of_two_factor
    assert att4.weight.calibration_mode == "channel_wise" and att4.weight.bit_type.name == "int8"
    baseline = load_recipe("configs/minmax_w8a8.yaml")
    assert baseline.layernorm_input is None and baseline.attention is None and not baseline.integer_softmax


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("activation.bit_type.bits", 1, "bits must be an integer from 2 to 16"),
        ("activation.bit_type.bits", 17, "bits must be an integer from 2 to 16"),
        ("activation.observer", "median", "unknown observer 'median'; valid: kl, minmax, omse, percentile"),
        ("activation.quantizer", "cubic", "unknown quantizer 'cubic'; valid: log2, log_sqrt2, twin_uniform, uniform"),
        ("activation.calibration_mode", "head_wise", "unknown mode 'head_wise'"),
        ("attention.calibration_mode", "channel_wise", "meaningless for the attention map"),
        ("activation.power_of_two_factor", True, "applies only to layernorm_input"),
        ("layernorm_input.calibration_mode", "layer_wise", "needs calibration_mode: channel_wise"),
        ("activation.ptf_channel_zero_points", True, "x.yaml.activation.ptf_channel_zero_points needs power_of_two_factor: true"),
        ("layernorm_input.ptf_channel_zero_points", 1, "ptf_channel_zero_points must be"),
        ("activation.dynamic_token_scale", True, "x.yaml.activation.dynamic_token_scale applies only to layernorm_input"),
        ("layernorm_input.dynamic_token_scale", "yes", "dynamic_token_scale must be"),
        ("layernorm_input.token_scale_group", 16, "x.yaml.layernorm_input.token_scale_group needs dynamic_token_scale: true"),
        ("layernorm_input.token_scale_group", -1, "token_scale_group must be an integer from 0 to 65536"),
        ("activation.percentile", 1.5, "percentile must be in"),
        ("weight.quantizer", "log2", "x.yaml.weight: the log2 quantizer has one scale per tensor"),
        ("weight.quantizer", "log_sqrt2", "x.yaml.weight: the log_sqrt2 quantizer has one scale per tensor"),
        ("activation.quantizer", "twin_uniform", "twin_uniform quantizer uses signed codes"),
        ("weight.quantizer", "twin_uniform", "x.yaml.weight.quantizer must be uniform"),
    ],
)
def test_invalid_values_are_refused(path, value, message):
    data = base()
    node = data
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        recipe_from_dict(data, where="x.yaml")


def test_unknown_keys_are_named():
    data = base()
    data["activation"]["obsrver"] = "kl"
    with pytest.raises(ConfigError, match="x.yaml.activation: unknown key 'obsrver'"):
        recipe_from_dict(data, where="x.yaml")
    data = base()
    data["softmax"] = {}
    with pytest.raises(ConfigError, match="unknown key 'softmax'"):
        recipe_from_dict(data, where="x.yaml")


def test_integer_softmax_needs_quantized_activations():
    data = base()
    data["activation"] = None
    with pytest.raises(ConfigError, match="integer_softmax needs the activation kind"):
        recipe_from_dict(data)


def test_overrides_apply_and_revalidate():
    recipe = load_recipe("fqvit_w8a8_att8", {"activation.observer": "kl", "attention.bit_type.bits": 6})
    assert recipe.activation.observer == "kl"
    assert recipe.attention.bit_type.bits == 6 and recipe.attention.bit_type.name == "uint6"
    with pytest.raises(ConfigError, match="unknown key 'activation.obs'"):
        load_recipe("fqvit_w8a8_att8", {"activation.obs": "kl"})
    with pytest.raises(ConfigError, match="layernorm_input is null"):
        load_recipe("minmax_w8a8", {"layernorm_input.observer": "kl"})
    with pytest.raises(ConfigError, match="unknown observer"):
        load_recipe("fqvit_w8a8_att8", {"activation.observer": "nope"})


def test_missing_recipe_lists_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="shipped recipes: .*fqvit_w8a8_att4"):
        load_recipe("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_recipe(bad)


def test_round_trip_through_dict():
    recipe = load_recipe("fqvit_w8a8_att4")
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_beyond_fqvit_recipes_stay_fully_quantized():
    from conftest import make_tiny_vit
    from models.ptq.tensor_quantizer import TensorQuantizer
    from models.quant_vit import QVit

    plus = ("fqvit_plus_w8a8", "fqvit_plus_w8a8_r10", "fqvit_plus_w6a6", "fqvit_plus_w6a6_r8", "fqvit_plus_w4a4", "fqvit_plus_w4a8", "fqvit_plus_w4a8_mp")
    for name in plus:
        recipe = load_recipe(name)
        # Every kind quantized: weights, activations, the residual stream at the LayerNorms, the attention map,
        # and no per-point exception sends a point back to float.
        assert all(getattr(recipe, kind) is not None for kind in ("weight", "activation", "layernorm_input", "attention"))
        assert recipe.layernorm_input.power_of_two_factor
        points = {n: m for n, m in QVit(make_tiny_vit(), recipe).model.named_modules() if isinstance(m, TensorQuantizer)}
        floats = [n for n, q in points.items() if q.spec is None and not (n.endswith("softmax.input_quant") and not recipe.integer_softmax)]
        assert not floats, (name, floats)
    for name in plus[:5]:
        recipe = load_recipe(name)
        assert recipe.reparam is not None and recipe.scale_search is not None and recipe.scale_search.metric == "fisher"
    w8, w8r10 = load_recipe("fqvit_plus_w8a8"), load_recipe("fqvit_plus_w8a8_r10")
    assert w8.integer_softmax
    # The attention map on the unsigned (post-softmax) twin grid, at the recipe's 8 bits.
    maps = [q for q in QVit(make_tiny_vit(), w8).quantizers().values() if q.kind == "attention"]
    assert maps and all(q.spec.quantizer == "twin_uniform" and q.spec.bit_type.name == "uint8" for q in maps)
    # _r10 is fqvit_plus_w8a8 with the residual stream at its LayerNorms wider (static: no per-token
    # scale) and without reconstruction.
    assert w8r10.layernorm_input.bit_type.bits == 10 and w8.layernorm_input.bit_type.bits == 8
    assert w8.layernorm_input.dynamic_token_scale and not w8r10.layernorm_input.dynamic_token_scale
    assert w8.reconstruction is not None and w8r10.reconstruction is None
    same = dict(name=w8.name, description=w8.description, layernorm_input=w8.layernorm_input, reconstruction=w8.reconstruction)
    assert dataclasses.replace(w8r10, **same) == w8
    w6 = load_recipe("fqvit_plus_w6a6_r8")
    assert {w6.weight.bit_type.bits, w6.activation.bit_type.bits, w6.attention.bit_type.bits} == {6}
    assert w6.reconstruction is not None and w6.reconstruction.images == w8.reconstruction.images == 800
    assert w6.layernorm_input.bit_type.bits == 8 and w6.attention.quantizer == "log_sqrt2"
    full6 = load_recipe("fqvit_plus_w6a6")
    assert {spec.bit_type.bits for spec in (full6.weight, full6.activation, full6.layernorm_input, full6.attention)} == {6}
    assert full6.reconstruction is not None and full6.layernorm_input.ptf_channel_zero_points
    # Both 6-bit recipes scale the stream at run time: the 8-bit one per token, the 6-bit one per token
    # and 16 channels (6.5 bits a value with its 8-bit factors).
    assert w6.layernorm_input.dynamic_token_scale and w6.layernorm_input.token_scale_group == 0
    assert full6.layernorm_input.dynamic_token_scale and full6.layernorm_input.token_scale_group == 16
    assert load_recipe("fqvit_plus_w8a8").layernorm_input.ptf_channel_zero_points
    assert full6.layers == w6.layers == {"*blocks.*.mlp.fc2.input_quant": {"quantizer": "twin_uniform", "bit_type": {"bits": 6, "symmetric": True}}}
    w4a4 = load_recipe("fqvit_plus_w4a4")  # 4 bits but for the residual stream at its LayerNorms
    assert {w4a4.weight.bit_type.bits, w4a4.activation.bit_type.bits, w4a4.attention.bit_type.bits} == {4} and w4a4.layernorm_input.bit_type.bits == 8
    assert w4a4.gptq is not None and w4a4.reconstruction is not None and w4a4.layers["*blocks.*.mlp.fc2.input_quant"]["bit_type"]["bits"] == 4
    w4, w4mp = load_recipe("fqvit_plus_w4a8"), load_recipe("fqvit_plus_w4a8_mp")
    assert w4.weight.bit_type.bits == 4 and w4.gptq is not None and w4.activation.bit_type.bits == 8
    assert (w4.weight, w4.activation, w4.gptq) == (w4mp.weight, w4mp.activation, w4mp.gptq)
    bits = {n: q.spec.bit_type.bits for n, q in QVit(make_tiny_vit(), w4mp).quantizers().items() if q.kind == "weight"}
    assert {n for n, b in bits.items() if b == 8} == {"patch_embed.proj.weight_quant", *(f"blocks.0.{m}.weight_quant" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))}
    assert set(bits.values()) == {4, 8}


def test_layers_section_is_checked_at_load():
    data = base()
    data["layers"] = {"blocks.*.mlp.fc2.input_quant": {"quantizer": "twin_uniform", "bit_type": {"symmetric": True}}, "head.*": None}
    recipe = recipe_from_dict(data, where="x.yaml")
    assert recipe_from_dict(recipe.to_dict()) == recipe  # survives the calibrated file's round trip
    spec = recipe.layer_spec("activation", recipe.layers["blocks.*.mlp.fc2.input_quant"], "w")
    assert spec.quantizer == "twin_uniform" and spec.bit_type.name == "int8" and spec.observer == recipe.activation.observer
    assert recipe.layer_spec("weight", None, "w") is None
    eight = recipe.layer_spec("weight", {"bit_type": {"bits": 4}}, "w")
    assert eight.bit_type.name == "int4" and eight.calibration_mode == "channel_wise"  # the rest is the kind's
    # twin_uniform: signed on activations (GELU's sign picks the region), unsigned on the attention map.
    with pytest.raises(ConfigError, match="on the non-negative attention map twin_uniform is the unsigned post-softmax grid"):
        recipe.layer_spec("attention", {"quantizer": "twin_uniform", "bit_type": {"symmetric": True}}, "w")
    with pytest.raises(ConfigError, match="uses signed codes.*the unsigned form is for the attention map only"):
        recipe.layer_spec("activation", {"quantizer": "twin_uniform", "bit_type": {"symmetric": False}}, "w")
    softmax_twin = recipe.layer_spec("attention", {"quantizer": "twin_uniform", "bit_type": {"bits": 8}}, "w")
    assert softmax_twin.quantizer == "twin_uniform" and softmax_twin.bit_type.name == "uint8"
    for layers, message in [
        ({"fc2": {"obsrver": "kl"}}, r"x.yaml.layers\['fc2'\]: unknown key 'obsrver'"),
        ({"fc2": {"bit_type": {"bits": 1}}}, "bits must be an integer from 2 to 16"),
        ({"fc2": 8}, "must be a mapping of spec fields or null"),
        ({}, "layers must be a non-empty mapping"),
    ]:
        data["layers"] = layers
        with pytest.raises(ConfigError, match=message):
            recipe_from_dict(data, where="x.yaml")


def test_config_is_a_leaf_whose_names_are_the_registries():
    """quant_config imports nothing of the library (no cycle through models.ptq), and the observer and
    quantizer names it validates are exactly those the registries build."""
    import subprocess
    import sys

    code = "import quant_config, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'utils')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert loaded.stdout.strip() == "[]"
    from models.ptq.observers import OBSERVERS
    from models.ptq.quantizers import QUANTIZERS
    from quant_config import OBSERVER_NAMES, QUANTIZER_NAMES

    assert sorted(OBSERVERS) == list(OBSERVER_NAMES) and sorted(QUANTIZERS) == list(QUANTIZER_NAMES)
