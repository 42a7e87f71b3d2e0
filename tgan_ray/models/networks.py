"""Network builders for the GANs: U-Net++ generator, PatchGAN / U-Net++ discriminators and their helpers.

Layout follows the pix2pix/CycleGAN reference (junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py``):
helpers, then ``define_generator`` / ``define_discriminator`` chosen by string, then the architectures.
The U-Net++ networks come from segmentation-models-pytorch (smp), built by ``smp_builder.py``; nothing here forks
smp. The GAN loss lives in ``losses.py`` and CycleGAN's image history in ``image_pool.py``.

DDP note: every discriminator is free of BatchNorm. A BatchNorm network that runs forward(real) and forward(fake)
before one backward fails under DistributedDataParallel ("modified by an inplace operation", pytorch #22095),
because DDP re-broadcasts the running statistics in place at each forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import init

from tgan_ray.models.smp_builder import build_smp_model

__all__ = [
    "DISCRIMINATORS",
    "NoiseInput",
    "PatchGANDiscriminator",
    "count_batchnorm",
    "define_discriminator",
    "define_generator",
    "init_weights",
    "replace_batchnorm",
    "unwrap_model",
]


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def unwrap_model(net: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Args:
        net: A network, possibly wrapped (several times).

    Returns:
        The raw network whose ``state_dict`` keys carry no wrapper prefix.
    """
    while True:
        if isinstance(net, nn.parallel.DistributedDataParallel | nn.DataParallel):
            net = net.module
        elif hasattr(net, "_orig_mod") and isinstance(net._orig_mod, nn.Module):
            net = net._orig_mod
        else:
            return net


def replace_batchnorm(net: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replace every BatchNorm2d in ``net`` by a GroupNorm of the same width, in place.

    GroupNorm keeps no running buffers, so it is safe under DDP with several forwards per backward, and unlike
    InstanceNorm it also works on the 1x1 maps a deep encoder reaches on small tiles.

    Args:
        net: The network to modify.
        max_groups: Most groups per layer (the usual 32); fewer when the width does not divide.

    Returns:
        ``net`` itself.
    """
    for name, child in net.named_children():
        if isinstance(child, nn.BatchNorm2d):
            channels = child.num_features
            norm: nn.Module = nn.GroupNorm(math.gcd(channels, max_groups), channels, eps=child.eps)
            if type(child) is not nn.BatchNorm2d and isinstance(getattr(child, "act", None), nn.Module):
                # timm's BatchNormAct2d (used by smp "tu-" encoders) fuses norm, dropout and activation.
                norm = nn.Sequential(norm, getattr(child, "drop", nn.Identity()), child.act)
            setattr(net, name, norm)
        else:
            replace_batchnorm(child, max_groups)
    return net


def count_batchnorm(net: nn.Module) -> int:
    """Number of BatchNorm layers (any dimension, SyncBatchNorm included) in ``net``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def init_weights(net: nn.Module, init_type: str = "normal", gain: float = 0.02) -> nn.Module:
    """Initialise conv/linear weights as the pix2pix reference does (normal(0, gain), zero bias).

    Affine norm layers get weight normal(1, gain) and zero bias.

    Args:
        net: The network, modified in place.
        init_type: ``"normal"``, ``"xavier"``, ``"kaiming"`` or ``"orthogonal"``.
        gain: Standard deviation (normal) or gain (xavier, orthogonal).

    Returns:
        ``net`` itself.
    """
    initialisers: dict[str, Callable[[torch.Tensor], object]] = {
        "normal": lambda w: init.normal_(w, 0.0, gain),
        "xavier": lambda w: init.xavier_normal_(w, gain=gain),
        "kaiming": lambda w: init.kaiming_normal_(w, a=0, mode="fan_in"),
        "orthogonal": lambda w: init.orthogonal_(w, gain=gain),
    }
    if init_type not in initialisers:
        raise KeyError(f"unknown init_type {init_type!r}; choose one of: {', '.join(initialisers)}")
    init_fn = initialisers[init_type]

    def init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            init_fn(m.weight.data)
            if m.bias is not None:
                init.constant_(m.bias.data, 0.0)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.InstanceNorm2d):
            if getattr(m, "weight", None) is not None:
                init.normal_(m.weight.data, 1.0, gain)
                init.constant_(m.bias.data, 0.0)

    net.apply(init_module)
    return net


# ---------------------------------------------------------------------------------------------------------------
# define_generator / define_discriminator
# ---------------------------------------------------------------------------------------------------------------


def define_generator(
    encoder: str = "resnet34",
    decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    encoder_weights: str | None = None,
    in_channels: int = 1,
    out_channels: int = 1,
    noise_channels: int = 0,
) -> nn.Module:
    """U-Net++ generator with a tanh output (images live in [-1, 1]).

    It keeps smp's initialisation and BatchNorm: each generator runs one forward per input batch, which DDP
    handles.

    Args:
        encoder: smp encoder name.
        decoder_channels: U-Net++ decoder widths, deepest first; its length sets the encoder depth (3 to 5).
        encoder_weights: ``None`` (offline default), ``"imagenet"`` (if it can download) or a local .pth file.
        in_channels: Input channels.
        out_channels: Output channels.
        noise_channels: Gaussian noise channels drawn inside ``forward`` and stacked on the input
            (:class:`NoiseInput`); 0: a deterministic generator.

    Returns:
        The generator.

    Shape:
        input (N, in_channels, H, W) -> output (N, out_channels, H, W), H and W multiples of 32.
    """
    decoder_channels = tuple(int(c) for c in decoder_channels)
    net = build_smp_model(
        "unetplusplus",
        encoder,
        encoder_weights,
        in_channels + noise_channels,
        out_channels,
        encoder_depth=len(decoder_channels),
        decoder_channels=decoder_channels,
        activation="tanh",
    )
    return NoiseInput(net, noise_channels) if noise_channels else net


