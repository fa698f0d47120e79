"""The profiler against direct computations on stored tensors, on tiny random ViTs."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import SWIN_SIZE, calibrated, make_tiny_distilled, make_tiny_swin, make_tiny_vit, tiny_images
from models.ptq.quantizers import Log2Quantizer
from models.quant_vit import QVit
from quant_config import load_recipe
from utils.plots import select_histogram_points, write_point_histograms
from utils.profiler import COLUMNS, HistogramBins, NoImagesError, _Profiler, point_name, profile, run_profile


def batches(*seeds: int, n: int = 4) -> list:
    return [(tiny_images(n, seed=s), None, 0) for s in seeds]


def record(qvit: QVit, x: torch.Tensor, fp32: bool) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every quantizer's (input, output) and the logits of one plain forward of the model."""
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def keep(module, args, out) -> None:
            # Cloned: the integer softmax overwrites its fake-quantized scores in place.
            store.setdefault(name, (args[0].clone(), out.clone()))

        return keep

    handles = [q.register_forward_hook(hook(point_name(n))) for n, q in qvit.quantizers().items()]
    try:
        with torch.no_grad():
            if fp32:
                with qvit.fp32():
                    logits = qvit(x)
            else:
                logits = qvit(x)
    finally:
        for h in handles:
            h.remove()
    return store, logits


def qsnr(ref: torch.Tensor, q: torch.Tensor) -> float:
    ref, q = ref.double(), q.double()
    return 10 * math.log10(float(ref.square().sum() / (ref - q).square().sum()))


def outlier_fraction(t: torch.Tensor, per_image: bool) -> float:
    rows = t.double().reshape(t.shape[0] if per_image else 1, -1)
    mean = rows.mean(1, keepdim=True)
    std = rows.std(1, correction=0, keepdim=True)
    return float(((rows - mean).abs() > 3 * std).sum()) / rows.numel()


def clipped_fraction(qz, x: torch.Tensor) -> float:
    # In float32, as the quantizer works: a weight's extreme sits exactly on its grid's end.
    bt = qz.spec.bit_type
    scale = qz.scale.float()
    if scale.dim() == 1:
        shape = [1] * x.dim()
        shape[qz.channel_axis % x.dim()] = -1
        scale = scale.view(shape)
    x = x.float()
    if isinstance(qz.method, Log2Quantizer):
        # Saturated: log2(|x| / scale) rounds beyond the codes 0 ... max_code.
        smallest = scale * 2.0 ** -(Log2Quantizer.max_code(bt) + 0.5)
        return float(((x.abs() > scale * math.sqrt(2)) | ((x != 0) & (x.abs() < smallest))).sum()) / x.numel()
    zp = qz.zero_point.float().view(scale.shape) if qz.zero_point.dim() == 1 else qz.zero_point.float()
    if qz.spec.quantizer == "twin_uniform":
        # Saturated: beyond half a step past the last level of its sign's region (negative step scale * 2^-m);
        # the unsigned (post-softmax) form's lowest level is 0 and its highest (2^(b-1) - 1) * scale.
        top, bottom = 2 ** (bt.bits - 1) - 1, (bt.qmin if bt.symmetric else 0)
        return float(((x < (bottom - 0.5) * scale * 2.0**-zp) | (x > (top + 0.5) * scale)).sum()) / x.numel()
    # Saturated: x / scale + zero point rounds outside [qmin, qmax].
    return float(((x < (bt.qmin - zp - 0.5) * scale) | (x > (bt.qmax - zp + 0.5) * scale)).sum()) / x.numel()


def reference_histogram(bins: HistogramBins, t: torch.Tensor) -> np.ndarray:
    v = t.double().numpy().reshape(-1)
    if bins.log_scale is not None:
        with np.errstate(divide="ignore"):
            v = np.log2(np.abs(v) / bins.log_scale)
    return np.bincount(np.digitize(v, bins.edges()), minlength=bins.bins + 2)


def on_edges(bins: HistogramBins, t: torch.Tensor) -> int:
    """Values within float rounding of a bin edge (either side is right): a PTF channel's finer levels,
    half a coarse step apart, lie exactly on the edges of the coarse cells."""
    v = t.double().numpy().reshape(-1)
    if bins.log_scale is not None:
        return 0
    position = (v - bins.lo) / bins.width
    return int((np.abs(position - np.round(position)) < 1e-4).sum())


