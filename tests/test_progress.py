"""Calibration's progress is honest: every bar's total is the work its pass does, and each pass reports
its seconds (docs/test_qvit.md)."""
from __future__ import annotations

import torch
import tqdm as tqdm_module

from conftest import make_tiny_vit, tiny_images
from models.quant_vit import QVit
from quant_config import load_recipe
from utils import engine
from utils.engine import calibrate

BATCHES = [(tiny_images(8, seed=40 + i), None, 0) for i in range(4)]  # 32 images


class Recorder(tqdm_module.tqdm):
    """tqdm that keeps every bar made (disabled bars too: ``disable`` is ignored), with its last count."""

    bars: list["Recorder"] = []

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = False
        kwargs["file"] = open("/dev/null", "w")  # noqa: SIM115 (closed with the bar)
        super().__init__(*args, **kwargs)
        Recorder.bars.append(self)


def test_every_bar_ends_at_its_total_and_each_pass_reports_its_seconds(monkeypatch):
    Recorder.bars = []
    monkeypatch.setattr(engine, "tqdm", Recorder)
    monkeypatch.setattr("tqdm.tqdm", Recorder)  # the reconstruction's bar (imported where it is made)
    recipe = load_recipe("cpu_int8", {"scale_search.images": 16, "bias_correction.images": 24,
                                      "reconstruction": {"iters": 5, "images": 16, "batch": 8}})  # fmt: skip
    qvit = QVit(make_tiny_vit(), recipe)
    lines = []
    result = calibrate(qvit, BATCHES, torch.device("cpu"), progress=True, report=lines.append)
    bars = {bar.desc.removesuffix(": "): (bar.n, bar.total) for bar in Recorder.bars}  # set_description adds ": "
    names = ["reparameterize", "calibrate", "search scales", "reconstruct blocks", "correct biases"]
    assert {name: bars[name] for name in names} == {"reparameterize": (32, 32), "calibrate": (32, 32), "search scales": (16, 16),
                                                    "reconstruct blocks": (16, 16), "correct biases": (24, 24)}  # fmt: skip
    # Block reconstruction: one bar over block k of N, each block's steps.
    assert bars["reconstruct block 2/2"] == (2 * 5, 2 * 5)
    assert list(result.passes) == names and all(s > 0 for s in result.passes.values())
    assert [line.split(":")[0] for line in lines] == names
    assert lines[2] == f"search scales: 16 images, {result.passes['search scales']:.1f} s"
