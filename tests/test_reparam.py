"""LayerNorm -> Linear channel reparameterization (models/ptq/reparam.py) on tiny random ViTs."""
from __future__ import annotations

import pytest
import torch

from conftest import SWIN_SIZE, exact_int8_kernels, make_tiny_swin, make_tiny_vit, tiny_images
from models.ptq.reparam import activation_linear_pairs, layernorm_linear_pairs, observe_linear_inputs, value_projection_pairs
from models.quant_vit import QVit
from quant_config import ConfigError, load_recipe
from utils.checkpoint import load_calibrated, read_calibrated, save_calibrated, weights_sha256
from utils.engine import calibrate
from utils.errors import UserError

CPU = torch.device("cpu")


def outlier_vit(seed: int = 0, **kwargs) -> torch.nn.Module:
    """A tiny ViT whose LayerNorms have a few wide, off-centre channels, as trained ViTs do."""
    model = make_tiny_vit(seed, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)  # timm initialises them to zero; trained biases are not
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight[:3] *= torch.tensor([12.0, -8.0, 6.0])
                norm.bias[3:5] += torch.tensor([3.0, -2.5])
    return model


def gelu_outlier_vit(seed: int = 0) -> torch.nn.Module:
    """outlier_vit whose MLP hidden activations and attention values have a few channels far wider than
    the rest (as the post-GELU fc2 inputs and the proj inputs of a trained ViT do)."""
    model = outlier_vit(seed)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.fc1.weight[:4] *= 10.0
            block.mlp.fc1.bias[:4] += 2.0
            v_rows = 2 * block.attn.proj.in_features
            block.attn.qkv.weight[v_rows : v_rows + 3] *= 10.0
    return model


def images() -> list[torch.Tensor]:
    return [tiny_images(8, seed=10 + i) for i in range(3)]


def reparameterized(alpha: float, shift: bool = True, model=None, mlp_alpha: float | None = None, value_alpha: float | None = None) -> QVit:
    reparam = {"alpha": alpha, "shift": shift, "mlp_alpha": mlp_alpha, "value_alpha": value_alpha}
    qvit = QVit(model if model is not None else outlier_vit(), load_recipe("trt_int8", {"reparam": reparam}))
    with torch.no_grad(), qvit.reparameterizing():
        for x in images():
            qvit(x)
    return qvit


def ranges(qvit: QVit, pairs=layernorm_linear_pairs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad(), qvit.fp32(), observe_linear_inputs(pairs(qvit.model)) as seen:
        for x in images():
            qvit(x)
    return {name: observer.compute_range() for name, observer in seen.items()}


@pytest.mark.parametrize("alpha,shift,mlp_alpha,value_alpha", [(0.0, True, None, None), (0.5, True, None, None), (1.0, True, None, None),
                                                                (0.7, False, None, None), (1.0, True, 0.0, None), (1.0, True, 0.5, 0.5),
                                                                (0.5, False, 1.0, 1.0), (1.0, True, None, 0.0)])  # fmt: skip
def test_fp32_output_is_unchanged(alpha, shift, mlp_alpha, value_alpha):
    reference = QVit(gelu_outlier_vit(), load_recipe("trt_int8"))
    qvit = reparameterized(alpha, shift, gelu_outlier_vit(), mlp_alpha, value_alpha)
    activations = {f"blocks.{i}.mlp.act" for i in range(2)} if mlp_alpha is not None else set()
    values = {f"blocks.{i}.attn.v" for i in range(2)} if value_alpha is not None else set()
    assert set(qvit.reparam_factors) == {f"blocks.{i}.norm{j}" for i in range(2) for j in (1, 2)} | activations | values
    x = tiny_images(8, seed=3)
    with torch.no_grad(), reference.fp32(), qvit.fp32():
        expected, actual = reference(x), qvit(x)
    assert not torch.equal(qvit.model.blocks[0].attn.qkv.weight, reference.model.blocks[0].attn.qkv.weight)
    for linear, migrated in (("mlp.fc2", mlp_alpha), ("attn.proj", value_alpha)):
        weight, weight0 = qvit.model.blocks[0].get_submodule(linear).weight, reference.model.blocks[0].get_submodule(linear).weight
        assert torch.equal(weight, weight0) == (migrated is None)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_swin_attention_values_migrate_with_the_fp32_output_unchanged():
    reference = QVit(make_tiny_swin(), load_recipe("trt_int8"))
    qvit = QVit(make_tiny_swin(), load_recipe("trt_int8", {"reparam": {"alpha": 1.0, "mlp_alpha": 0.5, "value_alpha": 0.5}}))
    with torch.no_grad(), qvit.reparameterizing():
        qvit(tiny_images(8, seed=10, size=SWIN_SIZE))
    assert {"layers.0.blocks.1.attn.v", "layers.1.blocks.0.mlp.act"} <= set(qvit.reparam_factors)
    x = tiny_images(4, seed=3, size=SWIN_SIZE)
    with torch.no_grad(), reference.fp32(), qvit.fp32():
        torch.testing.assert_close(qvit(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("key,pair_kind", [("mlp_alpha", activation_linear_pairs), ("value_alpha", value_projection_pairs)])
def test_half_strength_balances_the_migrated_inputs_against_their_weight_columns(key, pair_kind):
    before = ranges(QVit(gelu_outlier_vit(), load_recipe("trt_int8")), pair_kind)
    qvit = reparameterized(1.0, model=gelu_outlier_vit(), **{key: 0.5})
    pairs = pair_kind(qvit.model)
    for name, (lo, hi) in ranges(qvit, pair_kind).items():
        activation = torch.maximum(lo.abs(), hi.abs())
        weight = pairs[name][1].weight.detach().abs().amax(dim=0)
        ratio = activation / weight
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.mean())), rtol=1e-4, atol=0)
        lo0, hi0 = before[name]
        width0 = torch.maximum(lo0.abs(), hi0.abs())
        assert width0.max() / width0.median() > 5  # wide channels to start with
        assert activation.max() / activation.median() < 0.5 * width0.max() / width0.median()


