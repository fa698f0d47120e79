"""QVit: a timm Vision Transformer converted in place into FQ-ViT's fully quantized form (arXiv 2111.13824).

:func:`QVit` walks a timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, ...) and swaps each float
module for its quantized subclass from :mod:`models.ptq.layers` via the class map of
:mod:`models.ptq.registry` - timm's own model
code keeps running, only the leaf computations change. Attention is switched from timm's fused kernel
to the explicit softmax so that the softmax can be quantized.

Modes are switched on the model, not per layer::

    qvit = QVit(timm_model, recipe)
    with qvit.calibrating():          # observers see FP32 activations
        for images in loader:
            qvit(images)
    logits_int8 = qvit(images)        # quantized (the default mode)
    with qvit.fp32():
        logits_fp32 = qvit(images)    # exactly the timm model (non-fused attention)

The calibrated scales are buffers: ``qvit.state_dict()`` saves them and ``load_state_dict`` restores a
calibrated model without calibration data.

A recipe with ``reparam`` first folds per-channel factors into each LayerNorm (with ``mlp_alpha``, each
MLP's GELU) and the Linear after it (:mod:`models.ptq.reparam`), from one pass over the calibration
images before calibration proper::

    with qvit.reparameterizing():     # FP32, records the LayerNorm (GELU) output ranges; folds on exit
        for images in loader:
            qvit(images)
    with qvit.calibrating(): ...

Exact and distributed calibration (``torchrun``, each process on its own batches): a first pass
``with qvit.observing_ranges()`` records every histogram's range, all-reduced at its end, so the
``calibrating()`` pass after it counts into fixed bins and its statistics are all-reduced before the
scales are computed - equal to one process calibrating on all the batches. ``utils.engine.calibrate``
runs every pass the recipe needs.
"""
from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from typing import Iterator

import torch
from timm.layers import LayerScale, PatchEmbed
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import Tensor, nn

from models.ptq.bias_correction import correct_biases, layer_inputs
from models.ptq.gptq import HessianCollector, collect_hessians, gptq_quantize
from models.ptq.collectives import gather_batches, is_distributed
from models.ptq.layers import QuantConv2d, QuantLinear
from models.ptq.registry import QUANT_MODULES, convert_module
from models.ptq.reconstruction import reconstruct_block, too_few_images_per_step
from models.ptq.reparam import ReparamFactors, apply_factors, compute_factors, observe_linear_inputs, reparam_pairs
from models.ptq.scale_search import search_scales
from models.ptq.tensor_quantizer import QuantMode, QuantState, TensorQuantizer
from quant_config import ConfigError, QuantRecipe

__all__ = ["QVit", "UnsupportedModelError", "check_supported", "point_name"]

log = logging.getLogger(__name__)


def point_name(quantizer_path: str) -> str:
    """``blocks.3.attn.qkv.input_quant`` -> ``blocks.3.attn.qkv.input`` (the point's name in every report)."""
    return quantizer_path.removesuffix("_quant")


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Within: the module's parameters take no gradient (only the learned rounding does)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class _ReachedFirstBlock(Exception):
    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class UnsupportedModelError(ValueError):
    """The timm model has a structure QVit cannot quantize (the message names the module)."""


# Modules with parameters of their own are converted to a quantized subclass (models.ptq.registry) or
# kept in float (the models' own embeddings and tokens, layer scales). Anything else with weights is an
# architecture QVit does not know.
_FLOAT_OK = (VisionTransformer, SwinTransformer, LayerScale, PatchEmbed)


