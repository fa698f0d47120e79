"""Block reconstruction (learned weight rounding, BRECQ / AdaRound / QDrop) on tiny ViTs and Swins."""
from __future__ import annotations

import pytest
import torch

from conftest import SWIN_SIZE, calibrated, make_tiny_swin, make_tiny_vit, reloaded, tiny_images
from quant_config import ConfigError, load_recipe

FAST = {"iters": 150, "images": 16, "batch": 8, "lr": 0.01}


def rtn_and_learned_block_errors(qvit, images: torch.Tensor, calibrated_scales: dict | None = None) -> list[tuple[float, float]]:
    """Per block: the output error against the FP32 block, on the quantized model's own inputs, with
    round-to-nearest weights (and ``calibrated_scales``, the steps before any was learned) and with the
    learned ones (computed here, not by the library)."""
    errors = []
    with torch.no_grad():
        with qvit.fp32():
            x_fp = qvit.first_block_input(images)
        x_q = qvit.first_block_input(images)
        for _, block in qvit.block_sequence():
            with qvit.fp32():
                target = block(x_fp)
            learned = float((block(x_q) - target).square().sum())
            rounded = {q: q.rounded for q in qvit.quantizers().values() if q.rounded is not None}
            learned_scales = {name: q.scale.clone() for name, q in qvit.quantizers().items()}
            for q in rounded:
                q.set_rounded(None)
            for name, scale in (calibrated_scales or {}).items():
                qvit.quantizers()[name].scale.copy_(scale)
            rtn = float((block(x_q) - target).square().sum())
            for q, value in rounded.items():
                q.set_rounded(value)
            for name, scale in learned_scales.items():
                qvit.quantizers()[name].scale.copy_(scale)
            errors.append((rtn, learned))
            x_fp, x_q = target, block(x_q)
    return errors


@pytest.mark.parametrize("recipe,overrides", [("trt_int8", {}), ("fqvit_w8a8_att8", {"weight.bit_type.bits": 4})], ids=["trt_int8", "fqvit-w4"])
def test_reconstruction_never_ends_worse_than_round_to_nearest(recipe, overrides):
    qvit = calibrated(recipe, reconstruction=FAST, **overrides)
    learned_points = [q for q in qvit.quantizers().values() if q.rounded is not None]
    assert learned_points, "no block took its learned rounding"
    # The calibration images the blocks learned on (the first 16: calibrated() passes 3 batches of 8).
    images = torch.cat([tiny_images(8, seed=10 + i) for i in range(2)])
    errors = rtn_and_learned_block_errors(qvit, images)
    assert all(learned <= rtn * (1 + 1e-6) for rtn, learned in errors), errors
    assert sum(learned for _, learned in errors) < sum(rtn for rtn, _ in errors)


def test_learned_activation_steps_end_in_the_scale_buffers_and_never_raise_a_block_error():
    from models.ptq.reconstruction import learnable_steps

    overrides = {"weight.bit_type.bits": 4, "activation.bit_type.bits": 4, "integer_softmax": False}
    start = {name: q.scale.clone() for name, q in calibrated("fqvit_w8a8_att8", **overrides).quantizers().items()}
    qvit = calibrated("fqvit_w8a8_att8", reconstruction={**FAST, "scale_lr": 0.01}, **overrides)
    learnable = {f"{block_name}.{name}" for block_name, block in qvit.block_sequence() for name in learnable_steps(block)}
    assert {"blocks.0.attn.qkv.input_quant", "blocks.0.attn.q_act.input_quant", "blocks.1.mlp.fc1.input_quant"} <= learnable
    assert not any(name.endswith(("weight_quant", "norm1.input_quant", "norm2.input_quant")) for name in learnable)  # weights and PTF stay
    moved = {name for name, q in qvit.quantizers().items() if not torch.equal(q.scale, start[name])}
    assert moved and moved <= learnable  # only learnable steps moved (calibration itself is deterministic)
    images = torch.cat([tiny_images(8, seed=10 + i) for i in range(2)])
    errors = rtn_and_learned_block_errors(qvit, images, calibrated_scales=start)
    assert all(learned <= rtn * (1 + 1e-6) for rtn, learned in errors), errors
    assert sum(learned for _, learned in errors) < sum(rtn for rtn, _ in errors)


