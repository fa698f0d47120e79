"""Typed, validated quantization recipes (FQ-ViT, arXiv 2111.13824, Sec. 4.1 "Implementation details").

A recipe says, for each *kind* of tensor in a Vision Transformer, how it is quantized:

``weight``           every Conv2d / Linear weight;
``activation``       every input of a Conv2d / Linear / attention matmul (and the softmax input scores
                     when the integer softmax is used);
``layernorm_input``  the residual stream where it enters a LayerNorm (FQ-ViT's power-of-two-factor
                     target, Sec. 3.2);
``attention``        the softmax output, i.e. the attention map (log2 for log-int-softmax, Sec. 3.3).

A kind set to ``null`` stays in floating point. ``reparam`` (optional) reparameterizes the LayerNorm
outputs (and, with ``mlp_alpha``, each MLP's GELU output) channel by channel before calibration
(:mod:`models.ptq.reparam`); ``scale_search`` (optional)
refines the activation scales after it by the error of the layers' outputs (:mod:`models.ptq.scale_search`);
``gptq`` (optional) rounds every Linear and patch-embedding weight onto its grid by GPTQ (:mod:`models.ptq.gptq`);
``integer_softmax`` / ``integer_gelu`` compute the softmax / GELU with the integer-only program's
arithmetic (:mod:`models.integer`), so that the fake-quant model simulates it;
``reconstruction`` (optional) learns each weight's rounding block by block from the block's output
error (:mod:`models.ptq.reconstruction`, BRECQ / QDrop);
``bias_correction`` (optional) moves the mean output shift of every quantized Linear into its bias
(:mod:`models.ptq.bias_correction`);
``layers`` (optional) makes per-point exceptions to the kinds - a different observer, quantizer or bit
width for the points whose path matches a glob, e.g. 8-bit for the most Fisher-sensitive points of a
4-bit recipe (mixed precision, ``result_analyze.py --mixed-recipe``). Recipes live as YAML files in ``configs/`` and are
loaded with :func:`load_recipe`; every value is checked and a bad one raises :class:`ConfigError`
with a one-line message naming the file and the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

__all__ = [
    "BitTypeConfig",
    "ConfigError",
    "KINDS",
    "QuantRecipe",
    "QuantizerSpec",
    "ReparamSpec",
    "ScaleSearchSpec",
    "GPTQSpec",
    "BiasCorrectionSpec",
    "ReconstructionSpec",
    "DEFAULT_RECIPE",
    "CONFIG_DIR",
    "available_recipes",
    "load_recipe",
    "resolve_recipe_path",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_RECIPE = "fqvit_w8a8_att8"
KINDS = ("weight", "activation", "layernorm_input", "attention")
CALIBRATION_MODES = ("layer_wise", "channel_wise")
SEARCH_METRICS = ("fisher", "output")
# The names models.ptq's registries resolve (tests/test_config.py checks that they hold exactly these):
# listed here so that this module imports nothing of the library.
OBSERVER_NAMES = ("kl", "minmax", "omse", "percentile")
QUANTIZER_NAMES = ("log2", "log_sqrt2", "twin_uniform", "uniform")


class ConfigError(ValueError):
    """A recipe value is invalid; the message is one line meant for the user."""


def _check_bool(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")


def _check_int(where: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{where} must be an integer from {lo} to {hi}, got {value!r}")


def _check_number(where: str, value: Any, inside: Callable[[float], bool], interval: str) -> None:
    """``value`` is a real number (bool excluded) for which ``inside`` holds; ``interval`` says which, in words."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not inside(value):
        raise ConfigError(f"{where} must be {interval}, got {value!r}")