def kl(p: np.ndarray, q: np.ndarray, per_cell: int) -> float:
    """KL over grid cells: the regular bins summed per cell, under/overflow as cells of their own."""
    p = np.concatenate([p[:1], p[1:-1].reshape(-1, per_cell).sum(1), p[-1:]])
    q = np.concatenate([q[:1], q[1:-1].reshape(-1, per_cell).sum(1), q[-1:]])
    p, q = p / p.sum(), q / q.sum()
    q = np.where((p > 0) & (q == 0), 1e-10, q)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


TWIN_FC2 = {"layers": {"blocks.*.mlp.fc2.input_quant": {"quantizer": "twin_uniform", "bit_type": {"symmetric": True, "bits": 6}}}}
TWIN_ATTN = {"layers": {"*softmax.output_quant": {"quantizer": "twin_uniform"}}}


@pytest.mark.parametrize("recipe,overrides,swin", [("fqvit_w8a8_att8", {}, False), ("fqvit_w8a8_att4", {}, False), ("minmax_w8a8", {}, False),
                                                   ("minmax_w8a8", TWIN_FC2, False), ("fqvit_w8a8_att8", TWIN_ATTN, False),
                                                   ("fqvit_w8a8_att4", {}, True)],
                         ids=["fqvit_w8a8_att8", "fqvit_w8a8_att4", "minmax_w8a8", "minmax_w8a8-twin_fc2", "fqvit_w8a8_att8-twin_attn",
                              "swin-fqvit_w8a8_att4"])  # fmt: skip
def test_statistics_match_direct_computation(recipe, overrides, swin):
    size = SWIN_SIZE if swin else 32
    qvit = calibrated(recipe, model=make_tiny_swin() if swin else None, size=size, **overrides)
    x = tiny_images(8, seed=42, size=size)
    result = run_profile(qvit, [(x, None, 0)], isolated=True, detail_samples=8)
    table = result.table.set_index("name")
    fp32, fp32_logits = record(qvit, x, fp32=True)
    quant, quant_logits = record(qvit, x, fp32=False)
    quantizers = {point_name(n): q for n, q in qvit.quantizers().items()}
    assert set(table.index) == set(fp32) == set(quantizers)

    for name, qz in quantizers.items():
        row = table.loc[name]
        ref, (x_quant, out_quant) = fp32[name][0], quant[name]
        per_image = not qz.is_weight
        # Accumulated view: the FP32 model's tensor against the quantized model's quantized tensor.
        assert row.qsnr_db == pytest.approx(qsnr(ref, out_quant), rel=1e-4), name
        assert row.mse == pytest.approx(float((ref.double() - out_quant.double()).square().mean()), rel=1e-4)
        cos = float(F.cosine_similarity(ref.double().reshape(1, -1), out_quant.double().reshape(1, -1)))
        # From float32 dot products summed in float64: ~1e-7 relative per product over ~10^5 elements.
        assert row.cosine == pytest.approx(cos, abs=3e-6), name
        assert row.elements == ref.numel()
        assert row.fp32_mean == pytest.approx(float(ref.double().mean()), rel=1e-4, abs=1e-7)
        # From running sums (sum x^2 - n mean^2): cancellation costs digits where |mean| >> std.
        assert row.fp32_std == pytest.approx(float(ref.double().std(correction=0)), rel=1e-3)
        assert (row.fp32_min, row.fp32_max) == (float(ref.min()), float(ref.max()))
        assert row.outlier_ratio_fp32 == pytest.approx(outlier_fraction(ref, per_image), abs=2 / ref.numel())
        assert row.outlier_ratio_int8 == pytest.approx(outlier_fraction(out_quant, per_image), abs=2 / ref.numel())
        # Clipping is a property of the quantizer's own input: the quantized model's tensor here.
        assert row.clipped_fraction == pytest.approx(clipped_fraction(qz, x_quant), abs=1e-12), name
        bins, h_ref, h_q = result.histograms[name]
        assert h_ref.sum() == h_q.sum() == ref.numel()
        # Shared fixed bins: the profiler's counts against numpy's binning of the same tensors (a value
        # within float rounding of an edge may fall either side).
        assert np.abs(h_ref - reference_histogram(bins, ref)).sum() <= 2e-3 * ref.numel() + 2 * on_edges(bins, ref)
        assert np.abs(h_q - reference_histogram(bins, out_quant)).sum() <= 2e-3 * ref.numel() + 2 * on_edges(bins, out_quant), name
        assert row.kl == pytest.approx(kl(h_ref.astype(float), h_q.astype(float), bins.per_cell), rel=1e-9, abs=1e-12)

        # Isolated view: the FP32 tensor against that point's own quantization of it.
        alone = qz.fake_quant(ref)
        assert row.iso_qsnr_db == pytest.approx(qsnr(ref, alone), rel=1e-4), name
        assert row.iso_clipped_fraction == pytest.approx(clipped_fraction(qz, ref), abs=1e-12)
        if row.iso_clipped_fraction == 0 and not qz.per_channel and qz.spec.quantizer != "twin_uniform":
            # Rounding alone keeps every value in its level's cell (a twin grid's cells are its finer
            # step, so its coarser region's rounding crosses cells).
            assert row.iso_kl < 1e-3, name
        if not isinstance(qz.method, Log2Quantizer):
            # Saturation is exactly what makes the error exceed rounding's half step.
            step = qz.scale.view([-1 if d == qz.channel_axis % ref.dim() else 1 for d in range(ref.dim())]) if qz.per_channel else qz.scale
            if qz.spec.quantizer == "twin_uniform":
                fine = ref < 0 if qz.spec.bit_type.symmetric else ref < (2 ** (qz.spec.bit_type.bits - 1) - 0.5) * step * 2.0**-qz.zero_point
                step = torch.where(fine, step * 2.0 ** -qz.zero_point, step)
            beyond = ((ref - alone).abs() > step * (0.5 + 1e-4)).double().mean()
            assert row.iso_clipped_fraction == pytest.approx(float(beyond), abs=1e-3), name

    cos_logits = float(F.cosine_similarity(fp32_logits, quant_logits, dim=1).mean())
    assert result.totals["logit_cosine"] == pytest.approx(cos_logits, abs=1e-6)
    assert result.totals["logit_mse"] == pytest.approx(float((fp32_logits - quant_logits).square().mean()), rel=1e-4)
    agreement = float((fp32_logits.argmax(1) == quant_logits.argmax(1)).double().mean())
    assert result.totals["agreement_top1"] == agreement