def test_learned_rounding_is_on_the_grid_within_one_step():
    qvit = calibrated("fqvit_w8a8_att8", reconstruction=FAST, **{"weight.bit_type.bits": 4})
    checked = 0
    for name, module in qvit.model.named_modules():
        q = getattr(module, "weight_quant", None)
        if q is None or q.rounded is None:
            continue
        scale = q.scale.view(-1, *([1] * (module.weight.dim() - 1)))
        codes = q.rounded / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4), name  # on the grid (symmetric: zero point 0)
        bt = q.spec.bit_type
        assert codes.round().min() >= bt.qmin and codes.round().max() <= bt.qmax
        assert ((q.rounded - module.weight).abs() <= scale * (1 + 1e-5)).all(), name  # within one step
        nearest = torch.round(module.weight / scale).clamp(bt.qmin, bt.qmax) * scale
        checked += int((q.rounded != nearest).any())
    assert checked > 0  # some weight really left round-to-nearest


def test_learned_rounding_survives_saving_and_is_what_the_export_stores(tmp_path):
    onnx = pytest.importorskip("onnx")
    from utils.onnx_export import export_onnx, weight_initializers

    source = calibrated("trt_int8", reconstruction=FAST)
    target = reloaded(source, make_tiny_vit(), tmp_path / "calibrated.pt")
    x = tiny_images(8, seed=6)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    export_onnx(source, tmp_path / "int8.onnx", (32, 32))
    stored = [w.tobytes() for w in weight_initializers(onnx.load(str(tmp_path / "int8.onnx"))).values()]
    for name, module in source.model.named_modules():
        q = getattr(module, "weight_quant", None)
        if q is not None and q.rounded is not None:
            codes = torch.round(q.rounded / q.scale.view(-1, *([1] * (module.weight.dim() - 1)))).to(torch.int8).numpy()
            assert codes.tobytes() in stored, name


def test_the_profiler_measures_the_learned_rounding():
    from utils.profiler import point_name, run_profile

    qvit = calibrated("fqvit_w8a8_att8", reconstruction=FAST, **{"weight.bit_type.bits": 4})
    table = run_profile(qvit, [(tiny_images(4, seed=3), None, 0)]).table.set_index("name")
    weights = dict(qvit.model.named_parameters())
    checked = 0
    for name, q in qvit.quantizers().items():
        if q.rounded is None:
            continue
        weight = weights[name.removesuffix("_quant")]
        nearest = q.method.fake_quant(weight, q.broadcast(q.scale, weight), q.broadcast(q.zero_point, weight), q.spec.bit_type)
        assert table.loc[point_name(name), "mse"] == pytest.approx(float((q.rounded - weight).square().mean()), rel=1e-5), name
        checked += int(not torch.equal(q.rounded, nearest))
    assert checked  # and that differs from round-to-nearest's error somewhere


def test_swin_blocks_and_patch_merging_reconstruct():
    qvit = calibrated("trt_int8", model=make_tiny_swin(), size=SWIN_SIZE, reconstruction=FAST)
    rounded = {n for n, q in qvit.quantizers().items() if q.rounded is not None}
    assert any(n.startswith("layers.0.blocks.") for n in rounded)


@pytest.mark.parametrize("value,message", [({"iters": 0}, r"reconstruction\.iters must be an integer from 1"),
                                           ({"drop": 1.5}, r"reconstruction\.drop must be a number from 0 to 1"),
                                           ({"lr": 0}, r"reconstruction\.lr must be a number in \(0, 1\]"),
                                           ({"scale_lr": -1}, r"reconstruction\.scale_lr must be a number from 0 to 1")])  # fmt: skip
def test_bad_reconstruction_values_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("trt_int8", {"reconstruction": value})
