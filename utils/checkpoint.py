"""Creating timm ViTs, loading local checkpoints, and saving / loading calibrated quantizer states.

Every failure a user can cause (unknown model, unreadable or mismatching checkpoint, no network for
pretrained weights, a calibrated file made for other weights) raises :class:`UserError` with one line.
"""
from __future__ import annotations

import difflib
import hashlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from models.quant_vit import QVit
from quant_config import ConfigError, QuantRecipe, recipe_from_dict
from utils.errors import UserError
from utils.run_dir import atomic_path

__all__ = [
    "supported_models",
    "check_model_name",
    "check_model_structure",
    "create_model",
    "load_checkpoint",
    "file_sha256",
    "weights_sha256",
    "save_calibrated",
    "load_calibrated",
    "read_calibrated",
    "restore_calibrated",
    "CALIBRATED_FORMAT",
]

CALIBRATED_FORMAT = "qvit-calibrated/1"


DEFAULT_MODEL_PATTERNS = ("vit_*", "deit*", "swin_*")


def supported_models(patterns: tuple[str, ...] | list[str] = DEFAULT_MODEL_PATTERNS) -> list[str]:
    """The timm model names matching ``patterns`` (globs) that QVit accepts by structure, each checked
    on the meta device (no weights allocated or downloaded)."""
    import timm

    accepted = []
    for name in timm.list_models(list(patterns)):
        try:
            check_model_structure(name)
        except UserError:
            continue
        accepted.append(name)
    return accepted


def check_model_name(name: str) -> None:
    """``name`` is a timm model (a close match is suggested otherwise) whose structure QVit can quantize."""
    import timm

    names = timm.list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; expected a timm model such as vit_base_patch16_224 or swin_tiny_patch4_window7_224"
        raise UserError(f"unknown model {name!r}{hint}")
    check_model_structure(name)


def check_model_structure(name: str) -> None:
    """Refuse, naming the first module QVit cannot quantize, the timm model ``name``: built on the meta
    device, so nothing is allocated or downloaded."""
    import timm

    from models.quant_vit import UnsupportedModelError, check_supported

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    try:
        check_supported(model)
    except UnsupportedModelError as exc:
        raise UserError(f"{name}: {exc}") from None


def unreachable_weights(name: str, timeout: float = 3.0) -> str | None:
    """Why timm cannot fetch ``name``'s pretrained weights (not cached, and their host does not answer a TCP
    connection within ``timeout`` seconds), or None. Offline, huggingface_hub retries for about a minute
    with a warning per try; this tells in seconds. Behind a proxy (``HTTPS_PROXY``) it does not guess."""
    import os
    import socket
    from urllib.parse import urlparse

    from timm.models import get_pretrained_cfg

    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None  # timm says what is wrong with the name
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
            return None
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    elif cfg.url:
        if (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name).is_file():
            return None
        host = urlparse(cfg.url).hostname
    else:
        return None
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as exc:
        return f"{host} unreachable: {exc.strerror or exc}"
    return None


def create_model(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """A timm model in eval mode; ``pretrained`` downloads timm's weights (or fails in seconds offline)."""
    import timm

    if pretrained:
        reason = unreachable_weights(name)
        if reason is not None:
            raise UserError(f"cannot load pretrained weights for {name} ({reason}); pass --checkpoint PATH to use local weights")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:  # timm/hub raise many types when offline or when a name has no weights
        if pretrained:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot load pretrained weights for {name} ({reason}); pass --checkpoint PATH to use local weights") from None
        raise
    return model.eval()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """Fingerprint of a model's float weights (quantizer state excluded), independent of the file they came from."""
    from models.ptq.tensor_quantizer import TensorQuantizer

    quantizer_prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, TensorQuantizer))
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if (quantizer_prefixes and key.startswith(quantizer_prefixes)) or key.endswith(".bias_correction"):
            continue  # calibrated state, not weights
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state dict of tensors (plain, or under a 'model'/'state_dict' key)")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load`` of tensors only, with a one-line error naming ``what`` the file should be."""
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{what} {path}: cannot read it as a PyTorch file ({str(exc).splitlines()[0][:200]})") from None