# One point of each resume kind: the image (patch embedding), a block, the final norm, the head; a Swin's
# PatchMerging and shifted-window block too.
ISOLATED_CASES = {
    "vit": ("patch_embed.proj.input", "blocks.1.attn.softmax.output", "blocks.0.norm2.input", "norm.input", "head.weight"),
    "swin": ("patch_embed.norm.input", "layers.0.blocks.1.attn.softmax.output", "layers.1.downsample.reduction.input",
             "layers.1.blocks.0.norm1.input", "norm.input", "head.fc.weight"),
}  # fmt: skip


@pytest.mark.parametrize("arch", ["vit", "swin"])
def test_isolated_logits_equal_a_model_with_only_that_point_on(arch):
    size = SWIN_SIZE if arch == "swin" else 32
    qvit = calibrated("fqvit_w8a8_att4", model=make_tiny_swin() if arch == "swin" else None, size=size)
    x = tiny_images(6, seed=7, size=size)
    table = run_profile(qvit, [(x, None, 0)], isolated=True).table.set_index("name")
    with torch.no_grad(), qvit.fp32():
        reference = qvit(x)
    quantizers = {point_name(n): q for n, q in qvit.quantizers().items()}
    for name in ISOLATED_CASES[arch]:
        for q in quantizers.values():
            q.enabled = False
        quantizers[name].enabled = True
        with torch.no_grad():
            logits = qvit.model(x)  # float32, as the isolated view runs (QVit.forward simulates the integer program in float64)
        cos = float(F.cosine_similarity(reference, logits, dim=1).mean())
        assert table.loc[name, "iso_logit_cosine"] == pytest.approx(cos, abs=1e-6), name
        assert table.loc[name, "iso_logit_mse"] == pytest.approx(float((reference - logits).square().mean()), rel=1e-4, abs=1e-12)
    for q in quantizers.values():
        q.enabled = True


def test_more_bits_give_a_higher_qsnr():
    # On calibration images MinMax clips nothing: the error is all rounding, which shrinks with the step.
    images = [(tiny_images(8, seed=10), None, 0)]
    low = run_profile(calibrated(**{"activation.bit_type.bits": 6}), images, isolated=True).table.set_index("name")
    high = run_profile(calibrated(**{"activation.bit_type.bits": 8}), images, isolated=True).table.set_index("name")
    activations = high.index[high["kind"] == "activation"]
    assert len(activations) > 10
    # Two more bits: a quarter of the step, about 12 dB, on every activation point.
    gain = high.loc[activations, "iso_qsnr_db"] - low.loc[activations, "iso_qsnr_db"]
    assert (gain > 8).all(), gain[gain <= 8]
    assert (high.loc[activations, "qsnr_db"] > low.loc[activations, "qsnr_db"]).all()
    weights = high.index[high["kind"] == "weight"]
    assert np.allclose(high.loc[weights, "iso_qsnr_db"], low.loc[weights, "iso_qsnr_db"])  # untouched