class NoiseInput(nn.Module):
    """Stacks ``channels`` maps of N(0, 1) noise on the input of ``net``: a stochastic mask -> image generator.

    A deterministic generator maps one mask to one image: every empty mask gets the same support, and it cannot
    draw shot noise or texture, only their mean. The reference pix2pix gets its randomness from dropout in the
    U-Net; smp's U-Net++ has none, so the noise is an input here (as in BicycleGAN). It is drawn in ``forward``,
    so training, validation, export and inference all see it without any caller knowing.

    Args:
        net: The generator, built for ``in_channels + channels`` inputs.
        channels: Noise maps per sample.

    Shape:
        input (N, C, H, W) -> ``net`` on (N, C + channels, H, W).
    """

    def __init__(self, net: nn.Module, channels: int):
        super().__init__()
        self.net, self.channels = net, channels

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """``noise`` (N, channels, H, W): given to reproduce an image; None: drawn from torch's generator."""
        if noise is None:
            noise = torch.randn(x.shape[0], self.channels, *x.shape[2:], device=x.device, dtype=x.dtype)
        return self.net(torch.cat((x, noise.to(x.device, x.dtype)), 1))


class PatchGANDiscriminator(nn.Module):
    """The reference PatchGAN (70x70 receptive field with ``n_layers=3``), with InstanceNorm.

    Args:
        in_channels: Input channels (2 for a conditional pix2pix D on (mask, image)).
        width: Filters of the first layer; doubled per layer up to 8x.
        n_layers: Strided conv layers.

    Shape:
        input (N, in_channels, H, W) -> logits (N, 1, H', W'); 64x64 -> 6x6 and 256x256 -> 30x30 for n_layers=3.
    """

    def __init__(self, in_channels: int, width: int = 64, n_layers: int = 3):
        super().__init__()

        def norm(channels: int) -> nn.Module:
            # No running stats: nothing for DDP to broadcast, same behaviour in train and eval.
            return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)

        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last block keeps the size, as in the reference
            layers += [
                # bias=False: InstanceNorm removes any per-channel offset anyway.
                nn.Conv2d(width * prev, width * mult, kernel_size=4, stride=stride, padding=1, bias=False),
                norm(width * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(width * mult, 1, kernel_size=4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _patchgan(in_channels: int, width: int, n_layers: int, encoder: str) -> nn.Module:
    return PatchGANDiscriminator(in_channels, width=width, n_layers=n_layers)


def _unetplusplus_discriminator(in_channels: int, width: int, n_layers: int, encoder: str) -> nn.Module:
    # Per-pixel logits (the paper builds D on U-Net++). width sets the decoder as the generator's is set:
    # width=64 gives smp's default (256, 128, 64, 32, 16). n_layers is a PatchGAN setting and is not used.
    decoder_channels = tuple(max(width * 4 // 2**i, 4) for i in range(5))
    net = build_smp_model(
        "unetplusplus", encoder, None, in_channels, 1, decoder_channels=decoder_channels, activation=None
    )
    return replace_batchnorm(net)


DISCRIMINATORS: dict[str, Callable[[int, int, int, str], nn.Module]] = {
    "patchgan": _patchgan,
    "unetplusplus": _unetplusplus_discriminator,
}


def define_discriminator(
    kind: str = "patchgan",
    in_channels: int = 2,
    width: int = 64,
    n_layers: int = 3,
    encoder: str = "resnet18",
    init_type: str = "normal",
    init_gain: float = 0.02,
) -> nn.Module:
    """Build a BatchNorm-free discriminator that outputs logits (no sigmoid).

    Args:
        kind: ``"patchgan"`` (reference 70x70 PatchGAN) or ``"unetplusplus"`` (one logit per pixel).
        in_channels: Input channels.
        width: PatchGAN first-layer filters; U-Net++ decoder scale (64 = smp default widths).
        n_layers: PatchGAN strided layers (3 = 70x70); unused by ``"unetplusplus"``.
        encoder: smp encoder of the U-Net++ discriminator; unused by ``"patchgan"``.
        init_type: See :func:`init_weights`.
        init_gain: See :func:`init_weights`.

    Returns:
        The discriminator, initialised with :func:`init_weights`.

    Shape:
        patchgan: (N, C, H, W) -> (N, 1, H', W'); unetplusplus: (N, C, H, W) -> (N, 1, H, W).
    """
    if kind not in DISCRIMINATORS:
        raise KeyError(f"unknown discriminator {kind!r}; choose one of: {', '.join(DISCRIMINATORS)}")
    net = DISCRIMINATORS[kind](in_channels, width, n_layers, encoder)
    return init_weights(net, init_type, gain=init_gain)