def load_checkpoint(model: nn.Module, path: str | Path, model_name: str) -> str:
    """Load a local state dict into ``model``, naming any key or shape mismatch; returns the file's sha256."""
    path = Path(path)
    state = _unwrap_state_dict(_torch_load(path, "checkpoint"), path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} (checkpoint {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:3])}")
        raise UserError(f"checkpoint {path} does not fit {model_name}: {' | '.join(parts)}")
    model.load_state_dict(state)
    return file_sha256(path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_calibrated(qvit: QVit, path: str | Path, model_name: str, weights_fingerprint: str, checkpoint_sha256: str | None) -> None:
    """Write the calibrated quantizer state (scales, zero points) with what it was calibrated for."""
    keys = _quantizer_keys(qvit)
    quantizer_state = {k: v.detach().cpu() for k, v in qvit.state_dict().items() if k in keys}
    record = {
        "format": CALIBRATED_FORMAT,
        "model": model_name,
        "recipe": qvit.recipe.to_dict(),
        "weights_sha256": weights_fingerprint,
        "checkpoint_sha256": checkpoint_sha256,
        "quantizers": quantizer_state,
        # LayerNorm->Linear factors folded into the weights (recipe reparam); replayed on the original weights.
        "reparam": {name: {"shift": shift, "scale": scale} for name, (shift, scale) in qvit.reparam_factors.items()},
    }
    _atomic_torch_save(record, Path(path))


def _quantizer_keys(qvit: QVit) -> set[str]:
    """The ``state_dict`` keys of the calibrated state: the quantizer buffers (scale, zero point,
    calibrated flag; a weight's GPTQ rounding where set) and the layers' bias corrections where set."""
    keys = {f"model.{name}.{buffer}" for name, q in qvit.quantizers().items() for buffer, _ in q.named_buffers()}
    return keys | {f"model.{name}.bias_correction" for name, m in qvit.bias_layers().items() if m.bias_correction is not None}


def read_calibrated(path: str | Path) -> tuple[dict[str, Any], QuantRecipe]:
    """Read a calibrated file and its recipe, checking its format."""
    path = Path(path)
    record = _torch_load(path, "calibrated file")
    if not isinstance(record, Mapping) or record.get("format") != CALIBRATED_FORMAT:
        raise UserError(f"calibrated file {path}: not written by test_qvit.py --save-calibrated (format {CALIBRATED_FORMAT})")
    try:
        recipe = recipe_from_dict(record["recipe"], where=f"{path} recipe")
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    return dict(record), recipe


def load_calibrated(qvit: QVit, record: Mapping[str, Any], path: str | Path, weights_fingerprint: str) -> None:
    """Restore the quantizer state of ``record`` into ``qvit`` (built with the record's model and recipe)."""
    if record["weights_sha256"] != weights_fingerprint:
        raise UserError(
            f"calibrated file {path} was calibrated on other weights of {record['model']}; "
            "pass the same --checkpoint (or pretrained weights) it was made with"
        )
    reparam = record.get("reparam") or {}
    if bool(reparam) != (qvit.recipe.reparam is not None):
        raise UserError(f"calibrated file {path}: its reparameterization factors do not match its recipe")
    if reparam:
        try:
            qvit.apply_reparam({name: (f["shift"], f["scale"]) for name, f in reparam.items()})
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"calibrated file {path}: cannot replay its reparameterization ({exc})") from None
    state = record["quantizers"]
    gptq_keys = {f"model.{name}.weight_quant.rounded" for name in qvit.gptq_layers()}  # GPTQ's rounded weights
    bias_keys = {f"model.{name}.bias_correction" for name in qvit.bias_layers()}  # the recipe's bias corrections
    required = _quantizer_keys(qvit) | gptq_keys | bias_keys
    # Block reconstruction keeps its learned rounding only where it beat round-to-nearest: any weight's.
    learned = {f"model.{name}.rounded" for name, q in qvit.quantizers().items() if q.is_weight} if qvit.recipe.reconstruction else set()
    if not required <= set(state) <= required | learned:
        raise UserError(f"calibrated file {path} does not match the quantizers of {record['model']} under its recipe")
    qvit.load_state_dict(state, strict=False)
    if not qvit.is_calibrated:
        raise UserError(f"calibrated file {path} holds uncalibrated quantizers")


def restore_calibrated(path: str | Path, model_name: str | None, checkpoint: str | Path | None) -> QVit:
    """The calibrated QVit of ``path``: ``model_name`` (None: the file's) built with ``checkpoint``
    (timm's pretrained weights without), converted with the file's recipe, its quantizer state loaded;
    in eval mode, on the CPU."""
    path = Path(path)
    record, recipe = read_calibrated(path)
    model_name = model_name or record["model"]
    check_model_name(model_name)
    if record["model"] != model_name:
        raise UserError(f"--calibrated {path} was made for {record['model']}, not {model_name}")
    model = create_model(model_name, pretrained=not checkpoint)
    if checkpoint:
        load_checkpoint(model, checkpoint, model_name)
    qvit = QVit(model, recipe).eval()
    load_calibrated(qvit, record, path, weights_sha256(model))
    return qvit