def test_quantization_off_everywhere_is_exact():
    qvit = calibrated()
    for q in qvit.quantizers().values():
        q.enabled = False
    result = run_profile(qvit, batches(1, 2), isolated=True)
    table = result.table
    assert not table["enabled"].any()
    assert (table["mse"] == 0).all() and (table["iso_mse"] == 0).all()
    assert np.allclose(table["cosine"], 1.0, atol=1e-6) and (table["qsnr_db"] == math.inf).all()
    assert (table["clipped_fraction"] >= 0).all()  # a disabled point still says what its grid would clip
    assert (table["iso_logit_mse"] == 0).all() and (table["iso_agreement_top1"] == 1).all()
    totals = result.totals
    assert totals["logit_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert totals["logit_mse"] == 0 and totals["agreement_top1"] == 1
    assert totals["qsnr_db_mean"] is None  # no point has any error
    json.dumps(totals, allow_nan=False)  # summary-ready
    assert all(q.enabled is False for q in qvit.quantizers().values())  # flags restored


def test_streamed_statistics_equal_those_of_the_concatenated_batch():
    qvit = calibrated("fqvit_w8a8_att4")
    parts = [tiny_images(n, seed=s) for n, s in ((3, 4), (1, 5), (4, 6))]
    streamed = run_profile(qvit, [(p, None, 0) for p in parts], isolated=True, detail_samples=8)
    whole = run_profile(qvit, [(torch.cat(parts), None, 0)], isolated=True, detail_samples=8)
    assert streamed.totals["samples"] == whole.totals["samples"] == 8
    a, b = streamed.table, whole.table
    pd.testing.assert_frame_equal(a.select_dtypes(exclude="number"), b.select_dtypes(exclude="number"))
    assert (a["elements"] == b["elements"]).all()
    numeric = [c for c in a.columns if a[c].dtype.kind == "f" and c != "fp32_std"]
    np.testing.assert_allclose(a[numeric].to_numpy(), b[numeric].to_numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(a["fp32_std"], b["fp32_std"], rtol=1e-3)  # sum x^2 - n mean^2 in float32 sums
    for name, (_, h_ref, h_q) in streamed.histograms.items():
        _, w_ref, w_q = whole.histograms[name]
        # Bit-identical model outputs are not guaranteed across batch sizes; counts may move a bin at most rarely.
        assert np.abs(h_ref - w_ref).sum() <= 1e-3 * h_ref.sum() and np.abs(h_q - w_q).sum() <= 1e-3 * h_q.sum()
    for key in ("logit_cosine", "agreement_top1"):
        assert streamed.totals[key] == pytest.approx(whole.totals[key], rel=1e-6)


def test_detail_statistics_cover_only_the_first_images():
    qvit = calibrated()
    result = run_profile(qvit, batches(1, 2, 3), detail_samples=6)  # 12 images in batches of 4
    table = result.table.set_index("name")
    for name in table.index[table["kind"] != "weight"]:
        per_image = table.loc[name, "elements"] // 12
        _, h_ref, h_q = result.histograms[name]
        assert h_ref.sum() == h_q.sum() == 6 * per_image, name
    assert result.histograms["blocks.0.attn.qkv.weight"][1].sum() == qvit.model.blocks[0].attn.qkv.weight.numel()


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_tiny_vit(),
        lambda: make_tiny_vit(global_pool="avg", fc_norm=True),
        lambda: make_tiny_vit(class_token=False, global_pool="avg"),
        make_tiny_distilled,
        lambda: make_tiny_swin(),
    ],
    ids=["vit", "avg-pool", "no-class-token", "deit-distilled", "swin"],
)
def test_lockstep_stages_reproduce_the_models_own_forward(make):
    model = make()
    size = SWIN_SIZE if not hasattr(model, "blocks") else 32
    qvit = calibrated(model=model, size=size)
    x = tiny_images(4, seed=9, size=size)
    with torch.no_grad():
        quant = qvit(x)
        with qvit.fp32():
            fp32 = qvit(x)
    with torch.inference_mode():
        staged_fp32, staged_quant = _Profiler(qvit, isolated=False, detail_samples=0)._lockstep(x)
    assert torch.equal(staged_fp32, fp32) and torch.equal(staged_quant, quant)


