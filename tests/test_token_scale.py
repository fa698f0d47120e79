"""The dynamic per-token scale on the residual stream (models/ptq/token_scale.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import calibrated, make_tiny_vit, reloaded, tiny_images
from models.ptq.reconstruction import learnable_steps
from models.ptq.token_scale import token_factors, token_scaled_fake_quant
from quant_config import BitTypeConfig, ConfigError
from utils.onnx_export import export_plan

UINT8 = BitTypeConfig(bits=8, symmetric=False)
INT6 = BitTypeConfig(bits=6, symmetric=True)


def stream(seed: int = 0, channels: int = 24) -> torch.Tensor:
    """A residual-stream-like batch (2 images, 7 tokens): channels of different widths, one outlier token
    (a stream's few tokens with massive activations set its calibrated range)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, channels, generator=g) * torch.linspace(0.2, 4.0, channels)
    x[0, 3] = 4 * torch.linspace(0.2, 4.0, channels)
    x[1, 5] = -x[0, 3]
    return x


def static_grid(x: torch.Tensor, bt: BitTypeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel scales and zero points covering ``x`` with a 1% margin (calibration saw these values
    and others; the margin also keeps the extremes off exact rounding ties)."""
    lo, hi = x.amin((0, 1)).clamp(max=0) * 1.01, x.amax((0, 1)).clamp(min=0) * 1.01
    if bt.symmetric:
        return torch.maximum(-lo, hi) / bt.qmax, torch.zeros(x.shape[-1])
    scale = (hi - lo) / (bt.qmax - bt.qmin)
    return scale, (bt.qmin - torch.round(lo / scale)).clamp(bt.qmin, bt.qmax)


def reference(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, qmin: int, qmax: int, group: int = 0) -> np.ndarray:
    """Token by token, and within a token group of channels by group (the whole token when ``group`` is
    0): the largest factor f <= 1 at which some value of the group reaches the last code on its side of
    the zero point (for a group, the next k / 255 above it), then that group on the grid scaled by f."""
    out = np.empty_like(x, dtype=np.float64)
    width = group or x.shape[-1]
    for idx in np.ndindex(x.shape[:-1]):
        token = x[idx].astype(np.float64)
        for start in range(0, len(token), width):
            channels = range(start, start + width)
            fill = 0.0
            for c in channels:
                room = (qmax - zp[c]) if token[c] >= 0 else (zp[c] - qmin)
                if room > 0:
                    fill = max(fill, abs(token[c] / scale[c]) / room)
            f = min(max(fill, 2.0**-24), 1.0)
            if group:  # a group's factor is stored as an 8-bit k / 255, rounded up
                f = np.ceil(f * 255) / 255
            for c in channels:
                code = min(max(np.round(token[c] / (scale[c] * f)) + zp[c], qmin), qmax)
                out[idx + (c,)] = (code - zp[c]) * scale[c] * f
    return out


@pytest.mark.parametrize("group", [0, 8], ids=["token", "token-group-8"])
@pytest.mark.parametrize("bt", [UINT8, INT6], ids=["uint8", "int6"])
def test_matches_an_independent_per_token_reference(bt, group):
    x = stream()
    scale, zp = static_grid(x, bt)
    got = token_scaled_fake_quant(x, scale, zp, bt, group)
    want = reference(x.numpy(), scale.numpy(), zp.numpy(), bt.qmin, bt.qmax, group)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_groups_of_channels_refine_the_per_token_factor_where_a_token_is_uneven():
    # In every token but the two outliers the first half of the channels uses a tenth of the range the
    # outliers set: one factor per token cannot stretch that half, one per group of 6 channels can.
    x = stream(4)
    quiet = torch.ones(2, 7, 1, dtype=torch.bool)
    quiet[0, 3] = quiet[1, 5] = False
    x[..., :12] = torch.where(quiet, x[..., :12] * 0.1, x[..., :12])
    scale, zp = static_grid(x, UINT8)
    per_token = token_factors(x, scale, zp, UINT8)
    per_group = token_factors(x, scale, zp, UINT8, group=6)
    assert per_group.shape == x.shape
    # Each token's largest group factor is its per-token factor rounded up to the next k / 255.
    torch.testing.assert_close(per_group.amax(-1, keepdim=True), torch.ceil(per_token * 255) / 255)
    assert (per_group < per_token).any()
    assert torch.equal(per_group * 255, torch.round(per_group * 255))
    error = {g: (token_scaled_fake_quant(x, scale, zp, UINT8, g) - x)[quiet.squeeze(-1), :12].square().sum() for g in (0, 6)}
    assert error[6] < 0.05 * error[0]
    with pytest.raises(ValueError, match="token_scale_group 5 does not divide the stream's 24 channels"):
        token_factors(x, scale, zp, UINT8, group=5)


def test_never_coarser_than_the_static_grid_and_finer_for_narrow_tokens():
    x = stream(1)
    scale, zp = static_grid(x, UINT8)
    f = token_factors(x, scale, zp, UINT8)
    assert f.shape == (2, 7, 1) and (f <= 1).all() and (f > 0).all()
    # The token that set the calibrated range fills it: factor 1, exactly the static grid.
    assert f[0, 3].item() == pytest.approx(1.0, abs=0.02) and f[1, 5].item() == pytest.approx(1.0, abs=0.02)
    assert (f.flatten() < 0.8).sum() >= 10  # the others use a fraction of it
    static = (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    dynamic = token_scaled_fake_quant(x, scale, zp, UINT8)
    # Every value within half of its own (token-refined) step; much smaller error overall.
    assert ((dynamic - x).abs() <= scale * f / 2 + 1e-6).all()
    assert (dynamic - x).square().sum() < 0.5 * (static - x).square().sum()


def test_values_beyond_the_calibrated_range_clip_as_on_the_static_grid():
    x = stream(2)
    scale, zp = static_grid(x, UINT8)
    wide = x * 3  # an unseen image: wider than calibration
    static = (torch.clamp(torch.round(wide / scale) + zp, 0, 255) - zp) * scale
    dynamic = token_scaled_fake_quant(wide, scale, zp, UINT8)
    over = token_factors(wide, scale, zp, UINT8).squeeze(-1) == 1
    assert over.any()
    torch.testing.assert_close(dynamic[over], static[over])


def test_the_layernorm_does_not_need_the_factor():
    # What makes it cheap in integer kernels: LayerNorm of the dequantized stream equals LayerNorm of the
    # codes on the static per-channel scales, without the per-token factor (up to eps).
    x = stream(3)
    scale, zp = static_grid(x, UINT8)
    step = scale * token_factors(x, scale, zp, UINT8)
    codes = torch.clamp(torch.round(x / step) + zp, 0, 255)
    dequantized = token_scaled_fake_quant(x, scale, zp, UINT8)
    without_factor = (codes - zp) * scale
    shape = (x.shape[-1],)
    torch.testing.assert_close(F.layer_norm(dequantized, shape, eps=1e-12), F.layer_norm(without_factor, shape, eps=1e-12), atol=1e-4, rtol=1e-4)


def test_a_recipe_with_it_quantizes_the_stream_per_token_and_survives_the_calibrated_file(tmp_path):
    zero_points = {"layernorm_input.ptf_channel_zero_points": True}
    source = calibrated("fqvit_w8a8_att8", **zero_points, **{"layernorm_input.dynamic_token_scale": True})
    static = calibrated("fqvit_w8a8_att8", **zero_points)
    q = source.model.blocks[1].norm1.input_quant
    x = torch.randn(2, 5, q.num_channels) * 2
    with torch.no_grad():
        torch.testing.assert_close(q(x), token_scaled_fake_quant(x, q.scale, q.zero_point, q.spec.bit_type))
        images = tiny_images(8, seed=6)
        with source.fp32():
            fp32 = source(images)
        # The same calibration (the factor changes no statistic), a finer stream.
        assert torch.equal(q.scale, static.model.blocks[1].norm1.input_quant.scale)
        assert (source(images) - fp32).square().mean() < (static(images) - fp32).square().mean()
    target = reloaded(source, make_tiny_vit(), tmp_path / "calibrated.pt")
    assert target.recipe.layernorm_input.dynamic_token_scale
    with torch.no_grad():
        assert torch.equal(target(images), source(images))


def test_onnx_export_keeps_a_per_token_point_in_float_and_reconstruction_learns_no_static_step_for_it():
    # An 8-bit per-tensor LayerNorm input would be a Q/DQ pair and an LSQ-learnable step; with a factor
    # computed at run time it is neither.
    grid = {"layernorm_input.power_of_two_factor": False, "layernorm_input.calibration_mode": "layer_wise"}
    for dynamic, plan in ((False, "qdq"), (True, "float")):
        qvit = calibrated("fqvit_w8a8_att8", **grid, **{"layernorm_input.dynamic_token_scale": dynamic})
        stream_points = [p for p in export_plan(qvit, zero_points=True) if ".norm" in p.name]
        assert stream_points and {p.plan for p in stream_points} == {plan}
        assert dynamic == all("dynamic per-token" in p.reason for p in stream_points)
        steps = learnable_steps(qvit.model.blocks[0])
        assert ("norm1.input_quant" in steps) != dynamic and "attn.qkv.input_quant" in steps


def test_a_group_that_does_not_divide_a_layernorm_is_refused_before_calibration():
    with pytest.raises(ConfigError, match=r"token_scale_group 5 does not divide the 32 channels of blocks.0.norm1.input_quant"):
        calibrated("fqvit_w8a8_att8", **{"layernorm_input.dynamic_token_scale": True, "layernorm_input.token_scale_group": 5})
