"""pix2pix (mask -> image, paired): learns the particles' morphology from subset 1 (the paper's step 3)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tgan_ray.models.base import GANModel, require_keys
from tgan_ray.models.losses import GANLoss
from tgan_ray.models.networks import define_discriminator, define_generator

if TYPE_CHECKING:
    from tgan_ray.config import Pix2PixConfig

__all__ = ["Pix2PixModel"]


class Pix2PixModel(GANModel):
    """pix2pix (Isola et al. 2017, https://arxiv.org/abs/1611.07004) with the paper's U-Net++ generator.

    Paper names -> code names: A = rough (or random) particle mask, B = real EM image; G: A -> B is ``nets["G"]``;
    D is conditional on the pair, ``nets["D"](cat(A, B))``. Both A and B are 1-channel tensors in [-1, 1].

    Losses (lsgan by default, as in the paper)::

        loss_G = GAN(D(A, G(A)), real) + lambda_l1 * |G(A) - B|_1
        loss_D = 0.5 * (GAN(D(A, B), real) + GAN(D(A, G(A).detach()), fake))

    Step order follows the reference: generate, discriminator step, generator step.

    Args:
        encoder: smp encoder of the U-Net++ generator.
        decoder_channels: Generator decoder widths, deepest first.
        encoder_weights: Generator encoder weights: None, 'imagenet' or a local .pth file.
        discriminator: ``"patchgan"`` or ``"unetplusplus"``.
        discriminator_layers: PatchGAN strided layers (3 = 70x70).
        discriminator_width: PatchGAN first-layer filters / U-Net++ D decoder scale.
        discriminator_encoder: smp encoder of a U-Net++ discriminator.
        gan_mode: ``"lsgan"`` or ``"vanilla"``.
        lambda_l1: Weight of the L1 term (paper: 10).
        lr_g: Generator learning rate.
        lr_d: Discriminator learning rate.
        beta1: Adam beta1.
        beta2: Adam beta2.
        in_channels: Mask channels.
        out_channels: Image channels.
        noise_channels: Noise maps the generator draws beside the mask (``NoiseInput``); D never sees them.
    """

    loss_names = ("loss_G_GAN", "loss_G_L1", "loss_D_real", "loss_D_fake")
    generator_names = ("G",)
    discriminator_names = ("D",)

    def __init__(
        self,
        encoder: str = "resnet34",
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        encoder_weights: str | None = None,
        discriminator: str = "patchgan",
        discriminator_layers: int = 3,
        discriminator_width: int = 64,
        discriminator_encoder: str = "resnet18",
        gan_mode: str = "lsgan",
        lambda_l1: float = 10.0,
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        in_channels: int = 1,
        out_channels: int = 1,
        noise_channels: int = 0,
    ):
        super().__init__(lr_g=lr_g, lr_d=lr_d, beta1=beta1, beta2=beta2)
        self.lambda_l1 = lambda_l1
        self.criterion_gan = GANLoss(gan_mode)
        self.nets["G"] = define_generator(
            encoder, decoder_channels, encoder_weights, in_channels, out_channels, noise_channels
        )
        self.nets["D"] = define_discriminator(
            discriminator,
            in_channels + out_channels,
            width=discriminator_width,
            n_layers=discriminator_layers,
            encoder=discriminator_encoder,
        )

    @classmethod
    def from_config(cls, cfg: Pix2PixConfig, **overrides) -> Pix2PixModel:
        """Build from a :class:`tgan_ray.config.Pix2PixConfig`; ``overrides`` win over its fields."""
        kwargs = {
            "encoder": cfg.generator_encoder,
            "decoder_channels": tuple(cfg.generator_decoder_channels),
            "encoder_weights": cfg.generator_encoder_weights,
            "discriminator": cfg.discriminator,
            "discriminator_layers": cfg.discriminator_layers,
            "discriminator_width": cfg.discriminator_width,
            "gan_mode": cfg.gan_mode,
            "lambda_l1": cfg.lambda_l1,
            "noise_channels": cfg.noise_channels,
            "lr_g": cfg.lr_g,
            "lr_d": cfg.lr_d,
            "beta1": cfg.beta1,
            "beta2": cfg.beta2,
        }
        return cls(**{**kwargs, **overrides})

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One discriminator step and one generator step.

        Args:
            batch: ``{"A": mask, "B": image}``, both in [-1, 1], on the networks' device.

        Returns:
            ``loss_G_GAN``, ``loss_G_L1`` (already times lambda_l1), ``loss_D_real``, ``loss_D_fake``.

        Shape:
            A: (N, 1, H, W), B: (N, 1, H, W), H and W multiples of 32.
        """
        require_keys(batch, ("A", "B"), "pix2pix")
        real_a, real_b = batch["A"], batch["B"]
        opt_g, opt_d = self.optimizers()
        gen, disc = self.nets["G"], self.nets["D"]

        with self.autocast():
            fake_b = gen(real_a)

        # Discriminator: zero first, which also drops the D gradients the last generator step left behind.
        opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            loss_d_real = self.criterion_gan(disc(torch.cat((real_a, real_b), 1)), True)
            loss_d_fake = self.criterion_gan(disc(torch.cat((real_a, fake_b.detach()), 1)), False)
            loss_d = 0.5 * (loss_d_real + loss_d_fake)
        loss_d.backward()
        opt_d.step()

        # Generator: gradients also reach D (no requires_grad switching, see base.py), but only G is stepped.
        opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            loss_g_gan = self.criterion_gan(disc(torch.cat((real_a, fake_b), 1)), True)
            loss_g_l1 = F.l1_loss(fake_b.float(), real_b.float()) * self.lambda_l1
            loss_g = loss_g_gan + loss_g_l1
        loss_g.backward()
        opt_g.step()

        return self._to_floats(
            {
                "loss_G_GAN": loss_g_gan,
                "loss_G_L1": loss_g_l1,
                "loss_D_real": loss_d_real,
                "loss_D_fake": loss_d_fake,
            }
        )
