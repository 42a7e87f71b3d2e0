"""Build segmentation-models-pytorch (smp) models with encoder weights that load offline-safely.

Both the GAN networks (``networks.py``) and the NPsSegNet segmenter (``npssegnet.py``) are smp models. This module
holds the one place that creates them: random init, an smp weights name (downloaded), or a local state dict of the
encoder (3-channel ImageNet or ``in_channels``-channel), with one-line errors that say how to fix a bad file or a
failed download.
"""

from __future__ import annotations

from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from torch import nn

__all__ = ["build_smp_model"]

_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def _read_encoder_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"encoder_weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            # weights_only: a weights file must never run code when it is read.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any read failure becomes one line naming the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"encoder_weights file {path} is not a readable state dict: {first}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"encoder_weights file {path} holds no state dict of tensors")
    # Accept an encoder saved alone or cut from a whole smp model / DDP checkpoint.
    for prefix in ("module.", "encoder."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def build_smp_model(
    arch: str,
    encoder: str,
    encoder_weights: str | None,
    in_channels: int,
    classes: int,
    **kwargs,
) -> nn.Module:
    """Build an smp model, loading encoder weights offline-safely.

    Args:
        arch: smp architecture name (``"unetplusplus"``, ``"unet"``, ``"deeplabv3plus"``, ...).
        encoder: smp encoder name (``"resnet34"``).
        encoder_weights: ``None`` (random init, no network access), an smp weights name such as ``"imagenet"``
            (downloaded; fails with a one-line error when offline), or a path to a local state dict
            (``.pth``/``.pt``/``.safetensors``) of the encoder, 3-channel (ImageNet) or ``in_channels``-channel.
        in_channels: Input channels (1 for EM images).
        classes: Output channels.
        **kwargs: Passed on to the smp model (``decoder_channels``, ``activation``, ...).

    Returns:
        The smp model.
    """
    is_path = encoder_weights is not None and (
        str(encoder_weights).endswith(_WEIGHT_SUFFIXES) or Path(str(encoder_weights)).is_file()
    )
    if encoder_weights is None or is_path:
        state = _read_encoder_state_dict(Path(str(encoder_weights))) if is_path else None
        # The first 4-D tensor is the stem convolution: its input width tells an ImageNet (3-channel) file apart.
        file_in = (
            next((v.shape[1] for v in state.values() if v.ndim == 4), in_channels) if state else in_channels
        )
        if file_in not in (in_channels, 3):
            raise ValueError(
                f"encoder_weights file {encoder_weights} has a {file_in}-channel stem; need {in_channels} or 3"
            )
        model = smp.create_model(
            arch, encoder_name=encoder, encoder_weights=None, in_channels=file_in, classes=classes, **kwargs
        )
        if state is not None:
            try:
                model.encoder.load_state_dict(state)
            except RuntimeError as exc:
                first = str(exc).strip().splitlines()[0]
                raise ValueError(
                    f"encoder_weights file {encoder_weights} does not fit encoder {encoder!r}: {first}"
                ) from None
        if file_in != in_channels:
            # smp's own way to adapt a pretrained RGB stem to other channel counts (it reuses the weights).
            model.encoder.set_in_channels(in_channels, pretrained=True)
            if isinstance(getattr(model, "_hub_mixin_config", None), dict):
                model._hub_mixin_config["in_channels"] = in_channels  # keeps save/load rebuilds right
        return model
    try:
        return smp.create_model(
            arch,
            encoder_name=encoder,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=classes,
            **kwargs,
        )
    except Exception as exc:  # download errors come in many types (OSError, HTTP, hub errors)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"could not load encoder_weights={encoder_weights!r} for encoder {encoder!r} "
            f"({type(exc).__name__}: {first[:200]}); offline? pass a local .pth state dict path instead"
        ) from None