class QVit(nn.Module):
    """A quantized view of a timm ViT: ``QVit(model, recipe)`` converts ``model`` in place and wraps it."""

    def __init__(self, model: nn.Module, recipe: QuantRecipe) -> None:
        super().__init__()
        check_supported(model)  # before touching the model: a refused model is left as it was
        self.recipe = recipe
        self.state = QuantState(QuantMode.QUANT)
        self.model = model
        self.reparam_factors: ReparamFactors = {}  # folded into the weights; saved with the calibrated state
        self._ranges_fixed = False  # observing_ranges() ran: the next calibrating() keeps its histogram bins
        self.searched_ratios: dict[str, float] = {}  # scale ratios chosen by searching_scales()
        self._reparam_observers: dict = {}  # LayerNorm / MLP activation path -> its output's observer, during reparameterizing()
        self._integer = recipe.integer_refusal() is None
        self._convert()
        self._apply_layer_specs()
        self._points = list(self.quantizers().values())  # what simulates_integer checks on every forward
        for name, quantizer in self.model.named_modules():
            if isinstance(quantizer, TensorQuantizer):
                quantizer.name = name
                group = quantizer.spec.token_scale_group if quantizer.spec is not None else 0
                if group and quantizer.num_channels % group:
                    raise ConfigError(
                        f"{recipe.name}: token_scale_group {group} does not divide the {quantizer.num_channels} channels of {name}"
                    )
        # In the wrapped model's mode, for the QVit and the quantizers it added: an exporter that restores
        # "the model's" training mode afterwards (torch.onnx) must not switch an eval model's DropPath on.
        self.train(model.training)

    def _convert(self) -> None:
        # Collect first: converting while iterating named_modules() would visit the new children.
        for module in list(self.model.modules()):
            convert_module(module, self.state, self.recipe)

    def _apply_layer_specs(self) -> None:
        """Replace the quantizers named by the recipe's ``layers`` patterns (later patterns win)."""
        if not self.recipe.layers:
            return
        points = {name: m for name, m in self.model.named_modules() if isinstance(m, TensorQuantizer)}
        chosen: dict[str, str] = {}
        for pattern in self.recipe.layers:
            names = [name for name in points if fnmatch.fnmatchcase(name, pattern)]
            if not names:
                raise ConfigError(
                    f"{self.recipe.name}.layers: pattern {pattern!r} matches no quantization point of this model "
                    f"(paths look like {next((n for n in points if n.endswith('fc2.input_quant')), next(iter(points)))!r})"
                )
            chosen.update(dict.fromkeys(names, pattern))
        for name, pattern in chosen.items():
            old = points[name]
            where = f"{self.recipe.name}.layers[{pattern!r}]"
            spec = self.recipe.layer_spec(old.kind, self.recipe.layers[pattern], where)
            if spec is not None and name.endswith("softmax.input_quant") and self.recipe.integer_softmax:
                if spec.quantizer != "uniform" or spec.calibration_mode != "layer_wise":
                    raise ConfigError(f"{where}: the integer softmax needs uniform, layer_wise scores at {name}")
            parent, _, attr = name.rpartition(".")
            new = TensorQuantizer(spec, self.state, num_channels=old.num_channels, channel_axis=old.channel_axis,
                                  is_weight=old.is_weight, kind=old.kind, device=old.scale.device)
            setattr(self.model.get_submodule(parent), attr, new)

    # -- modes ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _mode(self, mode: QuantMode) -> Iterator["QVit"]:
        previous = self.state.mode
        self.state.mode = mode
        try:
            yield self
        finally:
            self.state.mode = previous

    def fp32(self) -> contextlib.AbstractContextManager["QVit"]:
        """Run the unquantized float model (identical to timm with fused attention off)."""
        return self._mode(QuantMode.FP32)

    def quantized(self) -> contextlib.AbstractContextManager["QVit"]:
        """Run quantized (the default mode; useful inside :meth:`fp32`)."""
        return self._mode(QuantMode.QUANT)

    def exporting(self) -> contextlib.AbstractContextManager["QVit"]:
        """Quantizers pass through (an exporter's Q/DQ hooks replace them); layers compute what deploys."""
        return self._mode(QuantMode.EXPORT)

    @contextlib.contextmanager
    def reparameterizing(self) -> Iterator["QVit"]:
        """Run FP32 and record the channel ranges of each LayerNorm output (and, with ``mlp_alpha`` /
        ``value_alpha``, each GELU output / attention output); on a clean exit fold the recipe's factors."""
        if self.recipe.reparam is None:
            raise RuntimeError(f"recipe {self.recipe.name} has no reparam section")
        if self.reparam_factors:
            raise RuntimeError("the model is already reparameterized")
        with self._mode(QuantMode.FP32), observe_linear_inputs(reparam_pairs(self.model, self.recipe.reparam)) as observers:
            self._reparam_observers = observers  # their running ranges take part in the non-finite check
            try:
                yield self
            finally:
                self._reparam_observers = {}
        if not all(observer.has_data for observer in observers.values()):
            raise RuntimeError("reparameterizing() saw no images")
        for observer in observers.values():
            observer.synchronize()  # every process folds the same factors
        ranges = {name: observer.compute_range() for name, observer in observers.items()}
        self.apply_reparam(compute_factors(self.model, ranges, self.recipe.reparam))

    @torch.no_grad()
    def apply_reparam(self, factors: ReparamFactors) -> None:
        """Fold per-channel (shift, scale) factors into the weights (calibrated-file loading replays them)."""
        if self.reparam_factors:
            raise RuntimeError("the model is already reparameterized")
        apply_factors(self.model, factors)
        self.reparam_factors = {name: (shift.detach().cpu(), scale.detach().cpu()) for name, (shift, scale) in factors.items()}

    @property
    def needs_range_pass(self) -> bool:
        """Whether some point keeps a histogram, which a first :meth:`observing_ranges` pass makes exact."""
        return any(q.needs_range for q in self.quantizers().values())

    @contextlib.contextmanager
    def observing_ranges(self) -> Iterator["QVit"]:
        """First calibration pass (FP32): record every histogram's range; on a clean exit fix the bins,
        all-reduced across processes, for the :meth:`calibrating` pass that must follow on the same images."""
        for quantizer in self.quantizers().values():
            quantizer.reset_observer()
        with self._mode(QuantMode.RANGE):
            yield self
        for quantizer in self.quantizers().values():
            quantizer.fix_range()
        self._ranges_fixed = True

    @contextlib.contextmanager
    def calibrating(self) -> Iterator["QVit"]:
        """Observe FP32 activations; on a clean exit every quantizer computes its scale and zero point
        (and, with the recipe's ``gptq``, every Linear/Conv weight is rounded from the inputs seen here).

        Alone, histograms grow their range as the data comes (re-binning); after :meth:`observing_ranges`
        they count into its fixed bins, which distributed calibration requires.
        """
        if self.recipe.reparam is not None and not self.reparam_factors:
            raise RuntimeError(f"recipe {self.recipe.name} reparameterizes the LayerNorm outputs: run the images through reparameterizing() first")
        ranges_fixed, self._ranges_fixed = self._ranges_fixed, False
        if is_distributed() and self.needs_range_pass and not ranges_fixed:
            raise RuntimeError("distributed calibration needs a first observing_ranges() pass over the same images")
        if not ranges_fixed:
            for quantizer in self.quantizers().values():
                quantizer.reset_observer()
        gptq = self.recipe.gptq
        hessians = collect_hessians(self.gptq_layers(), gptq.rows) if gptq is not None else contextlib.nullcontext()
        with self._mode(QuantMode.CALIBRATE), hessians as collector:
            yield self
        self.finalize_calibration()
        if collector is not None:
            self._round_weights(collector)

    def gptq_layers(self) -> dict[str, QuantLinear | QuantConv2d]:
        """The layers whose weights the recipe's ``gptq`` rounds: every Linear and (ungrouped) convolution
        with a quantized weight."""
        if self.recipe.gptq is None:
            return {}
        return {
            name: m for name, m in self.model.named_modules()
            if isinstance(m, (QuantLinear, QuantConv2d)) and getattr(m, "groups", 1) == 1
            and m.weight_quant.spec is not None and m.weight_quant.enabled
        }  # fmt: skip

    @torch.no_grad()
    def _round_weights(self, collector: HessianCollector) -> None:
        collector.synchronize()
        start = time.perf_counter()
        layers = self.gptq_layers()
        for name, module in layers.items():
            quantizer, hessian = module.weight_quant, collector.hessians.get(name)
            if not quantizer.is_calibrated:
                continue
            if hessian is None:
                log.warning("gptq: %s saw no calibration input; its weight is rounded to nearest", name)
                quantizer.set_rounded(quantizer.fake_quant(module.weight))  # still saved, so the file loads
                continue
            quantizer.set_rounded(gptq_quantize(module.weight, hessian, quantizer, self.recipe.gptq))
        log.info("gptq: rounded %d weights in %.1f s", len(layers), time.perf_counter() - start)

    @contextlib.contextmanager
    def searching_scales(self) -> Iterator["QVit"]:
        """After calibration: run FP32 and score candidate scales by the recipe's ``scale_search`` metric;
        on a clean exit every searched point takes its best scale. The ``fisher`` metric back-propagates
        (to the activations only), so gradients are on inside, even under ``torch.inference_mode``."""
        spec = self.recipe.scale_search
        if spec is None:
            raise RuntimeError(f"recipe {self.recipe.name} has no scale_search section")
        if not self.is_calibrated:
            raise RuntimeError("searching_scales() refines calibrated scales: calibrate first")
        gradients = contextlib.ExitStack()
        if spec.metric == "fisher":
            if any(p.is_inference() for p in self.model.parameters()):
                # Autograd cannot save inference tensors for the backward pass.
                raise RuntimeError("the fisher scale search back-propagates through the model: create the model outside torch.inference_mode")
            gradients.enter_context(torch.inference_mode(False))
            gradients.enter_context(torch.enable_grad())
        with self._mode(QuantMode.FP32), search_scales(self.model, spec) as search:
            with gradients:
                yield self
        self.searched_ratios = search.apply()
        log.info("%s scale search: %d points, mean ratio %.3f", spec.metric, len(self.searched_ratios),
                 sum(self.searched_ratios.values()) / max(1, len(self.searched_ratios)))

    @contextlib.contextmanager
    def reconstructing(self, progress: bool = False) -> Iterator["QVit"]:
        """After calibration (scale search, GPTQ): the images run through the model (FP32) are kept; on a
        clean exit every block learns its weights' rounding from them, in order (:mod:`models.ptq.reconstruction`),
        with a bar of block k of N and its steps when ``progress``.
        Under ``torchrun`` every process then holds every process's images and shares each step's work."""
        spec = self.recipe.reconstruction
        if spec is None:
            raise RuntimeError(f"recipe {self.recipe.name} has no reconstruction section")
        if not self.is_calibrated:
            raise RuntimeError("reconstructing() learns the rounding on calibrated grids: calibrate first")
        refusal = too_few_images_per_step(spec, torch.distributed.get_world_size() if is_distributed() else 1)
        if refusal is not None:
            raise RuntimeError(refusal)
        if not self.block_sequence():
            raise RuntimeError(f"{type(self.model).__name__} has no block sequence to reconstruct")
        images: list[Tensor] = []
        handle = self.model.register_forward_pre_hook(lambda module, args: images.append(args[0].detach()))
        try:
            with self._mode(QuantMode.FP32):
                yield self
        finally:
            handle.remove()
        self._reconstruct(gather_batches(images), spec, progress)

    def _reconstruct(self, images: list[Tensor], spec, progress: bool) -> None:
        from tqdm import tqdm

        start = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            with self.fp32():
                x_fp = [self.first_block_input(x) for x in images]
            x_q = [self.first_block_input(x) for x in images]
        errors = {}
        blocks = self.block_sequence()
        bar = tqdm(total=len(blocks) * spec.iters, unit="step", disable=not progress, leave=False, smoothing=0.1)
        for k, (name, block) in enumerate(blocks, 1):
            bar.set_description(f"reconstruct block {k}/{len(blocks)}")
            with torch.no_grad(), self.fp32():
                targets = [block(x) for x in x_fp]
            with _frozen(block):
                errors[name] = reconstruct_block(block, x_fp, x_q, targets, spec, generator, on_step=bar.update)
            bar.update(k * spec.iters - bar.n)  # a block with nothing to learn takes no steps
            with torch.no_grad():
                x_q = [block(x) for x in x_q]  # the next block learns on what this one now gives
            x_fp = targets
        bar.close()
        gain = sum(e["before"] for e in errors.values()) / max(sum(e["after"] for e in errors.values()), 1e-30)
        log.info("block reconstruction: %d blocks on %d images in %.1f s, block output error %.2fx lower",
                 len(errors), sum(len(x) for x in images), time.perf_counter() - start, gain)

    def bias_layers(self) -> dict[str, QuantLinear | QuantConv2d]:
        """The layers the recipe's ``bias_correction`` corrects: every Linear and (ungrouped) convolution
        with a quantized input or weight."""
        if self.recipe.bias_correction is None:
            return {}
        return {
            name: m for name, m in self.model.named_modules()
            if isinstance(m, (QuantLinear, QuantConv2d)) and getattr(m, "groups", 1) == 1
            and any(q.spec is not None and q.enabled for q in (m.input_quant, m.weight_quant))
        }  # fmt: skip

    @contextlib.contextmanager
    def correcting_biases(self) -> Iterator["QVit"]:
        """After calibration (and scale search, GPTQ): run FP32 and sum every corrected layer's input; on
        a clean exit each layer's bias takes the mean output shift of its quantization."""
        if self.recipe.bias_correction is None:
            raise RuntimeError(f"recipe {self.recipe.name} has no bias_correction section")
        if not self.is_calibrated:
            raise RuntimeError("correcting_biases() needs the calibrated scales: calibrate first")
        layers = self.bias_layers()
        with self._mode(QuantMode.FP32), layer_inputs(layers) as means:
            yield self
        corrections = correct_biases(layers, means)
        log.info("bias correction: %d layers, mean |shift| %.3g", len(corrections),
                 sum(float(c.abs().mean()) for c in corrections.values()) / max(1, len(corrections)))

    @torch.no_grad()
    def finalize_calibration(self) -> list[str]:
        """Compute every quantizer's parameters from its observer; returns the points that saw no data."""
        return [name for name, q in self.quantizers().items() if not q.finalize()]

    @property
    def mode(self) -> QuantMode:
        return self.state.mode

    # -- introspection ---------------------------------------------------------------------------------
    def non_finite_flag(self, points: list[TensorQuantizer] | None = None) -> Tensor:
        """A 0-dim bool tensor on the model's device, True when some point's running minimum or maximum is
        NaN or infinite: a check of what the observers keep anyway, with no host synchronisation.
        ``points``: :meth:`quantizers`' values, when a per-batch caller has them already."""
        points = list(self.quantizers().values()) if points is None else points
        observers = [*points, *self._reparam_observers.values()]
        extremes = [t.reshape(-1) for q in observers for t in q.running_extremes()]
        if not extremes:
            return torch.zeros((), dtype=torch.bool)
        return ~torch.cat(extremes).isfinite().all()

    def first_non_finite_point(self) -> str | None:
        """The first point, in model order, whose running minimum or maximum is NaN or infinite (during
        the reparameterization pass: the LayerNorm or GELU output it observes, ``blocks.0.norm1.output``)."""
        for name, observer in self._reparam_observers.items():
            if any(not bool(t.isfinite().all()) for t in observer.running_extremes()):
                return f"{name}.output"
        for name, q in self.quantizers().items():
            if any(not bool(t.isfinite().all()) for t in q.running_extremes()):
                return point_name(name)
        return None

    def first_non_finite_weight(self) -> str | None:
        """The first quantized layer (in model order) whose weight holds NaN or infinite values."""
        for name, module in self.model.named_modules():
            q = getattr(module, "weight_quant", None)
            if isinstance(q, TensorQuantizer) and q.spec is not None and not bool(module.weight.isfinite().all()):
                return f"{name}.weight"
        return None

    def block_sequence(self) -> list[tuple[str, nn.Module]]:
        """The modules between the embedding and the final norm, in the order the model runs them, with
        their paths: a ViT's ``blocks.i``; a Swin's ``layers.s.downsample`` (PatchMerging) and
        ``layers.s.blocks.b``. Running them one after the other from the first one's input, then
        ``norm`` and ``forward_head``, is the model's forward (the profiler resumes there)."""
        m = self.model
        if isinstance(getattr(m, "blocks", None), nn.Sequential):
            return [(f"blocks.{i}", block) for i, block in enumerate(m.blocks)]
        sequence = []
        for s, stage in enumerate(getattr(m, "layers", [])):
            if not isinstance(stage.downsample, nn.Identity):
                sequence.append((f"layers.{s}.downsample", stage.downsample))
            sequence.extend((f"layers.{s}.blocks.{b}", block) for b, block in enumerate(stage.blocks))
        return sequence

    def first_block_input(self, images: Tensor) -> Tensor:
        """The input of the first module of :meth:`block_sequence` for ``images``, in the current mode: the
        model's own forward run up to there (embedding, tokens, position embedding) and stopped."""

        def stop(module, args):
            raise _ReachedFirstBlock(args[0])

        handle = self.block_sequence()[0][1].register_forward_pre_hook(stop)
        try:
            self.model(images)
        except _ReachedFirstBlock as reached:
            return reached.tensor
        finally:
            handle.remove()
        raise RuntimeError("the model never reached its first block")

    def quantizers(self, include_disabled: bool = True) -> dict[str, TensorQuantizer]:
        """Every quantization point with a spec, by module path (e.g. ``blocks.3.attn.softmax.output_quant``)."""
        return {
            name: m
            for name, m in self.model.named_modules()
            if isinstance(m, TensorQuantizer) and m.spec is not None and (include_disabled or m.enabled)
        }

    @property
    def is_calibrated(self) -> bool:
        return all(q.is_calibrated for q in self.quantizers().values())

    @property
    def simulates_integer(self) -> bool:
        """Whether this quantized model is the integer-only program (:mod:`models.integer`): a recipe it
        can run, every point on. Then a quantized forward runs in float64, where every level and product
        of the program's integers is exact, so the simulation rounds where the program rounds (float32's
        rounding, ~1e-4 of a step after a 768-term GEMM, flips enough codes for the two to drift apart
        over 12 blocks)."""
        return self._integer and all(q.enabled for q in self._points)

    def forward(self, x: Tensor) -> Tensor:
        if self.state.mode is QuantMode.QUANT and self.simulates_integer:
            return self.model(x.double()).to(x.dtype)
        return self.model(x)


