"""Per-point quantization statistics of a QVit: where the error of a quantized ViT comes from.

FQ-ViT (arXiv 2111.13824, Sec. 3.2-3.3) traces the accuracy lost by fully quantized ViTs to the
LayerNorm inputs (inter-channel variation of the residual stream) and the attention map (a skewed
softmax distribution); this module measures every point so a user can see where it is for their model.

Every :class:`TensorQuantizer` of a calibrated :class:`QVit` that has a spec is a quantization point,
named by its module path without the ``_quant`` suffix (``blocks.3.attn.softmax.output``); points the
user switched off stay in the table. The profiler hooks those quantizers (no second copy of the model
code) and reports two views side by side:

* **accumulated** - the fully quantized model against the FP32 model on the same images: at each
  point, the FP32 tensor ``x`` against the quantized model's tensor ``Q(x')`` (``x'`` already carries
  every upstream error), so the error is seen building up through the network; plus the end-to-end
  logit cosine and top-1 agreement. The two models run in lock-step, one block at a time, so only one
  block's FP32 tensors are held.
* **integer program** (``program=``, ``test_qvit.py --integer-only``) - the accumulated view with the
  integer program (:mod:`models.integer`) as the quantized model: at each point, the FP32 tensor against
  the program's integers there, dequantized; the program runs stage by stage beside the FP32 model;
* **isolated** (``isolated=True``) - only that one point quantized, everything else FP32: locally
  ``x`` against ``Q(x)``, and end to end the logits with only that point on. The end-to-end run resumes
  from the cached FP32 input of the point's block (``QVit.block_sequence()``: a ViT's blocks, a Swin's
  PatchMerging and blocks; then ``norm`` and ``forward_head``), so a point late in the network costs a fraction of a full forward.

Statistics per point and view, streamed batch by batch (running float64 sums of float32 dot products,
fixed-bin histograms), so memory does not grow with the number of images and a result over several
batches equals the result over their concatenation:

* over every image: ``qsnr_db`` = 10 log10(sum x^2 / sum (x - Q)^2), ``mse``, ``cosine``, and
  ``fp32_mean`` / ``fp32_std`` / ``fp32_min`` / ``fp32_max`` of the reference tensor;
* over the first ``detail_samples`` images (default 16: each holds hundreds of thousands of values per
  point, and counting them was the profiler's most expensive part):

  - ``outlier_ratio_fp32`` / ``outlier_ratio_int8``: fraction of values farther than 3 standard
    deviations from the mean, mean and deviation taken per image (a weight: over the whole tensor),
    so that batching cannot change it;
  - ``clipped_fraction``: fraction of the quantizer's input saturated, beyond the grid's end points by
    more than half a step (log2 grids: half a step in log2, including non-zeros flushed to zero);
  - histograms of both tensors on bins fixed before any data from the calibrated grid: the grid's
    cells (one per level, of the coarsest step for per-channel scales) over twice the clip range, each
    split into an odd number of bins so every level sits in a bin centre, plus an under- and an
    overflow bin; log2 points are binned by log2(|x| / scale), 9 bins per level;
  - ``kl``: KL(P_fp32 || P_quant) over the grid's cells (the bins merged per level, plus the mass
    below and above; empty quantized cells smoothed to 1e-10). Rounding keeps a value in its cell, so
    the KL measures mass moved between levels: saturation, and in the accumulated view upstream drift.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.integer.program import Program
from models.integer.program import run as run_program
from models.ptq.tensor_quantizer import TensorQuantizer
from models.quant_vit import QVit, point_name
from utils.data import Batch

__all__ = ["COLUMNS", "HistogramBins", "NoImagesError", "ProfileResult", "kl_divergence", "point_name", "profile", "run_profile"]

log = logging.getLogger(__name__)

# Columns of the statistics table (and of qvit_statistics.csv), documented in the README.
STAT_COLUMNS = ("qsnr_db", "mse", "cosine", "kl", "outlier_ratio_fp32", "outlier_ratio_int8", "clipped_fraction")
COLUMNS = (
    "name", "layer_type", "kind", "stage", "block", "bit_type", "quantizer", "observer", "calibration_mode", "ptf",
    "token_scale", "token_scale_group", "enabled", "channels", "scale_min", "scale_max", "scale_mean", "zero_point_min", "zero_point_max", "clip_lo", "clip_hi",
    "elements", "fp32_mean", "fp32_std", "fp32_min", "fp32_max",
    *STAT_COLUMNS,
    *(f"iso_{c}" for c in STAT_COLUMNS),
    "iso_logit_cosine", "iso_logit_mse", "iso_agreement_top1",
)  # fmt: skip

_HIST_TARGET_BINS = 512
_HIST_MAX_BINS = 4096


@dataclass(frozen=True)
class HistogramBins:
    """Fixed histogram edges of one point: ``bins`` regular bins from ``lo`` plus under/overflow bins.

    The regular bins tile the quantization grid's cells (the values that round to one level), ``per_cell``
    odd sub-bins each, so every level sits in the middle of its cell's middle bin and a histogram merges
    exactly into cells. With ``log_scale`` set, values are binned by log2(|x| / log_scale) (zeros land in
    the underflow bin). ``clip`` is the grid's first and last level in the binned domain, for plots.
    """

    lo: float
    width: float
    bins: int
    per_cell: int
    log_scale: float | None
    clip: tuple[float, float]

    @classmethod
    def for_quantizer(cls, q: TensorQuantizer) -> HistogramBins:
        bt = q.spec.bit_type
        if q.method.log_domain:
            # Levels are the exponents -max_code * step ... 0 (log2: integers, log_sqrt2: halves), rounding
            # half-way between; cells from two below the smallest level to one above the largest, 9 bins each.
            max_code, step = q.method.max_code(bt), q.method.step
            cells = max_code + 4
            return cls(-(max_code + 2.5) * step, step / 9, 9 * cells, 9, float(q.scale.max()), (-max_code * step, 0.0))
        scale = q.scale.float()
        grid_lo, grid_hi = q.method.grid_bounds(scale, q.zero_point.float(), bt)
        clip_lo, clip_hi = float(grid_lo.min()), float(grid_hi.max())
        # Cells of the coarsest channel's step: with per-channel scales (PTF: s * 2^-k) every cell then
        # holds one coarse level and whole groups of finer ones, instead of a comb of empty bins. A twin
        # grid's step is its finer region's: the other's levels are whole multiples of it, so every level
        # still sits in a cell's middle bin.
        step = float(q.method.level_step(scale, q.zero_point.float()).max())
        span = clip_hi - clip_lo
        centre = (clip_lo + clip_hi) / 2
        # Twice the clip range, starting half a step below a level (the levels continue beyond the grid).
        first = clip_lo - math.ceil((clip_lo - (centre - span)) / step) * step
        cells = max(1, math.ceil((centre + span - first) / step))
        per_cell = max(1, round(_HIST_TARGET_BINS / cells))
        per_cell += 1 - per_cell % 2  # odd: a level sits in the middle of its cell's middle bin
        if cells * per_cell > _HIST_MAX_BINS:  # per-channel scales far apart: plain bins, no cells
            return cls(centre - span, 2 * span / _HIST_TARGET_BINS, _HIST_TARGET_BINS, 1, None, (clip_lo, clip_hi))
        return cls(first - step / 2, step / per_cell, cells * per_cell, per_cell, None, (clip_lo, clip_hi))

    def transform(self, x: Tensor) -> Tensor:
        if self.log_scale is None:
            return x
        return x.abs().div_(self.log_scale).log2_()  # 0 -> -inf: underflow

    def index(self, x: Tensor) -> Tensor:
        """Flat int32 bin indices: 0 underflow, 1..bins regular, bins + 1 overflow."""
        t = self.transform(x.detach().float())
        pos = (t - self.lo).div_(self.width).floor_().clamp_(-1, self.bins).add_(1)
        return pos.to(torch.int32).reshape(-1)

    def edges(self) -> np.ndarray:
        return self.lo + self.width * np.arange(self.bins + 1)

    def cells(self, hist: Tensor) -> Tensor:
        """A histogram (with under/overflow) merged into grid cells; under/overflow stay cells of their own."""
        regular = hist[1:-1].reshape(-1, self.per_cell).sum(1)
        return torch.cat([hist[:1], regular, hist[-1:]])


def kl_divergence(p_counts: Tensor, q_counts: Tensor) -> float:
    """KL(P || Q) of two count vectors over the same bins; Q's empty bins where P has mass count 1e-10."""
    p = p_counts.double() / p_counts.sum().clamp(min=1)
    q = q_counts.double() / q_counts.sum().clamp(min=1)
    q = torch.where((p > 0) & (q <= 0), torch.full_like(q, 1e-10), q)
    mask = p > 0
    return float((p[mask] * (p[mask].log() - q[mask].log())).sum())


