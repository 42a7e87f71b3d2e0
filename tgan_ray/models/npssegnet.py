"""NPsSegNet, the paper's segmenter (UNet++ with a ResNet34 encoder, step 7), its baselines, and safe checkpoints.

A checkpoint holds only tensors and plain values (str, int, float, bool, None, list, dict), so it loads without
unpickling any object: ``.safetensors`` files through safetensors, any other name through
``torch.load(weights_only=True)``. Serving loads checkpoints that may come from elsewhere, so this matters.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from tgan_ray.models.networks import unwrap_model
from tgan_ray.models.smp_builder import build_smp_model

__all__ = ["SEGMENTER_ARCHS", "create_segmenter", "load_segmenter", "predict_proba", "save_segmenter"]

# Our arch names -> smp model classes (smp.create_model takes the same lower-case names).
SEGMENTER_ARCHS: dict[str, type[nn.Module]] = {
    "unetplusplus": smp.UnetPlusPlus,
    "unet": smp.Unet,
    "deeplabv3plus": smp.DeepLabV3Plus,
}
_FORMAT = "tgan_ray.segmenter/1"
_SAFETENSORS_KEY = "tgan_ray_segmenter"


def create_segmenter(
    arch: str = "unetplusplus",
    encoder: str = "resnet34",
    encoder_weights: str | None = None,
    in_channels: int = 1,
    classes: int = 2,
    **kwargs,
) -> nn.Module:
    """Build NPsSegNet (``"unetplusplus"``) or a baseline (``"unet"``, ``"deeplabv3plus"``) with smp.

    Args:
        arch: Architecture name.
        encoder: smp encoder name (paper: ``"resnet34"``).
        encoder_weights: ``None`` (offline default), ``"imagenet"`` (if it can download) or a local .pth file.
        in_channels: Image channels (1 for EM).
        classes: Output classes (2: background, particle).
        **kwargs: Passed on to the smp model.

    Returns:
        The segmenter; it outputs logits.

    Shape:
        (N, in_channels, H, W) -> (N, classes, H, W), H and W multiples of 32.
    """
    if arch not in SEGMENTER_ARCHS:
        raise KeyError(f"unknown segmenter arch {arch!r}; choose one of: {', '.join(SEGMENTER_ARCHS)}")
    return build_smp_model(arch, encoder, encoder_weights, in_channels, classes, **kwargs)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Particle probability per pixel: softmax over classes, channel 1.

    Args:
        model: A segmenter (in eval mode for inference).
        x: Normalised images.

    Returns:
        Float32 probabilities in [0, 1].

    Shape:
        (N, C, H, W) -> (N, H, W).
    """
    return torch.softmax(model(x).float(), dim=1)[:, 1]


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON-like plain data, or a one-line TypeError naming ``where``."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)  # numpy ints too
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-str key {k!r}; checkpoint metadata keys must be str")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    raise TypeError(
        f"{where} is a {type(value).__name__}; checkpoint metadata holds only str/int/float/bool/None/list/dict"
    )


def _header(model: nn.Module, meta: dict[str, Any] | None) -> dict[str, Any]:
    arch = next((name for name, cls in SEGMENTER_ARCHS.items() if type(model) is cls), None)
    config = getattr(model, "_hub_mixin_config", None)  # smp records its constructor arguments here
    if arch is None or not isinstance(config, dict):
        raise ValueError(
            f"cannot save a {type(model).__name__}: build the segmenter with create_segmenter "
            f"({', '.join(SEGMENTER_ARCHS)})"
        )
    # Weights travel in the checkpoint itself: a reload must never download anything.
    model_kwargs = _plain({**config, "encoder_weights": None}, "model config")
    return {
        "format": _FORMAT,
        "arch": arch,
        "encoder": model_kwargs["encoder_name"],
        "in_channels": model_kwargs["in_channels"],
        "classes": model_kwargs["classes"],
        "model_kwargs": model_kwargs,
        "meta": _plain(meta or {}, "meta"),
    }


def save_segmenter(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write a segmenter checkpoint atomically (temporary name, then rename).

    The file holds ``{state_dict, arch, encoder, in_channels, classes, model_kwargs, meta}``: safetensors (the
    header in its metadata) when ``path`` ends in ``.safetensors``, otherwise a ``torch.save`` file that
    ``torch.load(weights_only=True)`` reads.

    Args:
        model: A model from :func:`create_segmenter`, possibly DDP- or compile-wrapped.
        path: Local file path; parent folders are created.
        meta: Plain metadata (thresholds, pixel size, training config, ...): str/int/float/bool/None/list/dict.

    Returns:
        The written path.
    """
    model = unwrap_model(model)
    header = _header(model, meta)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={_SAFETENSORS_KEY: json.dumps(header)})
        else:
            torch.save({"state_dict": state, **header}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format; safetensors files start with a length
    try:
        if is_zip:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            state = ckpt.pop("state_dict")
            return state, ckpt
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = json.loads((f.metadata() or {})[_SAFETENSORS_KEY])
            state = {k: f.get_tensor(k) for k in f.keys()}  # safe_open has no __iter__
        return state, header
    except Exception as exc:  # any parse failure becomes one line naming the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a tgan-ray segmenter checkpoint: {first[:200]}") from None


def load_segmenter(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Load a checkpoint written by :func:`save_segmenter`, without unpickling any object.

    Args:
        path: Local checkpoint file (``.safetensors`` or a ``torch.save`` file).
        map_location: Device the model is moved to.

    Returns:
        ``(model, meta)``: the segmenter in eval mode, and the ``meta`` dict saved with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter checkpoint not found: {path}")
    state, header = _read_checkpoint(path)
    if header.get("format") != _FORMAT or header.get("arch") not in SEGMENTER_ARCHS:
        raise ValueError(f"{path} is not a tgan-ray segmenter checkpoint (format {header.get('format')!r})")
    model = smp.create_model(header["arch"], **header["model_kwargs"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"{path}: weights do not fit its recorded model: {str(exc).splitlines()[0]}"
        ) from None
    return model.to(map_location).eval(), header.get("meta", {})
