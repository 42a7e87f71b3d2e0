"""Losses: the GAN objective (least squares or vanilla) and the NPsSegNet segmentation loss (focal + Jaccard)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import FocalLoss, JaccardLoss
from torch import nn

__all__ = ["GAN_MODES", "GANLoss", "SegmentationLoss"]

GAN_MODES = ("lsgan", "vanilla")


class GANLoss(nn.Module):
    """GAN loss against an all-real or all-fake target of the discriminator's output shape.

    ``lsgan`` is the least-squares GAN (Mao et al. 2017): MSE against 1 (real) or 0 (fake); the paper's choice.
    ``vanilla`` is the original GAN: binary cross-entropy on logits.

    Args:
        mode: ``"lsgan"`` or ``"vanilla"``.
        real_label: Target for real images.
        fake_label: Target for fake images.

    Shape:
        prediction: any shape (PatchGAN map or per-pixel logits) -> scalar.
    """

    def __init__(self, mode: str = "lsgan", real_label: float = 1.0, fake_label: float = 0.0):
        super().__init__()
        if mode not in GAN_MODES:
            raise KeyError(f"unknown gan_mode {mode!r}; choose one of: {', '.join(GAN_MODES)}")
        self.mode = mode
        self.real_label = real_label
        self.fake_label = fake_label

    def forward(self, prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
        """Loss of ``prediction`` (discriminator logits) against the real or the fake target.

        Args:
            prediction: Discriminator output (logits, no sigmoid).
            target_is_real: True to score against the real label.

        Returns:
            Scalar float32 loss.
        """
        # float32: a bf16 autocast region would otherwise square / log in low precision.
        prediction = prediction.float()
        target = torch.full_like(prediction, self.real_label if target_is_real else self.fake_label)
        if self.mode == "lsgan":
            return F.mse_loss(prediction, target)
        return F.binary_cross_entropy_with_logits(prediction, target)


class SegmentationLoss(nn.Module):
    """NPsSegNet loss of the paper: (FocalLoss(multiclass, alpha) + JaccardLoss(multiclass)) / 2, from smp.

    Args:
        focal_alpha: Focal-loss alpha (paper: 0.25).
        focal_gamma: Focal-loss focusing power.
        ignore_index: Target value left out of both losses (unsure pixels of pseudo-labels); None: none.

    Shape:
        logits (N, C, H, W) float, target (N, H, W) or (N, 1, H, W) class indices -> scalar.
    """

    def __init__(self, focal_alpha: float = 0.25, focal_gamma: float = 2.0, ignore_index: int | None = None):
        super().__init__()
        self.focal = FocalLoss(
            mode="multiclass", alpha=focal_alpha, gamma=focal_gamma, ignore_index=ignore_index
        )
        self.jaccard = JaccardLoss(mode="multiclass", from_logits=True, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Averaged focal and Jaccard losses.

        Args:
            logits: Raw segmenter output.
            target: Class index per pixel (0 background, 1 particle).

        Returns:
            Scalar float32 loss.
        """
        logits = logits.float()
        if target.ndim == logits.ndim and target.shape[1] == 1:
            target = target[:, 0]  # accept (N, 1, H, W) masks as well
        target = target.long()
        return 0.5 * (self.focal(logits, target) + self.jaccard(logits, target))
