"""Swin Transformer (v1) quantized the FQ-ViT way, on tiny random two-stage models (window 7, shifted
windows and PatchMerging exercised): conversion, the integer softmax with bias and mask, state round
trips, the Q/DQ export in ONNX Runtime, and models refused by structure."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from conftest import SWIN_SIZE, exact_int8_kernels, make_tiny_swin, reloaded, tiny_images
from test_cli import data  # noqa: F401 (module fixture: an ImageNet-layout folder)
from models.integer.softmax import IEXP_MAX_ABS_ERROR
from models.ptq.swin_layers import QuantSwinBlock, QuantWindowAttention
from models.quant_vit import QVit, UnsupportedModelError
from quant_config import load_recipe
from utils.engine import calibrate


def images(n: int = 8, seed: int = 1) -> torch.Tensor:
    return tiny_images(n, seed=seed, size=SWIN_SIZE)


def calibrated_swin(recipe: str, **overrides) -> QVit:
    qvit = QVit(make_tiny_swin(), load_recipe(recipe, overrides or None))
    calibrate(qvit, [(images(8, seed=10 + i), None, 0) for i in range(3)], torch.device("cpu"), progress=False)
    return qvit


@pytest.mark.parametrize("recipe", ["fqvit_w8a8_att8", "fqvit_w8a8_att4", "trt_int8", "cpu_int8"])
def test_fp32_mode_reproduces_timm_swin_exactly(recipe):
    reference = make_tiny_swin()
    for module in reference.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    qvit = QVit(make_tiny_swin(), load_recipe(recipe))
    x = images()
    with torch.no_grad(), qvit.fp32():
        out = qvit(x)
    with torch.no_grad():
        assert torch.equal(out, reference(x))
        torch.testing.assert_close(out, make_tiny_swin()(x), atol=1e-5, rtol=1e-5)  # timm's fused attention


def test_every_point_of_the_fully_quantized_recipe_is_there_with_its_kind():
    qvit = QVit(make_tiny_swin(), load_recipe("fqvit_w8a8_att4"))
    points = qvit.quantizers()
    model = qvit.model
    layernorms = ["patch_embed.norm", "layers.1.downsample.norm", "norm"] + [
        f"layers.{s}.blocks.{b}.norm{i}" for s in range(2) for b in range(2) for i in (1, 2)
    ]
    for name in layernorms:  # PTF on every LayerNorm input: per channel, power-of-two factors
        q = points[f"{name}.input_quant"]
        assert q.kind == "layernorm_input" and q.per_channel and q.spec.power_of_two_factor, name
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "layers.1.downsample.reduction" in linears and "head.fc" in linears and len(linears) == 4 * 4 + 2
    for name in linears:
        assert points[f"{name}.input_quant"].kind == "activation" and points[f"{name}.weight_quant"].kind == "weight", name
    for s in range(2):
        for b in range(2):
            block = model.layers[s].blocks[b]
            assert type(block) is QuantSwinBlock and type(block.attn) is QuantWindowAttention
            prefix = f"layers.{s}.blocks.{b}.attn"
            assert points[f"{prefix}.softmax.output_quant"].spec.quantizer == "log2"  # LIS: 4-bit log2 attention map
            assert points[f"{prefix}.softmax.input_quant"].kind == "activation"  # the integer softmax's scores
            assert all(points[f"{prefix}.{op}_act.input_quant"].kind == "activation" for op in "qkv")
    assert model.layers[0].blocks[1].shift_size == (3, 3) and model.layers[0].blocks[1].attn_mask is not None


@torch.no_grad()
def test_integer_softmax_with_bias_and_mask_matches_the_float_softmax():
    qvit = calibrated_swin("fqvit_w8a8_att4")
    block = qvit.model.layers[0].blocks[1]  # shifted windows: its mask has -100 entries
    attn, mask = block.attn, block.attn_mask
    softmax = attn.softmax
    assert softmax.integer and softmax.input_quant.is_calibrated and (mask == -100).any()
    # The scores as the block computes them: quantized q.k plus the relative position bias.
    x = torch.randn(2 * mask.shape[0], 49, attn.qkv.in_features)
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 49, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    scores = attn.q_act(q * attn.scale) @ attn.k_act(k).transpose(-2, -1) + attn._get_rel_pos_bias()
    scores = scores.view(-1, mask.shape[0], attn.num_heads, 49, 49)
    full_mask = mask.unsqueeze(1).unsqueeze(0)
    softmax.output_quant.enabled = False  # the probabilities themselves, before the log2 grid
    try:
        probs = softmax(scores, full_mask)
    finally:
        softmax.output_quant.enabled = True
    reference = (softmax.input_quant(scores) + full_mask).double().softmax(dim=-1)
    assert float((probs.double() - reference).abs().max()) <= 2 * IEXP_MAX_ABS_ERROR
    assert torch.all(probs[(full_mask == -100).expand_as(probs)] == 0)  # masked pairs get exactly nothing
    # The scores' grid is not stretched over the -100 of the mask: its step stays that of the scores.
    assert softmax.input_quant.scale_value < float(scores.abs().max()) / 100


@pytest.mark.parametrize("recipe", ["fqvit_w8a8_att4", "trt_int8"])
def test_calibrated_swin_round_trips_through_a_file(tmp_path, recipe):
    source = calibrated_swin(recipe)
    target = reloaded(source, make_tiny_swin(), tmp_path / "calibrated.pt")
    x = images(4, seed=6)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
        with source.fp32():
            fp32 = source(x)
        assert not torch.equal(source(x), fp32)  # it does quantize


@exact_int8_kernels
@pytest.mark.parametrize("recipe", ["trt_int8", "cpu_int8"])
def test_qdq_export_runs_in_onnx_runtime_like_the_fake_quant_model(tmp_path, recipe):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from utils.onnx_export import export_onnx, qdq_scales, simplify
    from utils.runtimes import load_model, save_deployed

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    qvit = calibrated_swin(recipe)
    plan = export_onnx(qvit, tmp_path / "raw.onnx", (SWIN_SIZE, SWIN_SIZE), zero_points=recipe == "cpu_int8")
    assert {p.plan for p in plan} == {"qdq"}  # exported exactly as calibrated
    simplify(tmp_path / "raw.onnx", tmp_path / "int8.onnx")
    # Every activation point's scale in the graph is the PyTorch buffer (weights: per channel, axis 0).
    exported = {float(s) for s, axis in qdq_scales(onnx.load(str(tmp_path / "int8.onnx"))) if np.ndim(s) == 0}
    for point in plan:
        if not point.name.endswith(".weight"):
            assert any(abs(float(point.scale) - s) <= 1e-7 * s for s in exported), point.name
    x = torch.cat([images(16, seed=300 + i) for i in range(2)])
    with torch.no_grad():
        reference = qvit(x).numpy()
        with qvit.fp32():
            fp32 = qvit(x).numpy()
    ort_form, facts = save_deployed("ort", tmp_path / "int8.onnx")
    assert facts["ort_model"]["qkv_split"] == sum(isinstance(m, QuantWindowAttention) for m in qvit.modules())  # q, k, v as three GEMMs
    assert facts["ort_model"]["layout_moves"] > 0 and facts["ort_model"]["scales_folded"] == 0  # head_dim 12: 12 ** -0.5 would round
    assert facts["ort_model"]["activation_matmuls"] >= facts["ort_model"]["qkv_split"]  # q @ k^T of every attention, at least
    assert facts["ort_model"]["patch_embeddings"] == 1  # Swin's 4 x 4, stride 4 Conv
    for path in (tmp_path / "int8.onnx", ort_form):
        out = load_model("ort", path, threads=1)(x.numpy())
        assert (out.argmax(1) == reference.argmax(1)).mean() >= 0.95, path.name
        assert np.abs(out - reference).mean() < 0.1 * np.abs(reference - fp32).mean(), path.name


def test_a_qvit_takes_the_mode_of_its_model_and_keeps_it_through_an_export(tmp_path):
    pytest.importorskip("onnx")
    from utils.onnx_export import export_onnx

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    qvit = calibrated_swin("trt_int8")  # timm's Swin has DropPath: random in training mode
    assert not qvit.training and not any(m.training for m in qvit.modules())
    export_onnx(qvit, tmp_path / "raw.onnx", (SWIN_SIZE, SWIN_SIZE))
    assert not any(m.training for m in qvit.modules())
    x = images(4, seed=8)
    with torch.no_grad():
        assert torch.equal(qvit(x), qvit(x))


def test_models_are_accepted_by_structure_and_refused_naming_the_module():
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    v2 = SwinTransformerV2(img_size=SWIN_SIZE, patch_size=4, embed_dim=24, depths=(2,), num_heads=(2,), window_size=7, num_classes=10)
    with pytest.raises(UnsupportedModelError, match=r"'layers\.0\.blocks\.0\.attn' \(WindowAttention\) has weights but no quantized counterpart"):
        QVit(v2, load_recipe("fqvit_w8a8_att8"))

    class TalkingBlock(SwinTransformerBlock):  # a subclass may compute something else
        pass

    model = make_tiny_swin()
    model.layers[0].blocks[0].__class__ = TalkingBlock
    with pytest.raises(UnsupportedModelError, match=r"'layers\.0\.blocks\.0' is a TalkingBlock, a subclass of timm's SwinTransformerBlock"):
        QVit(model, load_recipe("fqvit_w8a8_att8"))
    assert type(model.layers[0].blocks[1]) is SwinTransformerBlock  # refused before anything was converted


def test_fisher_blocks_plots_and_report_of_a_swin_profile(tmp_path):
    import json

    from utils.analysis import block_table, load_run
    from utils.html_report import write_report
    from utils.plots import write_plots
    from utils.profiler import run_profile
    from utils.sensitivity import block_sensitivity, fisher_sensitivity

    qvit = calibrated_swin("fqvit_w8a8_att4")
    x = images(4, seed=21)
    result = run_profile(qvit, [(x, None, 0)], isolated=True)
    table = fisher_sensitivity(qvit, [(x, torch.arange(4), 0)])
    groups = block_sensitivity(table)
    assert list(groups["group"]) == ["embed", "stage 0 block 0", "stage 0 block 1", "stage 1 PatchMerging", "stage 1 block 0", "stage 1 block 1", "head"]
    assert groups["fisher_sum"].sum() == pytest.approx(table["fisher"].sum())
    # A run folder as test_qvit.py writes it, then result_analyze.py's plots and report.
    result.table.to_csv(tmp_path / "qvit_statistics.csv", index=False)
    (tmp_path / "qvit_summary.json").write_text(json.dumps({"model": "tiny_swin", "config": {"name": "fqvit_w8a8_att4"}, "profile": result.totals}))
    run = load_run(tmp_path)
    run.sensitivity = table.merge(run.stats[["name", "qsnr_db"]], on="name")
    stats = run.stats.set_index("name")
    assert stats.loc["layers.1.downsample.reduction.input", "layer_type"] == "reduction.input"
    assert stats.loc["layers.1.blocks.0.attn.qkv.input", "block"] == 3  # the sequence: 2 blocks, PatchMerging, ...
    assert list(block_table(run).index) == [0, 1, 2, 3, 4]
    (tmp_path / "plots").mkdir()
    plots, fit = write_plots(run, tmp_path / "plots")
    assert len(plots) == 8 and all(p.stat().st_size > 10_000 for p in plots)
    write_report(run, plots, fit, tmp_path / "report.html")
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64") == len(plots)


@pytest.mark.parametrize("model,message", [
    ("vit_base_r50_s16_224", r"^error: vit_base_r50_s16_224: 'patch_embed\.backbone\.stem\.conv' is a StdConv2dSame, a subclass of timm's Conv2d"),
    ("vit_so400m_patch14_siglip_224", r"^error: vit_so400m_patch14_siglip_224: module 'attn_pool' \(AttentionPoolLatent\) has weights but no quantized counterpart"),
    ("swinv2_tiny_window8_256", r"'layers\.0\.blocks\.0\.attn' \(WindowAttention\) has weights but no quantized counterpart"),
], ids=["hybrid-cnn-stem", "pooled-attention", "swin-v2"])  # fmt: skip
def test_cli_refuses_an_unsupported_model_naming_its_module(data, tmp_path, model, message):
    from test_cli import assert_user_error, run_main

    log = tmp_path / "log"
    result = run_main("--model", model, "--data", data, "--log-dir", log)
    assert_user_error(result, log, message)


def test_list_models_prints_the_accepted_names_and_refuses_an_empty_match():
    from test_cli import run_cli, run_main

    result = run_cli("--list-models", "swin_tiny*,swinv2_tiny*,deit3_small_patch16_224", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["deit3_small_patch16_224", "swin_tiny_patch4_window7_224"]
    refused = run_main("--list-models", "resnet50")
    assert refused.returncode == 2 and refused.stderr.strip() == "error: --list-models 'resnet50': no timm model matching it is one QVit can quantize"