@pytest.mark.parametrize("key,model_args,message", [("mlp_alpha", {"act_layer": torch.nn.ReLU}, "MLP whose GELU feeds its fc2"),
                                                     ("value_alpha", {"scale_attn_norm": True}, "attention whose output feeds its proj")])  # fmt: skip
def test_migration_needs_its_pairs_in_the_model(key, model_args, message):
    qvit = QVit(make_tiny_vit(**model_args), load_recipe("trt_int8", {"reparam": {"alpha": 1.0, key: 0.5}}))
    with pytest.raises(ConfigError, match=rf"reparam.{key}: VisionTransformer has no {message}"):
        with qvit.reparameterizing():
            pass


def test_linear_without_bias_gets_one_for_the_shift():
    model = outlier_vit(qkv_bias=False)
    reference = QVit(outlier_vit(qkv_bias=False), load_recipe("trt_int8"))
    qvit = reparameterized(1.0, model=model)
    assert qvit.model.blocks[0].attn.qkv.bias is not None
    x = tiny_images(4, seed=3)
    with torch.no_grad(), reference.fp32(), qvit.fp32():
        torch.testing.assert_close(qvit(x), reference(x), rtol=0, atol=1e-5)


def test_alpha_one_equalizes_and_centres_every_channel():
    before = ranges(QVit(outlier_vit(), load_recipe("trt_int8")))
    after = ranges(reparameterized(1.0))
    for name, (lo, hi) in after.items():
        half, centre = (hi - lo) / 2, (hi + lo) / 2
        # Same images as the ones the factors came from: every channel spans the same centred range.
        torch.testing.assert_close(half, torch.full_like(half, float(half.mean())), rtol=1e-4, atol=0)
        assert float(centre.abs().max()) < 1e-4 * float(half.mean())
        lo0, hi0 = before[name]
        spread0 = (hi0 - lo0).max() / (hi0 - lo0).min()
        assert spread0 > 5  # the model had wide channels to start with


def test_alpha_half_balances_activation_and_weight_ranges():
    qvit = reparameterized(0.5)
    pairs = layernorm_linear_pairs(qvit.model)
    for name, (lo, hi) in ranges(qvit).items():
        activation = (hi - lo) / 2
        weight = pairs[name][1].weight.detach().abs().amax(dim=0)
        ratio = activation / weight  # SmoothQuant with alpha 0.5: the same for every channel
        torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.mean())), rtol=1e-4, atol=0)