class _Scratch:
    """One reusable float32 buffer: a fresh multi-megabyte tensor per point and batch costs page faults."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def like(self, x: Tensor) -> Tensor:
        n = x.numel()
        if self.buffer is None or self.buffer.numel() < n or self.buffer.device != x.device:
            self.buffer = torch.empty(n, dtype=torch.float32, device=x.device)
        return self.buffer[:n]


class _Accumulator:
    """Running statistics of the pairs (reference x, quantized value) at one point, for one view."""

    def __init__(self, bins: HistogramBins, device: torch.device, scratch: _Scratch) -> None:
        self.bins = bins
        self.scratch = scratch
        self.n = 0
        self.detail_n = 0  # elements of the images that also went into histograms and outlier counts
        # sum x, x.x, q.q, x.q, err.err / clipped, outliers of x, outliers of q / min x, -max x
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)
        self.extremes = torch.full((2,), math.inf, device=device)
        self.hist_ref = torch.zeros(bins.bins + 2, dtype=torch.int64, device=device)
        self.hist_q = torch.zeros_like(self.hist_ref)

    def update(self, ref: Tensor, quant: Tensor, clipped: Tensor | int, per_image: bool, detail_rows: int) -> None:
        """Add one batch. ``per_image``: the first axis is the batch (activations; a weight is one tensor).
        ``detail_rows``: how many leading rows (images) also go into the histograms and outlier counts."""
        rows = ref.shape[0] if per_image else 1
        r = ref.detach().float().reshape(rows, -1)
        q = quant.detach().float().reshape(rows, -1)
        r_flat, q_flat = r.reshape(-1), q.reshape(-1)
        err = torch.sub(r_flat, q_flat, out=self.scratch.like(r_flat))
        # Flat BLAS dot products: one pass each over the batch; per-image sums only for the detail rows.
        self.sums += torch.stack(
            [r_flat.sum(), torch.dot(r_flat, r_flat), torch.dot(q_flat, q_flat), torch.dot(r_flat, q_flat), torch.dot(err, err)]
        ).double()
        self.n += r.numel()
        lo, hi = torch.aminmax(r_flat)
        torch.minimum(self.extremes, torch.stack([lo, -hi]), out=self.extremes)
        if detail_rows > 0:
            r_d, q_d = r[:detail_rows], q[:detail_rows]
            self.detail_n += r_d.numel()
            self.counts[0] += clipped
            self.counts[1] += _outliers(r_d)
            self.counts[2] += _outliers(q_d)
            length = self.bins.bins + 2
            self.hist_ref += torch.bincount(self.bins.index(r_d), minlength=length)
            self.hist_q += torch.bincount(self.bins.index(q_d), minlength=length)

    def result(self) -> dict[str, float]:
        s = self.sums.tolist()
        c = self.counts.tolist()
        n = max(self.n, 1)
        # Over grid cells: rounding within a cell is no change of distribution, so KL sees the mass moved
        # between levels (saturation, and in the accumulated view the drift of upstream errors).
        kl = kl_divergence(self.bins.cells(self.hist_ref), self.bins.cells(self.hist_q))
        mean = s[0] / n
        return {
            "elements": self.n,
            "fp32_mean": mean,
            "fp32_std": math.sqrt(max(s[1] / n - mean * mean, 0.0)),
            "fp32_min": float(self.extremes[0]),
            "fp32_max": -float(self.extremes[1]),
            "qsnr_db": 10 * math.log10(s[1] / s[4]) if s[4] > 0 else math.inf,
            "mse": s[4] / n,
            "cosine": s[3] / math.sqrt(s[1] * s[2]) if s[1] > 0 and s[2] > 0 else (1.0 if s[4] == 0 else 0.0),
            "kl": kl,
            "outlier_ratio_fp32": c[1] / max(self.detail_n, 1),
            "outlier_ratio_int8": c[2] / max(self.detail_n, 1),
            "clipped_fraction": c[0] / max(self.detail_n, 1),
        }


def _outliers(v: Tensor) -> Tensor:
    """Elements farther than 3 standard deviations from their row's (image's) mean."""
    # From the row's sum and norm: torch.std_mean's Welford pass is several times slower.
    size = v.shape[1]
    mean = v.sum(1) / size
    std = (torch.linalg.vector_norm(v, dim=1).square_() / size - mean * mean).clamp_(min=0.0).sqrt_()
    return torch.count_nonzero(v > (mean + 3 * std)[:, None]) + torch.count_nonzero(v < (mean - 3 * std)[:, None])


@dataclass
class _Point:
    name: str
    quantizer: TensorQuantizer
    bins: HistogramBins
    resume: int | str  # block index, "norm" (after the blocks) or "full"
    acc: _Accumulator
    iso: _Accumulator | None
    iso_logits: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # cosine sum, mse sum, agreements


@dataclass
class ProfileResult:
    """The statistics table (one row per point), histograms for plots, and the run's totals."""

    table: Any  # pandas.DataFrame
    histograms: dict[str, tuple[HistogramBins, np.ndarray, np.ndarray]]
    totals: dict[str, Any]


