"""CycleGAN (1st generation <-> real, unpaired): learns the real stack's contrast (the paper's step 5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tgan_ray.models.base import GANModel, require_keys
from tgan_ray.models.image_pool import ImagePool
from tgan_ray.models.losses import GANLoss
from tgan_ray.models.networks import define_discriminator, define_generator

if TYPE_CHECKING:
    from tgan_ray.config import CycleGANConfig

__all__ = ["CycleGANModel"]


class CycleGANModel(GANModel):
    """CycleGAN (Zhu et al. 2017, https://arxiv.org/abs/1703.10593) with the paper's U-Net++ generators.

    Paper names -> code names: A = 1st generation (pix2pix output: right morphology, weak contrast),
    B = real EM image. ``nets["G_AB"]``: A -> B (makes the 2nd generation), ``nets["G_BA"]``: B -> A.
    ``nets["D_A"]`` judges A-domain images, ``nets["D_B"]`` B-domain images (the reference's D_A judges B).

    Losses (lsgan by default; lambda = lambda_cycle, lambda_idt = lambda_identity * lambda_cycle)::

        loss_G = GAN(D_B(G_AB(A)), real) + GAN(D_A(G_BA(B)), real)
               + lambda * (|G_BA(G_AB(A)) - A|_1 + |G_AB(G_BA(B)) - B|_1)
               + lambda_idt * (|G_AB(B) - B|_1 + |G_BA(A) - A|_1)
        loss_D_B = 0.5 * (GAN(D_B(B), real) + GAN(D_B(pool_B(G_AB(A))), fake)), and loss_D_A likewise.

    Step order follows the reference: generate, generator step, discriminator step.

    Args:
        encoder: smp encoder of both U-Net++ generators.
        decoder_channels: Generator decoder widths, deepest first.
        encoder_weights: Generator encoder weights: None, 'imagenet' or a local .pth file.
        discriminator: ``"patchgan"`` or ``"unetplusplus"``.
        discriminator_layers: PatchGAN strided layers (3 = 70x70).
        discriminator_width: PatchGAN first-layer filters / U-Net++ D decoder scale.
        discriminator_encoder: smp encoder of U-Net++ discriminators.
        gan_mode: ``"lsgan"`` or ``"vanilla"``.
        lambda_cycle: Cycle-consistency weight (paper: 10).
        lambda_identity: Identity weight relative to ``lambda_cycle``; 0 skips the identity passes.
        pool_size: Images in each discriminator's history (reference: 50); 0 disables it.
        lr_g: Generator learning rate.
        lr_d: Discriminator learning rate.
        beta1: Adam beta1.
        beta2: Adam beta2.
        channels: Image channels of both domains.
        seed: Seed of the image pools.
    """

    loss_names = (
        "loss_G_AB",
        "loss_G_BA",
        "loss_cycle_A",
        "loss_cycle_B",
        "loss_idt_AB",
        "loss_idt_BA",
        "loss_D_A",
        "loss_D_B",
    )
    generator_names = ("G_AB", "G_BA")
    discriminator_names = ("D_A", "D_B")

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
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        channels: int = 1,
        seed: int | None = None,
    ):
        super().__init__(lr_g=lr_g, lr_d=lr_d, beta1=beta1, beta2=beta2)
        self.lambda_cycle = lambda_cycle
        self.lambda_identity = lambda_identity
        self.criterion_gan = GANLoss(gan_mode)
        for name in self.generator_names:
            self.nets[name] = define_generator(encoder, decoder_channels, encoder_weights, channels, channels)
        for name in self.discriminator_names:
            self.nets[name] = define_discriminator(
                discriminator,
                channels,
                width=discriminator_width,
                n_layers=discriminator_layers,
                encoder=discriminator_encoder,
            )
        # Pools hold fakes of each domain: pool_A feeds D_A, pool_B feeds D_B. Different seeds, independent draws.
        self.pool_A = ImagePool(pool_size, seed=seed)
        self.pool_B = ImagePool(pool_size, seed=None if seed is None else seed + 1)

    @classmethod
    def from_config(cls, cfg: CycleGANConfig, **overrides) -> CycleGANModel:
        """Build from a :class:`tgan_ray.config.CycleGANConfig`; ``overrides`` win over its fields."""
        kwargs = {
            "encoder": cfg.generator_encoder,
            "decoder_channels": tuple(cfg.generator_decoder_channels),
            "encoder_weights": cfg.generator_encoder_weights,
            "discriminator": cfg.discriminator,
            "discriminator_layers": cfg.discriminator_layers,
            "discriminator_width": cfg.discriminator_width,
            "gan_mode": cfg.gan_mode,
            "lambda_cycle": cfg.lambda_cycle,
            "lambda_identity": cfg.lambda_identity,
            "pool_size": cfg.pool_size,
            "lr_g": cfg.lr_g,
            "lr_d": cfg.lr_d,
            "beta1": cfg.beta1,
            "beta2": cfg.beta2,
        }
        return cls(**{**kwargs, **overrides})

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One generator step (both generators) and one discriminator step (both discriminators).

        Args:
            batch: ``{"A": 1st-generation images, "B": real images}``, unpaired, in [-1, 1], on the nets' device.

        Returns:
            The eight ``loss_names``; the cycle and identity losses are already weighted.

        Shape:
            A: (N, C, H, W), B: (M, C, H, W), H and W multiples of 32.
        """
        require_keys(batch, ("A", "B"), "cyclegan")
        real_a, real_b = batch["A"], batch["B"]
        opt_g, opt_d = self.optimizers()
        g_ab, g_ba, d_a, d_b = (self.nets[n] for n in ("G_AB", "G_BA", "D_A", "D_B"))
        lambda_idt = self.lambda_cycle * self.lambda_identity

        # Generators: gradients also reach D_A / D_B (no requires_grad switching, see base.py); only G is stepped.
        opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            fake_b = g_ab(real_a)
            fake_a = g_ba(real_b)
            loss_cycle_a = F.l1_loss(g_ba(fake_b).float(), real_a.float()) * self.lambda_cycle
            loss_cycle_b = F.l1_loss(g_ab(fake_a).float(), real_b.float()) * self.lambda_cycle
            if lambda_idt > 0:
                # A generator fed an image of its own target domain should leave it alone.
                loss_idt_ab = F.l1_loss(g_ab(real_b).float(), real_b.float()) * lambda_idt
                loss_idt_ba = F.l1_loss(g_ba(real_a).float(), real_a.float()) * lambda_idt
            else:
                loss_idt_ab = loss_idt_ba = real_a.new_zeros((), dtype=torch.float32)
            loss_g_ab = self.criterion_gan(d_b(fake_b), True)
            loss_g_ba = self.criterion_gan(d_a(fake_a), True)
            loss_g = loss_g_ab + loss_g_ba + loss_cycle_a + loss_cycle_b + loss_idt_ab + loss_idt_ba
        loss_g.backward()
        opt_g.step()

        # Discriminators: zero first (drops the generator step's D gradients), then judge pooled, detached fakes.
        opt_d.zero_grad(set_to_none=True)
        pooled_fake_b = self.pool_B.query(fake_b)
        pooled_fake_a = self.pool_A.query(fake_a)
        with self.autocast():
            loss_d_b = 0.5 * (
                self.criterion_gan(d_b(real_b), True) + self.criterion_gan(d_b(pooled_fake_b), False)
            )
            loss_d_a = 0.5 * (
                self.criterion_gan(d_a(real_a), True) + self.criterion_gan(d_a(pooled_fake_a), False)
            )
        (loss_d_a + loss_d_b).backward()
        opt_d.step()

        return self._to_floats(
            {
                "loss_G_AB": loss_g_ab,
                "loss_G_BA": loss_g_ba,
                "loss_cycle_A": loss_cycle_a,
                "loss_cycle_B": loss_cycle_b,
                "loss_idt_AB": loss_idt_ab,
                "loss_idt_BA": loss_idt_ba,
                "loss_D_A": loss_d_a,
                "loss_D_B": loss_d_b,
            }
        )