def linear_output_error(qvit: QVit, pair_kind=layernorm_linear_pairs) -> float:
    """Relative squared error of every post-LayerNorm (or post-GELU) Linear's output, its input and weight quantized."""
    inputs = {}
    pairs = pair_kind(qvit.model)
    handles = [linear.register_forward_pre_hook(lambda m, args, n=name: inputs.setdefault(n, args[0])) for name, (_, linear) in pairs.items()]
    with torch.no_grad(), qvit.fp32():
        qvit(tiny_images(16, seed=4))
    for h in handles:
        h.remove()
    error = total = 0.0
    with torch.no_grad():
        for name, (_, linear) in pairs.items():
            quantized = linear(inputs[name])
            with qvit.fp32():
                reference = linear(inputs[name])
            error += float((quantized - reference).pow(2).sum())
            total += float(reference.pow(2).sum())
    return error / total


def test_reparameterization_lowers_the_quantization_error_of_outlier_channels():
    overrides = {"activation.observer": "minmax", "attention.observer": "minmax"}
    plain = QVit(outlier_vit(), load_recipe("trt_int8", {**overrides, "reparam": None}))
    reparam = QVit(outlier_vit(), load_recipe("trt_int8", {**overrides, "reparam": {"alpha": 0.5}}))
    batches = [(x, None, 0) for x in images()]
    for qvit in (plain, reparam):
        calibrate(qvit, batches, CPU, progress=False)
    # The same FP32 function, so the same Linear outputs to reproduce: the error must fall by more than half.
    assert linear_output_error(reparam) < 0.5 * linear_output_error(plain)


# At 4 bits fc2's weights, which take half of the spread at alpha 0.5, give back part of the gain (10x at
# 8 bits, 2x at 4). proj's inputs matter at 4 bits (3x lower); at 8 its weights' error dominates (1.25x).
@pytest.mark.parametrize("key,pair_kind,bits,bound", [("mlp_alpha", activation_linear_pairs, 8, 0.2), ("mlp_alpha", activation_linear_pairs, 4, 0.6),
                                                      ("value_alpha", value_projection_pairs, 4, 0.4)])  # fmt: skip
def test_migration_lowers_the_error_of_the_linear_reading_wide_channels(key, pair_kind, bits, bound):
    overrides = {"activation.observer": "minmax", "attention.observer": "minmax", "activation.bit_type.bits": bits,
                 "weight.bit_type.bits": bits}  # fmt: skip
    batches = [(x, None, 0) for x in images()]
    errors = {}
    for strength in (None, 0.5):
        qvit = QVit(gelu_outlier_vit(), load_recipe("trt_int8", {**overrides, "reparam": {"alpha": 1.0, key: strength}}))
        calibrate(qvit, batches, CPU, progress=False)
        errors[strength] = linear_output_error(qvit, pair_kind)
    assert errors[0.5] < bound * errors[None], errors


def test_mlp_factors_set_during_calibration_take_gradients_afterwards():
    """calibrate() runs under inference mode; the Fisher search and reconstruction after the folding
    back-propagate through the GELU's division, so its factors must be normal tensors."""
    recipe = load_recipe("fqvit_plus_w4a4", {"reparam.mlp_alpha": 0.5, "gptq": None,
                                             "reconstruction": {"images": 8, "iters": 2, "batch": 4}})  # fmt: skip
    qvit = QVit(gelu_outlier_vit(), recipe)
    calibrate(qvit, [(x, None, 0) for x in images()], CPU, progress=False)  # reparam, calibrate, Fisher search, reconstruct
    act = qvit.model.blocks[0].mlp.act
    assert qvit.is_calibrated and qvit.searched_ratios and not act.channel_scale.is_inference()


def test_calibration_needs_the_reparameterization_pass_first():
    qvit = QVit(outlier_vit(), load_recipe("trt_int8", {"reparam": {"alpha": 0.5}}))
    with pytest.raises(RuntimeError, match="reparameterizing"):
        with qvit.calibrating():
            pass
    calibrate(qvit, [(x, None, 0) for x in images()], CPU, progress=False)  # does both passes
    assert qvit.is_calibrated and qvit.reparam_factors
    with pytest.raises(RuntimeError, match="already reparameterized"):
        with qvit.reparameterizing():
            pass
    with pytest.raises(RuntimeError, match="no reparam section"):
        with QVit(outlier_vit(), load_recipe("trt_int8", {"reparam": None})).reparameterizing():
            pass


