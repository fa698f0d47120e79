"""The integer program of a calibrated QVit: what it computes against the fake-quant model, value by value."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SWIN_SIZE, calibrated, make_tiny_distilled, make_tiny_swin, make_tiny_vit, tiny_images
from models.integer import IntegerUnsupported
from models.integer.lower import lower
from models.integer.program import run
from models.ptq.tensor_quantizer import TensorQuantizer
from models.quant_vit import point_name

VIT_VARIANTS = {
    "vit": {},
    "layerscale-noembedclass-registers": dict(init_values=0.5, no_embed_class=True, reg_tokens=2),
}


def _fake_quant_codes(qvit, images) -> dict[str, torch.Tensor]:
    """Every activation point's fake-quant output (float64 run) by point name."""
    out = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=point_name(name): out.__setitem__(n, o.detach()))
             for name, m in qvit.model.named_modules() if isinstance(m, TensorQuantizer) and m.spec is not None and not m.is_weight]  # fmt: skip
    try:
        with torch.no_grad():
            logits = qvit(images)
    finally:
        for h in hooks:
            h.remove()
    return out, logits


def _program_values(program, images) -> dict[str, torch.Tensor]:
    seen = {}

    def record(i, node, inputs, outputs):
        for name, value in zip(node.outputs, outputs):
            seen[name] = value

    with torch.no_grad():
        run(program, images, record=record)
    return seen


def _check_bit_exact(qvit, images):
    program = lower(qvit)
    points, logits = _fake_quant_codes(qvit, images)
    values = _program_values(program, images)
    compared = set()
    for name, value in values.items():
        v = program.values[name]
        assert v.dtype in ("uint8", "int8", "uint16", "int16", "int32", "float32"), name  # int64 is never stored
        if v.dtype != "float32":  # every integer lies inside its declared bounds
            assert v.lo <= int(value.min()) and int(value.max()) <= v.hi, name
        if v.point in points and v.grid is not None and points[v.point].numel() == value.numel():
            ref = points[v.point].reshape(value.shape).double()
            assert torch.equal(v.grid.dequantize(value).double(), ref.float().double()), f"{name} ({v.point})"
            compared.add(v.point)
    # Every activation point is realized by some value of the program, and equal to the fake-quant one.
    assert compared == set(points), sorted(set(points) - compared)
    out = values[program.output]
    assert torch.allclose(out, logits, rtol=0, atol=1e-5 * float(logits.abs().max()))
    assert torch.equal(out.argmax(1), logits.argmax(1))
    return program


@pytest.mark.parametrize("recipe", ["fqvit_w8a8_att8", "fqvit_w8a8_att4"])
@pytest.mark.parametrize("variant", list(VIT_VARIANTS), ids=list(VIT_VARIANTS))
def test_integer_program_is_the_fake_quant_model_value_by_value(recipe, variant):
    qvit = calibrated(recipe, model=make_tiny_vit(**VIT_VARIANTS[variant]))
    assert qvit.simulates_integer
    _check_bit_exact(qvit, tiny_images(6, seed=77))


@pytest.mark.parametrize("recipe", ["fqvit_w8a8_att8", "fqvit_w8a8_att4"])
def test_swin_program_is_the_fake_quant_model_value_by_value(recipe):
    """Window attention with its relative position bias and shift mask, PatchMerging, average pooling."""
    program = _check_bit_exact(calibrated(recipe, model=make_tiny_swin(), size=SWIN_SIZE), tiny_images(4, seed=9, size=SWIN_SIZE))
    ops = [n.op for n in program.nodes]
    assert "roll" in ops and "sum" in ops
    assert any("mask" in n.consts for n in program.nodes if n.op == "softmax")  # the shifted blocks' mask
    assert [name for name, _ in program.stages] == ["embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.1.downsample",
                                                    "layers.1.blocks.0", "layers.1.blocks.1", "head"]  # fmt: skip


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_plus_recipe_features_are_integer_too(arch):
    """fqvit_plus_w8a8_r10's features: LayerNorm reparameterization and Fisher scale search (weights and
    scales only), per-channel PTF zero points, a 10-bit residual stream (uint16), PTQ4ViT's twin grids
    after GELU (two GEMMs) and after the softmax."""
    model, size = (make_tiny_swin(), SWIN_SIZE) if arch == "swin" else (make_tiny_vit(), 32)
    program = _check_bit_exact(calibrated("fqvit_plus_w8a8_r10", model=model, size=size, integer_gelu=True), tiny_images(4, seed=9, size=size))
    kinds = {v.grid.kind for v in program.values.values() if v.grid is not None}
    assert {"twin_signed", "twin_unsigned"} <= kinds
    assert any(v.dtype == "uint16" for v in program.values.values())  # the 10-bit stream
    assert any(n.op == "decode" and n.attrs["kind"] == "twin" for n in program.nodes)


def test_distilled_deit_averages_its_two_heads_in_integers():
    program = _check_bit_exact(calibrated("fqvit_w8a8_att8", model=make_tiny_distilled()), tiny_images(4, seed=5))
    logits_node = next(n for n in program.nodes if n.name == "logits")
    assert len(logits_node.inputs) == 2  # head and head_dist on one grid


def test_program_uses_only_integer_tensors_between_its_two_float_ends():
    program = lower(calibrated("fqvit_w8a8_att4"))
    floats = [name for name, v in program.values.items() if v.dtype == "float32"]
    assert floats == [program.input, program.output]
    assert program.nodes[0].op == "quantize" and program.nodes[-1].op == "dequantize"
    ops = {n.op for n in program.nodes}
    assert {"linear", "matmul", "requant", "layernorm", "softmax", "decode", "lookup"} <= ops
    # int64 appears in no value: only inside the operations that state it (sums of squares, requantization products).
    assert all(v.dtype != "int64" for v in program.values.values())


@pytest.mark.parametrize("recipe,message", [
    ("cpu_int8", "keeps the layernorm_input kind in float"),
    ("minmax_w8a8", "keeps the layernorm_input kind in float"),
    ("fqvit_plus_w6a6", "computes the softmax in float"),
])  # fmt: skip
def test_recipes_the_program_cannot_run_are_refused_with_one_line(recipe, message):
    from quant_config import load_recipe

    refusal = load_recipe(recipe).integer_refusal()
    assert refusal is not None and message in refusal and "\n" not in refusal


def test_a_point_switched_to_float_is_refused_by_name():
    qvit = calibrated("fqvit_w8a8_att8")
    qvit.model.blocks[1].mlp.fc2.input_quant.enabled = False
    with pytest.raises(IntegerUnsupported, match=r"blocks\.1\.mlp\.fc2\.input stays float"):
        lower(qvit)


def test_the_recipe_without_integer_gelu_is_not_simulated_in_float64():
    qvit = calibrated("fqvit_w8a8_att8", integer_gelu=False)
    assert not qvit.simulates_integer
    with pytest.raises(IntegerUnsupported, match="integer_gelu: false"):
        lower(qvit)
    x = tiny_images(2)
    assert qvit(x).dtype == torch.float32


def test_program_constants_are_integers_of_the_declared_widths():
    program = lower(calibrated("fqvit_w8a8_att8"))
    for node in program.nodes:
        for key, c in node.consts.items():
            if node.op in ("quantize", "dequantize") and key == "scale":
                assert c.dtype == np.float32
            else:
                assert c.dtype.kind in "iu", (node.name, key)
        if node.op == "linear":
            assert node.consts["weight"].dtype == np.int8
