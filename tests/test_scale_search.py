"""Output-error scale search (models/ptq/scale_search.py) against brute-force references on a tiny ViT."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_vit, tiny_images
from models.ptq.layers import QuantAttention, QuantLinear
from models.quant_vit import QVit
from quant_config import ConfigError, load_recipe
from utils.checkpoint import load_calibrated, read_calibrated, save_calibrated, weights_sha256
from utils.engine import calibrate

SEARCH = {"metric": "output", "candidates": 12, "min_ratio": 0.4, "images": 1000, "rows": 100000}  # every row: exact sums


def batches():
    return [(tiny_images(8, seed=40 + i), None, 0) for i in range(3)]


def searched(recipe: str = "minmax_w8a8", **search) -> tuple[QVit, QVit]:
    """The same tiny ViT calibrated with ``recipe`` alone and with the output-error search after it."""
    plain = QVit(make_tiny_vit(), load_recipe(recipe))
    calibrate(plain, batches(), torch.device("cpu"), progress=False)
    recipe_with_search = load_recipe(recipe, {"scale_search": {**SEARCH, **search}})
    refined = QVit(make_tiny_vit(), recipe_with_search)
    calibrate(refined, batches(), torch.device("cpu"), progress=False)
    return plain, refined


def fp32_inputs(qvit: QVit) -> dict[str, list[torch.Tensor]]:
    """Every QuantLinear's and QuantAttention's float input over the calibration batches."""
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: captured.setdefault(name, []).append(args[0].detach().clone()))
        for name, m in qvit.model.named_modules()
        if isinstance(m, (QuantLinear, QuantAttention))
    ]
    with torch.no_grad(), qvit.fp32():
        for x, _, _ in batches():
            qvit(x)
    for h in hooks:
        h.remove()
    return captured


def uniform_fq(x: torch.Tensor, scale: float, zp: float, qmin: int, qmax: int) -> torch.Tensor:
    """Reference fake quantization, written out independently of the library."""
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


@torch.no_grad()
def linear_error(module: QuantLinear, xs: list[torch.Tensor], scale: float) -> float:
    bt = module.input_quant.spec.bit_type
    zp = float(module.input_quant.zero_point)
    w_q = module.weight_quant.fake_quant(module.weight)
    return sum(
        float((F.linear(uniform_fq(x, scale, zp, bt.qmin, bt.qmax), w_q, module.bias) - F.linear(x, module.weight, module.bias)).square().sum())
        for x in xs
    )


def test_search_picks_the_brute_force_minimum_and_never_does_worse_than_minmax():
    plain, refined = searched()
    inputs = fp32_inputs(plain)
    ratios = torch.linspace(SEARCH["min_ratio"], 1.0, SEARCH["candidates"], dtype=torch.float64).tolist()
    improved = 0
    linears = {n: m for n, m in plain.model.named_modules() if isinstance(m, QuantLinear)}
    assert {f"{n}.input_quant" for n in linears} <= set(refined.searched_ratios)
    for name, module in linears.items():
        minmax_scale = module.input_quant.scale_value
        errors = [linear_error(module, inputs[name], minmax_scale * r) for r in ratios]
        best = ratios[min(range(len(ratios)), key=errors.__getitem__)]
        assert refined.searched_ratios[f"{name}.input_quant"] == pytest.approx(best, rel=1e-9), name
        new_scale = refined.model.get_submodule(name).input_quant.scale_value
        assert new_scale == pytest.approx(minmax_scale * best, rel=1e-6)
        assert linear_error(module, inputs[name], new_scale) <= errors[-1] * (1 + 1e-6)  # ratio 1 = MinMax
        improved += linear_error(module, inputs[name], new_scale) < 0.99 * errors[-1]
    assert improved >= 2  # the search is not a no-op on these activations


@torch.no_grad()
def test_attention_map_scale_minimises_the_error_of_attention_times_values():
    plain, refined = searched("trt_int8", candidates=8)
    inputs = fp32_inputs(plain)
    ratios = torch.linspace(SEARCH["min_ratio"], 1.0, 8, dtype=torch.float64).tolist()
    for name, attn in ((n, m) for n, m in plain.model.named_modules() if isinstance(m, QuantAttention)):
        q_out = attn.softmax.output_quant
        bt, scale = q_out.spec.bit_type, q_out.scale_value
        errors = []
        for ratio in ratios:
            total = 0.0
            for x in inputs[name]:
                B, N, C = x.shape
                qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
                q, k, v = qkv.unbind(0)
                a = (q * attn.scale @ k.transpose(-2, -1)).softmax(-1)
                total += float(((uniform_fq(a, scale * ratio, 0.0, bt.qmin, bt.qmax) - a) @ v).square().sum())
            errors.append(total)
        best = ratios[min(range(len(ratios)), key=errors.__getitem__)]
        assert refined.searched_ratios[f"{name}.softmax.output_quant"] == pytest.approx(best, rel=1e-9)


def test_fisher_metric_picks_the_minimum_of_the_gradient_weighted_error():
    plain, refined = searched("fqvit_w8a8_att8", metric="fisher")
    ratios = torch.linspace(SEARCH["min_ratio"], 1.0, SEARCH["candidates"], dtype=torch.float64).tolist()
    points = {n: q for n, q in plain.quantizers().items() if n in refined.searched_ratios}
    # Every uniform activation is searched: the image, the integer softmax's scores and the per-channel
    # (PTF) LayerNorm inputs included; the log2 grids and the weights are not.
    assert "patch_embed.proj.input_quant" in points and "blocks.0.attn.softmax.input_quant" in points
    assert "blocks.1.norm2.input_quant" in points and points["blocks.1.norm2.input_quant"].per_channel
    assert not any(q.kind == "weight" for q in points.values())
    errors = {n: [0.0] * len(ratios) for n in points}
    for x, _, _ in batches():
        seen: dict[str, torch.Tensor] = {}
        hooks = [q.register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, out)) for n, q in points.items()]
        with plain.fp32():
            logits = plain(x.clone().requires_grad_(True))
        for h in hooks:
            h.remove()
        loss = F.cross_entropy(logits, logits.argmax(1), reduction="sum")
        grads = dict(zip(seen, torch.autograd.grad(loss, list(seen.values()))))
        with torch.no_grad():
            for n, q in points.items():
                bt, zp, scale = q.spec.bit_type, q.zero_point, q.scale  # per channel along the last axis
                t, g = seen[n], grads[n]
                for i, r in enumerate(ratios):
                    errors[n][i] += float(((uniform_fq(t, scale * r, zp, bt.qmin, bt.qmax) - t) * g).square().sum())
    for n in points:
        best = ratios[min(range(len(ratios)), key=errors[n].__getitem__)]
        assert refined.searched_ratios[n] == pytest.approx(best, rel=1e-9), n
    assert any(r < 1.0 for r in refined.searched_ratios.values())
    assert all(p.grad is None for p in refined.parameters())  # gradients went to the activations only


def test_search_leaves_fp32_unchanged_and_survives_save_and_load(tmp_path):
    plain, refined = searched("fqvit_w8a8_att8", metric="fisher")
    x = tiny_images(8, seed=77)
    with torch.no_grad():
        with plain.fp32(), refined.fp32():
            torch.testing.assert_close(refined(x), plain(x), rtol=0, atol=0)
        assert not torch.equal(refined(x), plain(x))
    # PTF LayerNorm inputs move all their channels' scales together: the power-of-two steps stay.
    name = next(n for n in refined.searched_ratios if "norm" in n and refined.searched_ratios[n] < 1)
    before, after = plain.model.get_submodule(name).scale, refined.model.get_submodule(name).scale
    torch.testing.assert_close(after / before, torch.full_like(before, refined.searched_ratios[name]))
    model = make_tiny_vit()
    fingerprint = weights_sha256(model)
    save_calibrated(refined, tmp_path / "c.pt", "tiny", fingerprint, None)
    record, recipe = read_calibrated(tmp_path / "c.pt")
    assert recipe.scale_search is not None
    loaded = QVit(model, recipe)
    load_calibrated(loaded, record, tmp_path / "c.pt", fingerprint)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), refined(x), rtol=0, atol=0)


def test_search_needs_a_calibrated_model_and_valid_values():
    qvit = QVit(make_tiny_vit(), load_recipe("minmax_w8a8", {"scale_search": {}}))
    with pytest.raises(RuntimeError, match="calibrate first"):
        with qvit.searching_scales():
            pass
    with pytest.raises(RuntimeError, match="no scale_search"):
        with QVit(make_tiny_vit(), load_recipe("minmax_w8a8")).searching_scales():
            pass
    for value, message in (
        ({"candidates": 1}, "candidates must be an integer from 2"),
        ({"min_ratio": 1.5}, "min_ratio must be a number between 0 and 1"),
        ({"rows": "many"}, "rows must be an integer"),
        ({"ratio": 0.5}, "unknown key 'ratio'"),
        ({"metric": "hessian"}, "unknown metric 'hessian'; valid: fisher, output"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_recipe("minmax_w8a8", {"scale_search": value})


def test_search_uses_only_the_first_images():
    qvit = QVit(make_tiny_vit(), load_recipe("minmax_w8a8", {"scale_search": {**SEARCH, "images": 8}}))
    seen = []
    hook = qvit.model.head.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])) if qvit.searched_ratios == {} else None)
    result = calibrate(qvit, batches(), torch.device("cpu"), progress=False)
    hook.remove()
    assert result.images == 24  # calibration proper saw every image
    assert len(seen) == 3 + 1  # the calibration pass's 3 batches, then one search batch of 8


def test_fisher_search_on_a_model_built_in_inference_mode_says_why_it_cannot():
    with torch.inference_mode():
        model = make_tiny_vit()
    qvit = QVit(model, load_recipe("fqvit_w8a8_att8", {"scale_search": {}}))
    with pytest.raises(RuntimeError, match="create the model outside torch.inference_mode"):
        calibrate(qvit, [(tiny_images(8, seed=10), None, 0)], torch.device("cpu"), progress=False)