def test_histogram_bins_put_every_grid_point_in_a_bin_centre():
    qvit = calibrated("fqvit_w8a8_att4")
    for name, q in qvit.quantizers().items():
        bins = HistogramBins.for_quantizer(q)
        if bins.log_scale is not None:
            codes = torch.arange(0, Log2Quantizer.max_code(q.spec.bit_type) + 1, dtype=torch.float32)
            grid, position = bins.log_scale * 2.0**-codes, -codes
        else:
            bt = q.spec.bit_type
            s, zp = float(q.scale.max()), float(q.zero_point.flatten()[q.scale.argmax()])
            grid = (torch.arange(bt.qmin, bt.qmax + 1, dtype=torch.float64) - zp) * s
            position = grid
        index = bins.index(grid.float()).numpy()
        assert ((index >= 1) & (index <= bins.bins)).all(), name
        centres = bins.lo + (index - 0.5) * bins.width
        assert np.allclose(centres, position.numpy(), atol=0.02 * bins.width + 1e-6 * abs(bins.lo)), name
        # ... the middle bin of its own cell, one level per cell.
        assert bins.per_cell % 2 == 1 and bins.bins % bins.per_cell == 0
        assert ((index - 1) % bins.per_cell == bins.per_cell // 2).all(), name
        assert len(set((index - 1) // bins.per_cell)) == len(index), name
        assert bins.clip[0] < bins.clip[1]


def test_the_token_scale_column_marks_the_residual_stream_and_its_error_is_the_runtime_grids():
    qvit = calibrated("fqvit_w8a8_att8", **{"layernorm_input.dynamic_token_scale": True, "layernorm_input.ptf_channel_zero_points": True})
    static = run_profile(calibrated("fqvit_w8a8_att8", **{"layernorm_input.ptf_channel_zero_points": True}), batches(1, 2)).table
    table = run_profile(qvit, batches(1, 2)).table
    assert table["token_scale"].eq(table["kind"] == "layernorm_input").all() and not table["token_scale_group"].any()
    stream = (table["kind"] == "layernorm_input").to_numpy()
    # Same calibration, a finer grid per token: every LayerNorm input's own error is lower.
    assert (table["mse"].to_numpy()[stream] < static["mse"].to_numpy()[stream]).all()
    grouped = calibrated("fqvit_w8a8_att8", **{"layernorm_input.dynamic_token_scale": True, "layernorm_input.token_scale_group": 8,
                                               "layernorm_input.ptf_channel_zero_points": True})
    groups = run_profile(grouped, batches(1, 2)).table
    assert groups["token_scale_group"].eq(stream * 8).all()
    assert (groups["mse"].to_numpy()[stream] < table["mse"].to_numpy()[stream]).all()


def test_table_columns_and_totals():
    result = run_profile(calibrated(), batches(1, 2))
    table = result.table
    assert list(table.columns) == [c for c in COLUMNS if not c.startswith("iso_")]
    assert len(table) == len(result.histograms) == result.totals["points"]
    assert table.loc[table["name"] == "blocks.1.norm1.input", "block"].item() == 1
    assert set(table["stage"]) == {"embed", "blocks", "head"}
    assert table["ptf"][table["kind"] == "layernorm_input"].all() and not table["token_scale"].any()
    worst = [w["name"] for w in result.totals["worst"]]
    assert worst == list(table.nsmallest(10, "qsnr_db")["name"])
    assert result.totals["views"] == ["accumulated"] and "isolated_worst" not in result.totals


def test_profile_api_takes_plain_loaders():
    qvit = calibrated()
    images = tiny_images(6, seed=3)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(6, dtype=torch.long)), batch_size=4)
    table = profile(qvit, loader)
    assert isinstance(table, pd.DataFrame) and table.attrs["totals"]["samples"] == 6
    from_tensors = profile(qvit, [images[:4], images[4:]])
    pd.testing.assert_frame_equal(table, from_tensors)


def test_uncalibrated_model_and_no_images_are_refused():
    with pytest.raises(RuntimeError, match="calibrated"):
        run_profile(QVit(make_tiny_vit(), load_recipe("fqvit_w8a8_att8")), batches(1))
    with pytest.raises(NoImagesError, match="none of the images to profile is readable"):
        run_profile(calibrated(), [(None, None, 2)])


def test_histogram_pngs(tmp_path):
    result = run_profile(calibrated("fqvit_w8a8_att4"), batches(1))
    worst = select_histogram_points(result, "worst:3")
    assert worst == list(result.table.nsmallest(3, "qsnr_db")["name"])
    assert select_histogram_points(result, "none") == []
    assert len(select_histogram_points(result, "all")) == len(result.table)
    names = [worst[0], "blocks.0.attn.softmax.output"]  # a log2 point too
    paths = write_point_histograms(result, tmp_path, names)
    assert [p.name for p in paths] == [f"{n}_hist.png" for n in names]
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size[0] > 300
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10  # something drawn, not a blank canvas
