"""Models, pure PyTorch (no Ray): the two GANs, their networks and losses, and the NPsSegNet segmenter.

model = create_gan("pix2pix", cfg.pix2pix)       # or "cyclegan", cfg.cyclegan
losses = model.train_step({"A": masks, "B": images})
segmenter = create_segmenter("unetplusplus", "resnet34")
"""

from __future__ import annotations

from typing import Any

from tgan_ray.models.base import GANModel, linear_decay_factor
from tgan_ray.models.cyclegan import CycleGANModel
from tgan_ray.models.image_pool import ImagePool
from tgan_ray.models.losses import GANLoss, SegmentationLoss
from tgan_ray.models.networks import (
    PatchGANDiscriminator,
    count_batchnorm,
    define_discriminator,
    define_generator,
    init_weights,
    unwrap_model,
)
from tgan_ray.models.npssegnet import (
    SEGMENTER_ARCHS,
    create_segmenter,
    load_segmenter,
    predict_proba,
    save_segmenter,
)
from tgan_ray.models.pix2pix import Pix2PixModel

__all__ = [
    "GANS",
    "SEGMENTER_ARCHS",
    "CycleGANModel",
    "GANLoss",
    "GANModel",
    "ImagePool",
    "PatchGANDiscriminator",
    "Pix2PixModel",
    "SegmentationLoss",
    "count_batchnorm",
    "create_gan",
    "create_segmenter",
    "define_discriminator",
    "define_generator",
    "init_weights",
    "linear_decay_factor",
    "load_segmenter",
    "predict_proba",
    "save_segmenter",
    "unwrap_model",
]

GANS: dict[str, type[GANModel]] = {"pix2pix": Pix2PixModel, "cyclegan": CycleGANModel}


def create_gan(name: str, cfg: Any, **overrides: Any) -> GANModel:
    """Build a GAN model from its config section.

    Args:
        name: ``"pix2pix"`` or ``"cyclegan"``.
        cfg: The matching section, ``cfg.pix2pix`` (Pix2PixConfig) or ``cfg.cyclegan`` (CycleGANConfig).
        **overrides: Constructor arguments that win over the config (e.g. ``discriminator_encoder``, ``seed``).

    Returns:
        The model, on CPU.
    """
    if name not in GANS:
        raise KeyError(f"unknown GAN {name!r}; choose one of: {', '.join(GANS)}")
    # Catch the easy mix-up (a pix2pix section for cyclegan) before it becomes an AttributeError deep inside.
    needed = {"pix2pix": "lambda_l1", "cyclegan": "lambda_cycle"}[name]
    if not hasattr(cfg, needed):
        raise TypeError(f"create_gan({name!r}) needs the {name} config section; got a {type(cfg).__name__}")
    return GANS[name].from_config(cfg, **overrides)