@pytest.mark.parametrize("mlp_alpha", [None, 0.5])
def test_calibrated_file_replays_the_factors_on_the_original_weights(tmp_path, mlp_alpha):
    source = QVit(outlier_vit(), load_recipe("trt_int8", {"reparam": {"alpha": 0.5, "mlp_alpha": mlp_alpha, "value_alpha": mlp_alpha}}))
    original = weights_sha256(source.model)
    calibrate(source, [(x, None, 0) for x in images()], CPU, progress=False)
    path = tmp_path / "calibrated.pt"
    save_calibrated(source, path, "tiny", original, None)
    record, recipe = read_calibrated(path)
    target = QVit(outlier_vit(), recipe)
    load_calibrated(target, record, path, weights_sha256(target.model))
    x = tiny_images(8, seed=6)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    # The factors without the recipe that made them (or the reverse) are refused.
    record_without = {**record, "reparam": {}}
    with pytest.raises(UserError, match="do not match its recipe"):
        load_calibrated(QVit(outlier_vit(), recipe), record_without, path, original)
    record_unknown = {**record, "reparam": {"blocks.9.norm1": record["reparam"]["blocks.0.norm1"]}}
    with pytest.raises(UserError, match="cannot replay"):
        load_calibrated(QVit(outlier_vit(), recipe), record_unknown, path, original)
    if mlp_alpha is not None:  # a GELU output is only ever divided
        shifted = {**record["reparam"], "blocks.0.mlp.act": {**record["reparam"]["blocks.0.mlp.act"], "shift": torch.ones(128)}}
        with pytest.raises(UserError, match=r"cannot replay its reparameterization \(blocks.0.mlp.act: a GELU output or an attention's v is divided, never shifted"):
            load_calibrated(QVit(outlier_vit(), recipe), {**record, "reparam": shifted}, path, original)


@pytest.mark.parametrize(
    "value,message",
    [
        ({"alpha": 1.5}, "reparam.alpha must be a number from 0 to 1"),
        ({"alpha": True}, "reparam.alpha must be a number from 0 to 1"),
        ({"shift": "yes"}, "reparam.shift must be true or false"),
        ({"beta": 0.5}, "reparam: unknown key 'beta'"),
        ({"mlp_alpha": -0.1}, r"reparam.mlp_alpha must be a number from 0 to 1 \(or null: off\)"),
        ({"mlp_alpha": "half"}, "reparam.mlp_alpha must be a number from 0 to 1"),
        ({"value_alpha": 2}, "reparam.value_alpha must be a number from 0 to 1"),
    ],
)
def test_bad_reparam_values_are_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("trt_int8", {"reparam": value})


def test_reparam_needs_quantized_activations():
    with pytest.raises(ConfigError, match="reparam needs the activation kind quantized"):
        load_recipe("trt_int8", {"reparam": {"alpha": 0.5}, "activation": None})


@exact_int8_kernels
def test_export_graph_is_the_same_with_and_without_reparameterization(tmp_path):
    """The LayerNorm and attention-value factors live in the weights: the deployed graph has the same
    operators and Q/DQ pairs. The MLP migration adds one Div per block, between the GELU and fc2's QuantizeLinear, and
    ONNX Runtime computes what the fake-quant model does."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from collections import Counter

    from utils.onnx_export import export_onnx, simplify

    ops, x = {}, tiny_images(16, seed=21)
    for name, reparam in (("plain", None), ("reparam", {"alpha": 1.0, "value_alpha": 0.5}), ("mlp", {"alpha": 1.0, "mlp_alpha": 0.5})):
        qvit = QVit(gelu_outlier_vit(), load_recipe("trt_int8", {"reparam": reparam}))
        calibrate(qvit, [(x, None, 0) for x in images()], CPU, progress=False)
        export_onnx(qvit, tmp_path / f"{name}.raw.onnx", (32, 32))
        simplify(tmp_path / f"{name}.raw.onnx", tmp_path / f"{name}.onnx")  # as convert_tensorrt.py deploys it
        graph = onnx.load(str(tmp_path / f"{name}.onnx")).graph
        ops[name] = Counter(n.op_type for n in graph.node)
        producer = {out: n.op_type for n in graph.node for out in n.output}
        divided = [n for n in graph.node if n.op_type == "QuantizeLinear" and producer.get(n.input[0]) == "Div"]
        assert len(divided) == (2 if name == "mlp" else 0)  # fc2's input quantizer reads the division
        if name == "mlp":
            out = ort.InferenceSession(str(tmp_path / "mlp.onnx"), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
            with torch.no_grad():
                reference = qvit(x).numpy()
            assert abs(out - reference).max() < 1e-3  # the same arithmetic, up to float summation order
    assert ops["plain"] == ops["reparam"] and ops["plain"]["QuantizeLinear"] > 0
    assert ops["mlp"] - ops["plain"] == Counter({"Div": 2}) and not ops["plain"] - ops["mlp"]