def _check_name(where: str, what: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{where}: unknown {what} {value!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class BitTypeConfig:
    """An integer grid: ``symmetric`` grids are signed with zero point 0, the others unsigned with a zero point."""

    bits: int = 8
    symmetric: bool = True
    name: str = "int8"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @staticmethod
    def default_name(bits: int, symmetric: bool) -> str:
        return f"{'int' if symmetric else 'uint'}{bits}"

    def validate(self, where: str) -> None:
        _check_int(f"{where}.bits", self.bits, 2, 16)
        _check_bool(f"{where}.symmetric", self.symmetric)
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{where}.name must be a non-empty string, got {self.name!r}")


@dataclass(frozen=True)
class QuantizerSpec:
    """How one kind of tensor is quantized: grid, range estimator, granularity and quantizer."""

    bit_type: BitTypeConfig = field(default_factory=BitTypeConfig)
    observer: str = "minmax"
    calibration_mode: str = "layer_wise"
    quantizer: str = "uniform"
    # Percentile observer: fraction of |x| (symmetric) or of each tail (asymmetric) kept inside the range.
    percentile: float = 0.9999
    # Streaming histogram of the percentile / KL / OMSE observers (TensorRT's entropy calibrator uses 2048).
    hist_bins: int = 2048
    # FQ-ViT power-of-two factor: per-channel scales s * 2^(k - levels + 1), k in [0, levels).
    power_of_two_factor: bool = False
    ptf_levels: int = 4
    # PTF on an asymmetric grid: one zero point per channel, placed at the channel's own range, rather
    # than FQ-ViT's shared one (a fine-scaled channel then covers its own values, not the whole tensor's
    # centre); the integer LayerNorm subtracts it per channel before the shift.
    ptf_channel_zero_points: bool = False
    # The residual stream: each token's codes rescaled at run time by its own factor f <= 1, so that its
    # largest value fills the calibrated grid (models/ptq/token_scale.py); the LayerNorm ignores f.
    dynamic_token_scale: bool = False
    # With dynamic_token_scale: one factor per token and per this many consecutive channels (0: one per
    # token). The LayerNorm then no longer cancels the factors; it multiplies each group's codes by them.
    token_scale_group: int = 0

    def validate(self, where: str, kind: str) -> None:
        self.validate_values(where)
        self.validate_combination(where, kind)

    def validate_values(self, where: str) -> None:
        """Each field on its own: names that exist, numbers in range."""
        self.bit_type.validate(f"{where}.bit_type")
        _check_name(f"{where}.observer", "observer", self.observer, OBSERVER_NAMES)
        _check_name(f"{where}.quantizer", "quantizer", self.quantizer, QUANTIZER_NAMES)
        _check_name(f"{where}.calibration_mode", "mode", self.calibration_mode, CALIBRATION_MODES)
        _check_number(f"{where}.percentile", self.percentile, lambda v: 0.5 < v <= 1.0, "in (0.5, 1]")
        _check_int(f"{where}.hist_bins", self.hist_bins, 256, 65536)
        _check_int(f"{where}.ptf_levels", self.ptf_levels, 1, 8)
        _check_bool(f"{where}.power_of_two_factor", self.power_of_two_factor)
        _check_bool(f"{where}.ptf_channel_zero_points", self.ptf_channel_zero_points)
        _check_bool(f"{where}.dynamic_token_scale", self.dynamic_token_scale)
        _check_int(f"{where}.token_scale_group", self.token_scale_group, 0, 65536)

    def validate_combination(self, where: str, kind: str) -> None:
        """The fields together, for a tensor of ``kind``."""
        # Granularities that have no meaning for the tensor kind are refused rather than silently ignored.
        if kind == "attention" and self.calibration_mode == "channel_wise":
            raise ConfigError(
                f"{where}.calibration_mode: channel_wise is meaningless for the attention map (its last axis is tokens); use layer_wise"
            )
        if self.quantizer in ("log2", "log_sqrt2") and self.calibration_mode == "channel_wise":
            raise ConfigError(f"{where}: the {self.quantizer} quantizer has one scale per tensor; use calibration_mode: layer_wise")
        if kind == "weight" and self.quantizer != "uniform":
            raise ConfigError(f"{where}.quantizer must be uniform")
        # twin_uniform's signed form splits GELU outputs by sign; its unsigned form is PTQ4ViT's post-softmax
        # grid. Each is refused on the other's tensor: unsigned would clamp GELU's negative values to 0.
        if self.quantizer == "twin_uniform":
            if kind == "attention" and self.bit_type.symmetric:
                raise ConfigError(f"{where}: on the non-negative attention map twin_uniform is the unsigned post-softmax grid; set bit_type.symmetric: false")
            if kind != "attention" and not self.bit_type.symmetric:
                raise ConfigError(
                    f"{where}: the twin_uniform quantizer uses signed codes (the sign picks the region); set bit_type.symmetric: true "
                    "(the unsigned form is for the attention map only)"
                )
        if self.power_of_two_factor:
            if kind != "layernorm_input":
                raise ConfigError(f"{where}.power_of_two_factor applies only to layernorm_input (FQ-ViT PTF), not to {kind}")
            if self.calibration_mode != "channel_wise":
                raise ConfigError(f"{where}.power_of_two_factor needs calibration_mode: channel_wise (one factor per channel)")
            if self.quantizer != "uniform":
                raise ConfigError(f"{where}.power_of_two_factor needs quantizer: uniform")
        if self.ptf_channel_zero_points and not (self.power_of_two_factor and not self.bit_type.symmetric):
            raise ConfigError(f"{where}.ptf_channel_zero_points needs power_of_two_factor: true on an asymmetric grid (bit_type.symmetric: false)")
        if self.dynamic_token_scale:
            # Only before a LayerNorm is the factor free: the normalization cancels it.
            if kind != "layernorm_input":
                raise ConfigError(f"{where}.dynamic_token_scale applies only to layernorm_input (the residual stream), not to {kind}")
            if self.quantizer != "uniform":
                raise ConfigError(f"{where}.dynamic_token_scale needs quantizer: uniform")
        if self.token_scale_group and not self.dynamic_token_scale:
            raise ConfigError(f"{where}.token_scale_group needs dynamic_token_scale: true")


@dataclass(frozen=True)
class ReparamSpec:
    """Channel-wise reparameterization of each LayerNorm output into its Linear (models/ptq/reparam.py).

    ``alpha`` is the migration strength: each channel is divided by ``a^alpha / w^(1 - alpha)`` (a: its
    calibrated half-range, w: the largest weight that reads it), so 1 equalizes the activation channels
    (RepQ-ViT) and 0.5 balances activations and weights (SmoothQuant). ``shift`` centres every channel
    on its calibrated range first. ``mlp_alpha`` (null: off) migrates each MLP's GELU output into its
    fc2 the same way, at its own strength and without a shift: the division stays in the graph after
    the GELU, the factors go into fc2's input columns. ``value_alpha`` (null: off) migrates each
    attention's output channels (proj's input) into v's rows of qkv, all in the weights.
    """

    alpha: float = 0.5
    shift: bool = True
    mlp_alpha: float | None = None
    value_alpha: float | None = None

    def validate(self, where: str) -> None:
        _check_number(f"{where}.alpha", self.alpha, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1")
        _check_bool(f"{where}.shift", self.shift)
        for key in ("mlp_alpha", "value_alpha"):
            if getattr(self, key) is not None:
                _check_number(f"{where}.{key}", getattr(self, key), lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1 (or null: off)")


@dataclass(frozen=True)
class ScaleSearchSpec:
    """Scale search after calibration (models/ptq/scale_search.py).

    Each activation / attention-map / LayerNorm-input scale ``s`` is replaced by the ``r * s`` among
    ``candidates`` ratios ``r`` evenly spaced in ``[min_ratio, 1]`` that minimises ``metric``, summed
    over the first ``images`` calibration images, on at most ``rows`` rows (tokens) of each batch:
    ``output`` - the squared error of the output of the operation reading the tensor (its Linear, or
    the attention matmul); ``fisher`` - the squared quantization error weighted by the squared
    gradient of the loss at the tensor (diagonal Fisher; the FP32 model's own prediction as label).
    """

    metric: str = "fisher"
    candidates: int = 24
    min_ratio: float = 0.3
    images: int = 256
    rows: int = 2048

    def validate(self, where: str) -> None:
        _check_name(f"{where}.metric", "metric", self.metric, SEARCH_METRICS)
        for key, lo, hi in (("candidates", 2, 256), ("images", 1, 10**7), ("rows", 16, 10**7)):
            _check_int(f"{where}.{key}", getattr(self, key), lo, hi)
        _check_number(f"{where}.min_ratio", self.min_ratio, lambda v: 0.0 < v < 1.0, "a number between 0 and 1 (exclusive)")


@dataclass(frozen=True)
class GPTQSpec:
    """GPTQ rounding of every Linear and patch-embedding weight onto its calibrated grid (models/ptq/gptq.py).

    ``damp``: fraction of the mean of diag(H) added to H's diagonal; ``act_order``: quantize the
    columns with the largest inputs first; ``block``: columns per lazy batch update; ``rows``: at most
    this many input rows (tokens) of each calibration batch go into H.
    """

    damp: float = 0.01
    act_order: bool = True
    block: int = 128
    rows: int = 2048

    def validate(self, where: str) -> None:
        _check_number(f"{where}.damp", self.damp, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
        _check_bool(f"{where}.act_order", self.act_order)
        for key, lo, hi in (("block", 1, 65536), ("rows", 16, 10**7)):
            _check_int(f"{where}.{key}", getattr(self, key), lo, hi)


@dataclass(frozen=True)
class BiasCorrectionSpec:
    """Bias correction after calibration (models/ptq/bias_correction.py): each quantized Linear's and
    convolution's bias absorbs the mean shift its quantization puts on its output, measured on the
    first ``images`` calibration images."""

    images: int = 512

    def validate(self, where: str) -> None:
        _check_int(f"{where}.images", self.images, 1, 10**7)


@dataclass(frozen=True)
class ReconstructionSpec:
    """Block reconstruction after calibration (models/ptq/reconstruction.py): every quantized weight of a
    block learns to round up or down (AdaRound's rectified sigmoid) so that the block's output on the
    first ``images`` calibration images matches the FP32 block's; ``iters`` Adam steps of ``lr`` on
    ``batch`` images each, rounding regularizer ``reg``; the block's input is the quantized model's or,
    with probability ``drop`` per element, the FP32 one (QDrop). ``scale_lr`` > 0 also learns the step
    of every per-tensor uniform activation grid in the block (LSQ), with Adam at that rate."""

    images: int = 256
    iters: int = 500
    batch: int = 32
    lr: float = 1e-3
    reg: float = 0.01
    drop: float = 0.5
    scale_lr: float = 0.0

    def validate(self, where: str) -> None:
        for key, lo, hi in (("images", 1, 10**6), ("iters", 1, 10**6), ("batch", 1, 4096)):
            _check_int(f"{where}.{key}", getattr(self, key), lo, hi)
        _check_number(f"{where}.lr", self.lr, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]")
        _check_number(f"{where}.reg", self.reg, lambda v: v >= 0.0, "a number >= 0")
        _check_number(f"{where}.drop", self.drop, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1")
        _check_number(f"{where}.scale_lr", self.scale_lr, lambda v: 0.0 <= v <= 1.0, "a number from 0 to 1")


@dataclass(frozen=True)
class QuantRecipe:
    """A whole quantization recipe; each layer is handed only the spec of its own tensor kind."""

    name: str
    description: str = ""
    weight: QuantizerSpec | None = None
    activation: QuantizerSpec | None = None
    layernorm_input: QuantizerSpec | None = None
    attention: QuantizerSpec | None = None
    # Softmax from integer-only arithmetic on the quantized scores (I-BERT i-exp, used by FQ-ViT's LIS).
    integer_softmax: bool = False
    # GELU as the integer program computes it: a table on fc1's output rounded onto a 12-bit index grid
    # (models/integer/gelu.py), so that the fake-quant model simulates the integer-only program.
    integer_gelu: bool = False
    reparam: ReparamSpec | None = None
    scale_search: ScaleSearchSpec | None = None
    gptq: GPTQSpec | None = None
    bias_correction: BiasCorrectionSpec | None = None
    reconstruction: ReconstructionSpec | None = None
    # Per-point exceptions, in order: a glob over quantizer paths (``blocks.*.mlp.fc2.input_quant``) ->
    # spec fields replacing those of the point's kind (``{bit_type: {bits: 8}}``), or null for float.
    # Checked against the model when QVit applies them (every pattern must match a point).
    layers: dict[str, Any] | None = None

    def validate(self, where: str = "recipe") -> "QuantRecipe":
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"{where}: 'name' must be a non-empty string")
        _check_bool(f"{where}.integer_softmax", self.integer_softmax)
        _check_bool(f"{where}.integer_gelu", self.integer_gelu)
        for kind in KINDS:
            spec = getattr(self, kind)
            if spec is not None:
                spec.validate(f"{where}.{kind}", kind)
        if self.integer_softmax and self.activation is None:
            raise ConfigError(f"{where}: integer_softmax needs the activation kind quantized (it runs on the integer scores)")
        if self.reparam is not None:
            self.reparam.validate(f"{where}.reparam")
            if self.activation is None:
                raise ConfigError(f"{where}: reparam needs the activation kind quantized (it reshapes the Linear inputs for it)")
        if self.scale_search is not None:
            self.scale_search.validate(f"{where}.scale_search")
            if self.activation is None and self.attention is None:
                raise ConfigError(f"{where}: scale_search needs the activation or attention kind quantized")
        if self.gptq is not None:
            self.gptq.validate(f"{where}.gptq")
            if self.weight is None:
                raise ConfigError(f"{where}: gptq rounds the quantized weights; the weight kind is null")
        if self.reconstruction is not None:
            self.reconstruction.validate(f"{where}.reconstruction")
            if self.weight is None:
                raise ConfigError(f"{where}: reconstruction learns the quantized weights' rounding; the weight kind is null")
        if self.bias_correction is not None:
            self.bias_correction.validate(f"{where}.bias_correction")
            if self.weight is None and self.activation is None:
                raise ConfigError(f"{where}: bias_correction corrects quantized Linears; the weight and activation kinds are null")
        if self.layers is not None:
            if not isinstance(self.layers, Mapping) or not self.layers:
                raise ConfigError(f"{where}.layers must be a non-empty mapping of quantizer-path patterns to spec fields or null")
            for pattern, fields_ in self.layers.items():
                if not isinstance(pattern, str) or not pattern:
                    raise ConfigError(f"{where}.layers: a pattern must be a non-empty string, got {pattern!r}")
                # Keys and single values are checked here; how they combine with the kind they land on
                # (PTF only on LayerNorm inputs, ...) when the patterns meet the model's points.
                _merge_spec(QuantizerSpec(), fields_, f"{where}.layers[{pattern!r}]").validate_values(f"{where}.layers[{pattern!r}]")
        return self

    def integer_refusal(self) -> str | None:
        """Why the integer-only program (models/integer) cannot run this recipe, in one line; None if it can.
        Point-level exceptions (``layers``) are checked when the program is built from a calibrated model."""
        for kind in KINDS:
            if getattr(self, kind) is None:
                return f"recipe {self.name} keeps the {kind} kind in float; the integer program quantizes every point"
        if not self.integer_softmax:
            return f"recipe {self.name} computes the softmax in float (integer_softmax: false); set it true and calibrate again"
        if not self.integer_gelu:
            return f"recipe {self.name} computes GELU in float (integer_gelu: false); set it true and calibrate again"
        if self.activation.calibration_mode == "channel_wise":
            return f"recipe {self.name}: per-channel activation scales have no integer GEMM (activation.calibration_mode: channel_wise)"
        if self.layernorm_input.dynamic_token_scale:
            return f"recipe {self.name}: the residual stream's per-token scale (layernorm_input.dynamic_token_scale) is not in the integer program yet"
        for kind in ("activation", "attention"):
            quantizer = getattr(self, kind).quantizer
            if quantizer not in ("uniform", "log2"):
                return f"recipe {self.name}: the {quantizer} grid of the {kind} kind has no integer form in the program yet"
        return None

    def layer_spec(self, kind: str, fields_: Mapping[str, Any] | None, where: str) -> QuantizerSpec | None:
        """The spec of a point of ``kind`` with the ``layers`` entry ``fields_`` applied (null: float)."""
        if fields_ is None:
            return None
        base = getattr(self, kind) or QuantizerSpec()
        spec = _merge_spec(base, fields_, where)
        spec.validate(where, kind)
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: Mapping[str, Any], where: str = "override") -> "QuantRecipe":
        """Return a validated copy with dotted keys replaced, e.g. ``{"activation.observer": "kl"}``."""
        data = self.to_dict()
        for key, value in overrides.items():
            parts = key.split(".")
            node = data
            for i, part in enumerate(parts[:-1]):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"{where}: unknown key {key!r}")
                if node[part] is None:
                    raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is null (kept in float) in recipe {self.name!r}; set it as a whole")
                node = node[part]
            if not isinstance(node, dict) or parts[-1] not in node:
                raise ConfigError(f"{where}: unknown key {key!r}")
            node[parts[-1]] = value
            # A grid name derived from bits/symmetric must follow them unless it was set explicitly too.
            if parts[-2:-1] == ["bit_type"] and parts[-1] in ("bits", "symmetric"):
                if ".".join(parts[:-1] + ["name"]) not in overrides:
                    node.pop("name", None)
        return recipe_from_dict(data, where=where)


def _build_dataclass(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(valid))}")
    return cls(**data)


def _spec_from_dict(data: Any, where: str) -> QuantizerSpec | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping or null, got {type(data).__name__}")
    data = dict(data)
    bit_data = data.pop("bit_type", None) or {}
    if not isinstance(bit_data, Mapping):
        raise ConfigError(f"{where}.bit_type must be a mapping, got {type(bit_data).__name__}")
    bit_data = dict(bit_data)
    bits, symmetric = bit_data.get("bits", 8), bit_data.get("symmetric", True)
    bit_data.setdefault("name", BitTypeConfig.default_name(bits, symmetric))
    bit_type = _build_dataclass(BitTypeConfig, bit_data, f"{where}.bit_type")
    spec = _build_dataclass(QuantizerSpec, data, where)
    return dataclasses.replace(spec, bit_type=bit_type)


def _merge_spec(base: QuantizerSpec, fields_: Any, where: str) -> QuantizerSpec:
    """``base`` with the given spec fields replaced (``bit_type`` merged key by key; its name re-derived)."""
    if fields_ is None:
        return base
    if not isinstance(fields_, Mapping):
        raise ConfigError(f"{where} must be a mapping of spec fields or null, got {type(fields_).__name__}")
    data = dataclasses.asdict(base)
    for key, value in fields_.items():
        if key == "bit_type":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.bit_type must be a mapping, got {type(value).__name__}")
            if "name" not in value:
                data["bit_type"].pop("name")
            data["bit_type"].update(value)
        else:
            data[key] = value
    spec = _spec_from_dict(data, where)
    assert spec is not None
    return spec


def recipe_from_dict(data: Any, where: str = "recipe") -> QuantRecipe:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a recipe must be a mapping, got {type(data).__name__}")
    data = dict(data)
    kinds = {kind: _spec_from_dict(data.pop(kind, None), f"{where}.{kind}") for kind in KINDS}
    sections = {}
    for key, cls in (("reparam", ReparamSpec), ("scale_search", ScaleSearchSpec), ("gptq", GPTQSpec), ("bias_correction", BiasCorrectionSpec),
                       ("reconstruction", ReconstructionSpec)):
        value = data.pop(key, None)
        sections[key] = None if value is None else _build_dataclass(cls, value, f"{where}.{key}")
    recipe = _build_dataclass(QuantRecipe, data, where)
    return dataclasses.replace(recipe, **sections, **kinds).validate(where)


def available_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str | Path) -> Path:
    """Accept a path to a YAML file or the bare name of a shipped recipe (``fqvit_w8a8_att4``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and path.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    raise ConfigError(f"config {str(name_or_path)!r} not found; shipped recipes: {', '.join(available_recipes())}")


def load_recipe(name_or_path: str | Path = DEFAULT_RECIPE, overrides: Mapping[str, Any] | None = None) -> QuantRecipe:
    """Load and validate a recipe file, then apply dotted-key ``overrides``."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read YAML ({str(exc).splitlines()[0]})") from None
    recipe = recipe_from_dict(data, where=str(path))
    return recipe.with_overrides(overrides, where=f"{path} + overrides") if overrides else recipe
