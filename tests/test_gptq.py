"""GPTQ weight rounding against an independent Optimal-Brain-Quantization loop, and inside QVit."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import calibrated, make_tiny_vit, tiny_images
from models.ptq.gptq import collect_hessians, gptq_quantize, input_rows
from models.ptq.tensor_quantizer import QuantState, TensorQuantizer
from models.quant_vit import QVit
from quant_config import BitTypeConfig, ConfigError, GPTQSpec, QuantizerSpec, load_recipe
from utils.checkpoint import load_calibrated, read_calibrated, save_calibrated, weights_sha256
from utils.errors import UserError


def obq_reference(W: np.ndarray, H: np.ndarray, scale: np.ndarray, bits: int, order: np.ndarray) -> np.ndarray:
    """The OBQ update written out in float64: quantize one column, spread its error over the free columns
    through the inverse Hessian, then remove that column from the inverse (no Cholesky, no blocks)."""
    W, Hinv = W.copy(), np.linalg.inv(H)
    qmax = 2 ** (bits - 1) - 1
    Q = np.zeros_like(W)
    free = list(order)
    for i in order:
        q = np.clip(np.round(W[:, i] / scale), -qmax - 1, qmax) * scale
        Q[:, i] = q
        free.remove(i)
        err = (W[:, i] - q) / Hinv[i, i]
        for j in free:
            W[:, j] -= err * Hinv[i, j]
        Hinv = Hinv - np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return Q


def setup(bits: int, seed: int = 0, rows: int = 400, out: int = 12, cols: int = 20):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.5 + torch.eye(cols)  # correlated inputs: where GPTQ helps
    X = (torch.randn(rows, cols, generator=g) @ mix) * torch.linspace(0.2, 3.0, cols)
    W = torch.randn(out, cols, generator=g)
    spec = QuantizerSpec(bit_type=BitTypeConfig(bits, True, f"int{bits}"), calibration_mode="channel_wise")
    q = TensorQuantizer(spec, QuantState(), num_channels=out, channel_axis=0, is_weight=True)
    q.observer.update(W)
    q.finalize()
    return X, W, q


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [1, 7, 128])
def test_gptq_equals_the_plain_obq_loop(act_order, block):
    X, W, q = setup(4)
    H = X.T @ X
    spec = GPTQSpec(damp=0.01, act_order=act_order, block=block)
    Q = gptq_quantize(W, H, q, spec)
    Hd = H.double().numpy()
    Hd = Hd + np.eye(len(Hd)) * 0.01 * np.diag(Hd).mean()
    order = np.argsort(-np.diag(H.numpy()), kind="stable") if act_order else np.arange(W.shape[1])
    ref = obq_reference(W.double().numpy(), Hd, q.scale.double().numpy()[:, None].squeeze(1), 4, order)
    # Same levels, up to a rare float32 tie: at most one weight in 240 lands on a neighbouring level.
    differs = np.abs(Q.numpy() - ref) > 1e-4
    assert differs.sum() <= 1
    codes = Q / q.scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.round().min() >= -8 and codes.round().max() <= 7


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_gptq_output_error_is_below_round_to_nearest(bits):
    X, W, q = setup(bits, seed=bits)
    Q = gptq_quantize(W, X.T @ X, q, GPTQSpec())
    rtn = q.method.fake_quant(W, q.scale[:, None], q.zero_point[:, None], q.spec.bit_type)
    gptq_err = (X @ (W - Q).T).square().sum()
    rtn_err = (X @ (W - rtn).T).square().sum()
    assert gptq_err < 0.7 * rtn_err
    assert (W - Q).square().sum() > (W - rtn).square().sum()  # it is the output, not the weights, that improves


def test_a_patch_convolution_is_rounded_as_the_linear_on_its_patches():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
    images = torch.randn(6, 3, 16, 16)
    rows = input_rows(conv, images)
    assert rows.shape == (6 * 16, 48)
    out = conv(images).flatten(2).transpose(1, 2).reshape(-1, 8)
    torch.testing.assert_close(rows @ conv.weight.reshape(8, -1).T + conv.bias, out, rtol=1e-5, atol=1e-5)
    with collect_hessians({"conv": conv}, rows=10_000) as collector:
        conv(images)
    torch.testing.assert_close(collector.hessians["conv"], rows.T @ rows, rtol=1e-5, atol=1e-4)
    spec = QuantizerSpec(bit_type=BitTypeConfig(4, True, "int4"), calibration_mode="channel_wise")
    q = TensorQuantizer(spec, QuantState(), num_channels=8, channel_axis=0, is_weight=True)
    q.observer.update(conv.weight.detach())
    q.finalize()
    rounded = gptq_quantize(conv.weight, collector.hessians["conv"], q, GPTQSpec())
    assert rounded.shape == conv.weight.shape
    flat = gptq_quantize(conv.weight.detach().reshape(8, -1), rows.T @ rows, q, GPTQSpec())
    assert (rounded.reshape(8, -1) != flat).float().mean() < 0.01


def test_dead_inputs_are_ignored():
    X, W, q = setup(4)
    X[:, 3] = 0.0
    Q = gptq_quantize(W, X.T @ X, q, GPTQSpec())
    assert torch.isfinite(Q).all() and (Q[:, 3] == 0).all()


def gptq_recipe(**extra):
    return {"weight.bit_type.bits": 4, "gptq": {}, **extra}


def test_qvit_rounds_every_linear_weight_and_lowers_the_output_error():
    qvit = calibrated("fqvit_w8a8_att8", **gptq_recipe())
    plain = calibrated("fqvit_w8a8_att8", **{"weight.bit_type.bits": 4})
    linears = qvit.gptq_layers()
    assert len(linears) == 2 * 4 + 2  # qkv, proj, fc1, fc2 per block, the head and the patch embedding
    for name, module in linears.items():
        q = module.weight_quant
        assert q.rounded is not None and torch.equal(q(module.weight.detach()), q.rounded)
        other = dict(plain.model.named_modules())[name].weight_quant
        assert torch.equal(q.scale, other.scale)  # same grid, other levels
        assert not torch.equal(q.rounded, other(module.weight.detach()))
    assert not any(q.rounded is not None for n, q in qvit.quantizers().items() if not n.endswith("weight_quant"))
    x = tiny_images(16, seed=5)
    with qvit.fp32():
        ref = qvit(x)
    assert (qvit(x) - ref).square().mean() < (plain(x) - ref).square().mean()


def test_gptq_calibration_survives_save_load_and_state_dict(tmp_path):
    model = make_tiny_vit()
    qvit = calibrated("fqvit_w8a8_att8", model=model, **gptq_recipe())
    x = tiny_images(4, seed=6)
    out = qvit(x)
    path = tmp_path / "calibrated.pt"
    save_calibrated(qvit, path, "tiny", weights_sha256(model), None)
    record, recipe = read_calibrated(path)
    assert recipe.gptq == GPTQSpec()
    fresh = QVit(make_tiny_vit(), recipe)
    load_calibrated(fresh, record, path, weights_sha256(make_tiny_vit()))
    assert torch.equal(fresh(x), out)
    # A file without the rounded weights would silently round to nearest: refused.
    record["quantizers"] = {k: v for k, v in record["quantizers"].items() if not k.endswith(".rounded")}
    with pytest.raises(UserError, match="does not match the quantizers"):
        load_calibrated(QVit(make_tiny_vit(), recipe), record, path, weights_sha256(make_tiny_vit()))


@pytest.mark.parametrize(
    "value,message",
    [
        ({"damp": 0}, "gptq.damp must be a number in"),
        ({"block": 0}, "gptq.block must be an integer"),
        ({"act_order": "yes"}, "gptq.act_order must be true or false"),
        ({"rows": 3}, "gptq.rows must be an integer"),
        ({"lr": 1}, "unknown key 'lr'"),
    ],
)
def test_bad_gptq_values_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("fqvit_w8a8_att8", {"gptq": value})
    with pytest.raises(ConfigError, match="gptq rounds the quantized weights"):
        load_recipe("minmax_w8a8", {"weight": None, "gptq": {}})


def test_onnx_export_carries_the_gptq_weights():
    from utils.onnx_export import export_plan, qdq_hooks

    qvit = calibrated("trt_int8", gptq={})
    plan = export_plan(qvit)
    with torch.no_grad(), qdq_hooks(qvit, plan):
        for module in qvit.gptq_layers().values():
            exported = module.weight_quant(module.weight)
            assert torch.allclose(exported, module.weight_quant.rounded, atol=1e-7)
            assert not torch.allclose(exported, module.weight)