class NoImagesError(ValueError):
    """The batches held no image to profile."""


class _Profiler:
    def __init__(self, qvit: QVit, isolated: bool, detail_samples: int, program: Program | None = None) -> None:
        if not qvit.is_calibrated:
            raise RuntimeError("profile() needs a calibrated QVit")
        if program is not None and isolated:
            raise ValueError("the isolated view quantizes one point of the fake-quant model; the integer program has the accumulated view only")
        self.qvit = qvit
        self.program = program
        self._pending: dict[int, tuple[Tensor, Any]] = {}  # quantizer id -> the program's codes at that point and their grid
        self.unmatched: set[str] = set()  # points the integer program holds no tensor of
        self.detail_samples = detail_samples
        self.model = qvit.model
        self.isolated = isolated
        # The blocks run one by one in the lockstep pass, and where an isolated run resumes.
        sequence = qvit.block_sequence()
        self.sequence = [block for _, block in sequence]
        self.prefixes = [prefix for prefix, _ in sequence]
        device = next(qvit.parameters()).device
        scratch = _Scratch()
        self.points: dict[int, _Point] = {}
        # Points switched off by the user stay in the table: they add no error of their own.
        for path, q in qvit.quantizers().items():
            bins = HistogramBins.for_quantizer(q)
            self.points[id(q)] = _Point(
                point_name(path),
                q,
                bins,
                _resume_point(path, self.prefixes),
                _Accumulator(bins, device, scratch),
                _Accumulator(bins, device, scratch) if isolated else None,
            )
        self.phase = "off"
        self.refs: dict[int, Tensor] = {}
        if program is not None:
            stages = [name for name, _ in program.stages]
            if stages != ["embed", *self.prefixes, "head"]:
                raise ValueError(f"the program's stages {stages} do not follow the model's block sequence")
            starts = [start for _, start in program.stages] + [len(program.nodes)]
            self.program_stages = list(zip(starts[:-1], starts[1:]))
            self.by_point = {p.name: p for p in self.points.values()}
        self.block_inputs: dict[int | str, Tensor] = {}
        self.weights_done: set[int] = set()
        self.images = 0
        self.batch_images = 1  # images in the batch being profiled
        self.logits = [0.0, 0.0, 0.0]  # accumulated view: cosine sum, mse sum, agreements

    # -- hooks ---------------------------------------------------------------------------------------
    def _on_quantizer(self, module: TensorQuantizer, args: tuple, output: Tensor) -> None:
        point = self.points.get(id(module))
        if point is None or self.phase not in ("fp32", "quant"):
            return
        x = args[0]
        is_weight = module.is_weight
        if is_weight and id(module) in self.weights_done:
            return  # a weight's statistics are those of its first call
        detail = self._detail_rows(x, is_weight)
        detail_x = x if is_weight else x[:detail]  # a weight is one whole tensor
        if self.phase == "fp32":
            self.refs[id(module)] = x
            if point.iso is not None:
                quantized = module.fake_quant(x) if module.enabled else x
                point.iso.update(x, quantized, self._clipped(module, detail_x) if detail else 0, not is_weight, detail)
            return
        ref = self.refs.pop(id(module), None)
        if ref is None:
            return
        point.acc.update(ref, output, self._clipped(module, detail_x) if detail else 0, not is_weight, detail)
        if is_weight:
            self.weights_done.add(id(module))

    def _detail_rows(self, x: Tensor, is_weight: bool) -> int:
        """Leading rows of this batch that belong to the first ``detail_samples`` images profiled (a weight:
        its one row). A tensor may have several rows per image, image by image: a Swin's window attention
        runs on (images x windows, tokens, channels)."""
        if is_weight:
            return 1
        images = max(0, min(self.detail_samples - self.images, self.batch_images))
        return images * max(1, x.shape[0] // self.batch_images)

    @staticmethod
    def _clipped(q: TensorQuantizer, x: Tensor) -> Tensor | int:
        """Elements of ``x`` saturated: farther than half a step beyond the grid's end points.

        Half a step, because rounding alone errs that much: MinMax with a rounded zero point leaves the
        grid's lowest point a hair above GELU's minimum, and a plain range test called 12% of an MLP
        input "clipped" for errors no larger than rounding's. Log grids: half a level (above
        scale * 2^(step / 2), or non-zero and flushed to zero).
        """
        bt = q.spec.bit_type
        if q.scale.dim() == 0 and not q.method.log_domain:
            # Usually nothing saturates: one min/max pass proves it without counting.
            lo, hi = torch.aminmax(x)
            below, above = q.method.grid_bounds(q.scale_value, float(q.zero_point), bt, margin=0.5)
            if float(lo) >= below and float(hi) <= above:
                return 0
        scale = q.broadcast(q.scale, x)
        if q.method.log_domain:
            mag = x.abs()
            step = q.method.step
            smallest = scale * 2.0 ** (-(q.method.max_code(bt) + 0.5) * step)
            return torch.count_nonzero(mag > scale * 2.0 ** (step / 2)) + torch.count_nonzero((mag > 0) & (mag < smallest))
        below, above = q.method.grid_bounds(scale, q.broadcast(q.zero_point, x), bt, margin=0.5)
        return torch.count_nonzero(x < below) + torch.count_nonzero(x > above)

    # -- passes --------------------------------------------------------------------------------------
    def _forward_from(self, start: int | str, images: Tensor) -> Tensor:
        """Logits from the cached FP32 input of block ``start`` (or of the final norm, or the images)."""
        m = self.model
        if start == "full":
            return m(images)
        h = self.block_inputs[start]
        if start != "norm":
            for block in self.sequence[start:]:
                h = block(h)
        return m.forward_head(m.norm(h))

    @staticmethod
    def _compare(ref: Tensor, out: Tensor, into: list[float]) -> None:
        into[0] += float(F.cosine_similarity(ref.float(), out.float(), dim=1).sum())
        into[1] += float((ref.float() - out.float()).square().mean(dim=1).sum())
        into[2] += float((ref.argmax(dim=1) == out.argmax(dim=1)).sum())

    def _lockstep(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """FP32 and quantized forward one stage at a time, so only one block's FP32 tensors are held.

        Stages: the embedding (through the model's own forward), each block, then ``norm`` and
        ``forward_head``; the hooks store each stage's FP32 tensors and compare them in its quantized run.
        """
        m = self.model
        # A model without a known block sequence (models accepted by structure alone) runs whole.
        stages = [self.qvit.first_block_input, *self.sequence, lambda h: m.forward_head(m.norm(h))] if self.sequence else [self.qvit]
        h_fp32 = images
        # As QVit.forward: a recipe the integer program runs is simulated in float64 (the isolated view,
        # one point quantized in the FP32 model, stays float32).
        h_quant = images.double() if self.qvit.simulates_integer else images
        env = None if self.program is None else {self.program.input: images}
        for i, stage in enumerate(stages):
            if self.isolated and 0 < i:
                self.block_inputs[i - 1 if i <= len(self.sequence) else "norm"] = h_fp32
            self.phase = "fp32"
            with self.qvit.fp32():
                h_fp32 = stage(h_fp32)
            if env is None:
                self.phase = "quant"
                h_quant = stage(h_quant)
            else:
                start, stop = self.program_stages[i]
                run_program(self.program, images, record=self._on_value, env=env, start=start, stop=stop, constants=self.constants)
                self._match_program()
            self.phase = "off"
            self.refs.clear()
        if env is not None:
            h_quant = env[self.program.output]
        return h_fp32, h_quant.to(h_fp32.dtype)

    def _on_value(self, index: int, node, inputs: list[Tensor], outputs: list[Tensor]) -> None:
        """The integer program's values at quantization points, kept until the FP32 stage that records the
        point's reference has run (a residual addition writes the next block's LayerNorm input)."""
        for name, out in zip(node.outputs, outputs):
            value = self.program.values[name]
            point = self.by_point.get(value.point) if value.point else None
            if point is not None:
                self._pending[id(point.quantizer)] = (out, value.grid)

    def _match_program(self) -> None:
        """Every FP32 reference of this stage against the integer program's dequantized codes (a weight:
        its quantized value, the program's integers times their scale)."""
        for key, ref in self.refs.items():
            point = self.points[key]
            q = point.quantizer
            detail = self._detail_rows(ref, q.is_weight)
            if q.is_weight:
                if key not in self.weights_done:
                    point.acc.update(ref, q.fake_quant(ref), self._clipped(q, ref) if detail else 0, False, detail)
                    self.weights_done.add(key)
                continue
            codes, grid = self._pending.pop(key, (None, None))
            if codes is None or codes.numel() != ref.numel():
                self.unmatched.add(point.name)
                continue
            quant = grid.dequantize(codes).reshape(ref.shape)
            point.acc.update(ref, quant, self._clipped(q, ref[:detail]) if detail else 0, True, detail)

    @torch.inference_mode()
    def run(self, batches: Iterable[Batch], device: torch.device, progress: bool) -> ProfileResult:
        from tqdm import tqdm

        handles = [p.quantizer.register_forward_hook(self._on_quantizer) for p in self.points.values()]
        enabled = {id(p.quantizer): p.quantizer.enabled for p in self.points.values()}
        if self.program is not None:
            self.constants = self.program.constants(device)
        start = time.perf_counter()
        seconds_isolated = 0.0
        try:
            for x, _, _ in tqdm(batches, desc="profile", unit="batch", disable=not progress, leave=False):
                if x is None:
                    continue
                x = x.to(device, non_blocking=True)
                self.batch_images = len(x)
                logits_fp32, logits_q = self._lockstep(x)
                self._compare(logits_fp32, logits_q, self.logits)
                if self.isolated:
                    t0 = time.perf_counter()
                    self._isolated_logits(x, logits_fp32, enabled)
                    seconds_isolated += time.perf_counter() - t0
                self.block_inputs.clear()
                self.images += len(x)
        finally:
            self.phase = "off"
            self.refs.clear()
            for h in handles:
                h.remove()
        if self.images == 0:
            raise NoImagesError("none of the images to profile is readable")
        seconds = time.perf_counter() - start
        log.info("profiled %d points on %d images in %.1f s (isolated view %.1f s)", len(self.points), self.images, seconds, seconds_isolated)
        return self._result(seconds, seconds_isolated)

    def _isolated_logits(self, images: Tensor, logits_fp32: Tensor, enabled: dict[int, bool]) -> None:
        """Logits with one point quantized at a time; every ``enabled`` flag is restored afterwards."""
        try:
            for point in self.points.values():
                point.quantizer.enabled = False
            for point in self.points.values():
                if not enabled[id(point.quantizer)]:  # switched off: its isolated model is the FP32 model
                    self._compare(logits_fp32, logits_fp32, point.iso_logits)
                    continue
                point.quantizer.enabled = True
                self._compare(logits_fp32, self._forward_from(point.resume, images), point.iso_logits)
                point.quantizer.enabled = False
        finally:
            for point in self.points.values():
                point.quantizer.enabled = enabled[id(point.quantizer)]

    def _result(self, seconds: float, seconds_isolated: float) -> ProfileResult:
        import pandas as pd

        rows, hists = [], {}
        for point in self.points.values():
            q = point.quantizer
            spec = q.spec
            block = point.resume if isinstance(point.resume, int) else None
            row: dict[str, Any] = {
                "name": point.name,
                "layer_type": point.name.removeprefix(f"{self.prefixes[block]}.") if block is not None else point.name,
                "kind": q.kind,
                "stage": "blocks" if block is not None else ("embed" if point.resume == "full" else "head"),
                "block": block,
                "bit_type": spec.bit_type.name,
                "quantizer": spec.quantizer,
                "observer": spec.observer,
                "calibration_mode": spec.calibration_mode,
                "ptf": spec.power_of_two_factor,
                "token_scale": spec.dynamic_token_scale,
                "token_scale_group": spec.token_scale_group,
                "enabled": q.enabled,
                "channels": q.scale.numel(),
                "scale_min": float(q.scale.min()),
                "scale_max": float(q.scale.max()),
                "scale_mean": float(q.scale.float().mean()),
                "zero_point_min": float(q.zero_point.min()),
                "zero_point_max": float(q.zero_point.max()),
                "clip_lo": point.bins.clip[0],
                "clip_hi": point.bins.clip[1],
            }
            row.update(point.acc.result())
            if point.iso is not None:
                iso = point.iso.result()
                row.update({f"iso_{k}": iso[k] for k in STAT_COLUMNS})
                n = max(self.images, 1)
                row.update(
                    iso_logit_cosine=point.iso_logits[0] / n, iso_logit_mse=point.iso_logits[1] / n, iso_agreement_top1=point.iso_logits[2] / n
                )
            rows.append(row)
            hists[point.name] = (point.bins, point.acc.hist_ref.cpu().numpy(), point.acc.hist_q.cpu().numpy())
        table = pd.DataFrame(rows).reindex(columns=[c for c in COLUMNS if any(c in r for r in rows)])
        n = max(self.images, 1)
        finite = table["qsnr_db"].replace(math.inf, np.nan)
        worst = table.nsmallest(10, "qsnr_db")
        totals: dict[str, Any] = {
            "samples": self.images,
            "points": len(rows),
            "views": ["accumulated", "isolated"] if self.isolated else ["accumulated"],
            # Over the points with any error (a point with none has an infinite QSNR).
            "qsnr_db_mean": _json_number(finite.mean()),
            "qsnr_db_median": _json_number(finite.median()),
            "logit_cosine": self.logits[0] / n,
            "logit_mse": self.logits[1] / n,
            "agreement_top1": self.logits[2] / n,
            "worst": [
                {"name": r.name, "qsnr_db": _json_number(r.qsnr_db), "mse": r.mse, "cosine": r.cosine} for r in worst.itertuples()
            ],
            "seconds": seconds,
        }
        if self.program is not None:
            totals["points_without_program_tensor"] = sorted(self.unmatched)
        if self.isolated:
            iso_worst = table.nsmallest(10, "iso_logit_cosine")
            totals["isolated_worst"] = [
                {"name": r.name, "iso_logit_cosine": r.iso_logit_cosine, "iso_qsnr_db": _json_number(r.iso_qsnr_db)}
                for r in iso_worst.itertuples()
            ]
            totals["seconds_isolated"] = seconds_isolated
        return ProfileResult(table, hists, totals)


def _json_number(value: float) -> float | None:
    """NaN / infinity have no JSON spelling: None."""
    value = float(value)
    return value if math.isfinite(value) else None


def _resume_point(path: str, prefixes: list[str]) -> int | str:
    """Where an isolated run for this point can start: its block (index into ``prefixes``, the paths of
    QVit.block_sequence()), the final norm, or the image."""
    block = next((i for i, prefix in enumerate(prefixes) if path.startswith(f"{prefix}.")), None)
    if block is not None:
        return block
    if prefixes and path.split(".")[0] in ("norm", "fc_norm", "head", "head_dist", "head_drop"):
        return "norm"
    return "full"


def run_profile(
    qvit: QVit,
    batches: Iterable[Batch],
    device: torch.device | str = "cpu",
    isolated: bool = False,
    progress: bool = False,
    detail_samples: int = 16,
    program: Program | None = None,
) -> ProfileResult:
    """Profile a calibrated QVit on ``batches`` (``(images, labels, unreadable)`` as the data loaders yield).

    Histograms, KL, outlier ratios and the clipped fraction cover the first ``detail_samples`` images;
    QSNR, MSE, cosine, the FP32 moments and the logit comparison all of them. With ``program`` (the
    QVit's integer program, :mod:`models.integer`) the quantized side is the program's integers at each
    point, dequantized; the clipped fraction is then the FP32 tensor's against the point's grid.
    """
    return _Profiler(qvit, isolated, detail_samples, program).run(batches, torch.device(device), progress)


def profile(qvit: QVit, loader: Iterable, device: torch.device | str = "cpu", isolated: bool = False, detail_samples: int = 16) -> Any:
    """The statistics table (a pandas DataFrame, one row per quantization point) for notebooks.

    ``loader`` yields image tensors, ``(images, labels)`` pairs or the triples of :mod:`utils.data`.
    """

    def batches() -> Iterable[Batch]:
        for item in loader:
            if isinstance(item, Tensor):
                yield item, None, 0
            else:
                yield item[0], None, 0

    result = run_profile(qvit, batches(), device, isolated, detail_samples=detail_samples)
    result.table.attrs["totals"] = result.totals
    return result.table
