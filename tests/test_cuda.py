"""The GPU path: calibration and evaluation on CUDA against the CPU, and no host round trip per batch.

Skipped without a CUDA GPU (CI has none); run on the device machine with ``pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from conftest import OBSERVER_CASE_IDS as CASE_IDS
from conftest import OBSERVER_CASES, calibrated, make_tiny_vit, tiny_images
from models.quant_vit import QVit
from quant_config import load_recipe
from utils.checkpoint import load_calibrated, read_calibrated, save_calibrated, weights_sha256
from utils.engine import calibrate, evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
CUDA = torch.device("cuda")


def batches(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    return [(tiny_images(8, seed=10 + i).to(device), torch.arange(8) % 10, 0) for i in range(3)]


@contextlib.contextmanager
def no_host_sync():
    """Raise on any operation that makes the host wait for the GPU (``.item()``, ``bool(tensor)``, D2H copies)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype")
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("case", OBSERVER_CASES, ids=CASE_IDS)
def test_cuda_calibration_gives_the_cpu_scales(case):
    recipe, overrides = case
    cpu = calibrated(recipe, **overrides)
    gpu = QVit(make_tiny_vit(), load_recipe(recipe, overrides or None)).to(CUDA)
    calibrate(gpu, batches(CUDA), CUDA, progress=False)
    cpu_q, gpu_q = cpu.quantizers(), gpu.quantizers()
    assert cpu_q.keys() == gpu_q.keys()
    for name, q in cpu_q.items():
        assert gpu_q[name].scale.device.type == "cuda"
        # Float sums differ in the last bits between the two devices; a histogram search can move one bin.
        torch.testing.assert_close(gpu_q[name].scale.cpu(), q.scale, rtol=2e-3, atol=1e-7, msg=name)
        torch.testing.assert_close(gpu_q[name].zero_point.cpu(), q.zero_point, rtol=0, atol=1, msg=name)


@pytest.mark.parametrize("case", OBSERVER_CASES, ids=CASE_IDS)
def test_calibration_and_evaluation_batches_never_wait_for_the_gpu(case):
    recipe, overrides = case
    qvit = QVit(make_tiny_vit(), load_recipe(recipe, overrides or None)).to(CUDA)
    xs = [x for x, _, _ in batches(CUDA)]
    passes = [qvit.observing_ranges, qvit.calibrating]
    if qvit.recipe.reparam is not None:
        passes.insert(0, qvit.reparameterizing)
    for context in passes:
        with context():  # finishing a pass (the threshold searches) may read back; its batches may not
            for x in xs:
                with no_host_sync():
                    qvit(x)
    qvit(xs[0])  # the first quantized forward reads the per-tensor scales once
    with no_host_sync():
        qvit(xs[1])
        with qvit.fp32():
            qvit(xs[1])


def test_cuda_evaluation_matches_the_cpu():
    cpu = calibrated("trt_int8")
    gpu = QVit(make_tiny_vit(), load_recipe("trt_int8")).to(CUDA)
    calibrate(gpu, batches(CUDA), CUDA, progress=False)
    images = [(tiny_images(16, seed=50 + i), torch.arange(16) % 10, 0) for i in range(2)]
    a = evaluate(cpu, images, torch.device("cpu"), progress=False)
    b = evaluate(gpu, images, CUDA, progress=False)
    assert b.seconds_fp32 > 0 and b.seconds_int8 > 0  # CUDA events were recorded and read
    assert (a.fp32_top5[:, 0] == b.fp32_top5[:, 0]).mean() == 1.0
    assert (a.int8_top5[:, 0] == b.int8_top5[:, 0]).mean() >= 0.95
    assert abs(a.logit_cosine - b.logit_cosine) < 2e-3


def test_calibrated_on_cuda_loads_on_the_cpu(tmp_path):
    model = make_tiny_vit()
    fingerprint = weights_sha256(model)
    gpu = QVit(model, load_recipe("fqvit_w8a8_att8")).to(CUDA)
    calibrate(gpu, batches(CUDA), CUDA, progress=False)
    save_calibrated(gpu, tmp_path / "calibrated.pt", "tiny", fingerprint, None)
    record, recipe = read_calibrated(tmp_path / "calibrated.pt")
    cpu = QVit(make_tiny_vit(), recipe)
    load_calibrated(cpu, record, tmp_path / "calibrated.pt", fingerprint)
    x = tiny_images(8, seed=99)
    with torch.inference_mode():
        torch.testing.assert_close(cpu(x), gpu(x.to(CUDA)).cpu(), rtol=1e-3, atol=1e-3)


def test_gpu_bin_counts_equal_bincount_without_a_sync():
    from models.ptq.histogram import _bin_counts

    idx = torch.cat([torch.randint(0, 3000, (200_000,)), torch.tensor([0, 2999, 2999])]).to(torch.int32)
    on_gpu = idx.to(CUDA)
    with no_host_sync():
        counts = _bin_counts(on_gpu, 3000)
    torch.testing.assert_close(counts.cpu(), torch.bincount(idx, minlength=3000).double(), rtol=0, atol=0)
