"""NaN or infinity in the weights or the activations: calibration refuses with one line naming the first
point that saw them and the batch, instead of a traceback from deep in an observer."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import calibrated, make_tiny_vit, tiny_images
from models.quant_vit import QVit
from quant_config import load_recipe
from test_cli import MODEL, assert_user_error, data, fast, run_cli  # noqa: F401 (module fixture)
from utils.engine import calibrate
from utils.errors import UserError

RECIPES = ["fqvit_w8a8_att8", "trt_int8", "minmax_w8a8", "fqvit_w8a8_att4"]  # histograms, reparam, MinMax only, PTF


def batches(n: int = 3) -> list:
    return [(tiny_images(4, seed=40 + i), None, 0) for i in range(n)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_nan_weight_is_refused_naming_it(recipe):
    model = make_tiny_vit()
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[3, 5] = math.nan
    qvit = QVit(model, load_recipe(recipe))
    with pytest.raises(UserError, match=r"^blocks\.1\.mlp\.fc1\.weight holds NaN or infinite values; calibration needs finite weights"):
        calibrate(qvit, batches(), torch.device("cpu"), progress=False)
    assert not qvit.is_calibrated


@pytest.mark.parametrize("recipe", RECIPES)
def test_infinite_activations_are_refused_naming_the_first_point_and_the_batch(recipe):
    model = make_tiny_vit()
    qvit = QVit(model, load_recipe(recipe))
    # The second batch overflows inside block 0: its LayerNorm's output (the qkv input) goes infinite.
    normal = batches(1)[0]
    poisoned = (tiny_images(4, seed=41), None, 0)
    original = qvit.model.blocks[0].norm1.normalize

    def overflow(x):
        out = original(x)
        return out * math.inf if getattr(overflow, "armed", False) else out

    qvit.model.blocks[0].norm1.normalize = overflow
    source = [normal, poisoned]

    class Arming:  # arms the overflow for the second batch of every pass
        def __iter__(self):
            for i, item in enumerate(source):
                overflow.armed = i == 1
                yield item

    with pytest.raises(UserError) as error:
        calibrate(qvit, Arming(), torch.device("cpu"), progress=False)
    # trt_int8 first reparameterizes: its pass observes the LayerNorm outputs themselves.
    expected = "blocks.0.norm1.output" if recipe == "trt_int8" else "blocks.0.attn.qkv.input"
    first_pass = "reparameterize" if recipe == "trt_int8" else ("calibrate" if recipe == "minmax_w8a8" else "ranges")
    assert str(error.value) == f"{expected} saw NaN or infinite values in calibration batch 2 ({first_pass} pass); calibration needs finite activations"
    assert not qvit.is_calibrated


def test_finite_calibration_is_unchanged():
    qvit = calibrated("fqvit_w8a8_att8")
    assert qvit.is_calibrated and qvit.first_non_finite_point() is None and not bool(qvit.non_finite_flag())


def test_cli_refuses_a_checkpoint_with_one_nan_weight(data, tmp_path):  # noqa: F811
    import timm

    torch.manual_seed(0)
    state = timm.create_model(MODEL).state_dict()
    state["blocks.2.attn.proj.weight"][0, 0] = math.nan
    checkpoint = tmp_path / "nan.pth"
    torch.save(state, checkpoint)
    log = tmp_path / "log"
    result = run_cli("--model", MODEL, "--checkpoint", checkpoint, *fast(data, log))
    assert_user_error(result, log, r"^error: blocks\.2\.attn\.proj\.weight holds NaN or infinite values; calibration needs finite weights")


def test_evaluation_counts_non_finite_logits_and_scores_them_as_wrong():
    from models.ptq.tensor_quantizer import QuantMode
    from utils.engine import evaluate

    qvit = calibrated("fqvit_w8a8_att8")
    x, y = tiny_images(6, seed=50), torch.arange(6) % 10
    clean = evaluate(qvit, [(x, y, 0)], torch.device("cpu"), progress=False)

    def poison(module, args, out):  # the quantized model's logits of the first two images are NaN
        if qvit.state.mode is QuantMode.QUANT:
            out = out.clone()
            out[:2] = math.nan
        return out

    handle = qvit.model.head.register_forward_hook(poison)
    try:
        result = evaluate(qvit, [(x, y, 0)], torch.device("cpu"), progress=False)
    finally:
        handle.remove()
    assert (result.non_finite_fp32, result.non_finite_int8) == (0, 2) and (clean.non_finite_fp32, clean.non_finite_int8) == (0, 0)
    assert (result.int8_top5[:2] == -1).all() and (result.int8_top5[2:] == clean.int8_top5[2:]).all()
    assert result.fp32.top1 == clean.fp32.top1
    # Cosine 0 for the two NaN rows, the others as before: nothing NaN reaches the mean.
    assert math.isfinite(result.logit_cosine) and result.logit_cosine < clean.logit_cosine
    assert result.agreement_top1 == pytest.approx((clean.fp32_top5[2:, 0] == clean.int8_top5[2:, 0]).sum() / 6)