def check_supported(model: nn.Module) -> None:
    """Refuse, naming the first such module, any structure whose forward QVit would not reproduce: not a
    timm classification model, a module with weights that has no quantized counterpart
    (models.ptq.registry) and is not one QVit keeps in float, a subclass of a registered class (it may
    compute something else), or a gated attention."""
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        raise UnsupportedModelError(f"QVit needs a timm image classification model (forward_features, forward_head), got {type(model).__name__}")
    for name, module in model.named_modules():
        kind = type(module)
        where = f"{name!r}" if name else "the model"
        base = next((cls for cls in QUANT_MODULES if isinstance(module, cls)), None)
        if base is not None and kind not in QUANT_MODULES:
            raise UnsupportedModelError(f"{where} is a {kind.__name__}, a subclass of timm's {base.__name__} that QVit cannot quantize")
        if kind is Attention and getattr(module, "gate", None) is not None:
            raise UnsupportedModelError(f"attention {where} is gated, which QVit cannot quantize")
        has_weights = next(module.parameters(recurse=False), None) is not None
        if has_weights and kind not in QUANT_MODULES and not isinstance(module, _FLOAT_OK):
            raise UnsupportedModelError(
                f"module {where} ({kind.__name__}) has weights but no quantized counterpart; "
                "QVit quantizes timm ViT/DeiT and Swin (v1) structures"
            )
