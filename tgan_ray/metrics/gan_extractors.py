"""Feature extractors for the GAN scores in :mod:`tgan_ray.metrics.gan`, and where their weights come from.

FID, KID and IS are computed in an extractor's feature space. This module builds the extractors by name
(:func:`build_feature_extractor`), finds and checks the FID Inception weights, and names each extractor in metric
keys (:func:`extractor_label`). Every extractor takes gray images in [-1, 1]; ``forward`` gives features and
``embed`` gives features and the logits IS needs.

Extractors:

- ``random-resnet18``: a ResNet-18 with fixed-seed random weights. Works offline; random embeddings are a
  published choice for non-natural images, and EM micrographs are far from ImageNet anyway. Its IS uses the
  fixed-seed random 1000-way head, so that IS means only "confident and diverse under this random head": compare it
  only with other IS values of the same extractor, never with a published Inception Score.
- ``inception``: torch-fidelity's FID Inception-v3 (the standard FID/KID/IS weights). Needs the weights file in the
  torch hub cache or given as ``weights_path``; see :class:`MissingWeightsError`.
- ``npssegnet:<checkpoint>``: the encoder of an in-domain NPsSegNet checkpoint (globally pooled deepest features);
  its IS, like the random ResNet's, comes from a fixed-seed random 1000-way head on those features.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EXTRACTORS = ("random-resnet18", "inception", "npssegnet:<checkpoint>")
INCEPTION_WEIGHTS_FILE = (
    "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity 0.4.0's URL_INCEPTION_V3
)
INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
)
_IS_CLASSES = 1000


class MissingWeightsError(FileNotFoundError):
    """The feature extractor's weights are neither cached nor given."""


def inception_cache_path() -> Path:
    """Where torch-fidelity (``torch.hub.load_state_dict_from_url``) caches the FID Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def _gray_to_rgb(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x[:, None]
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x  # gray -> the 3 channels the extractor expects


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    # antialias only matters when shrinking (512 px frames into a 128 px extractor)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _random_head(in_features: int, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):  # same head everywhere, without touching the caller's RNG
        torch.manual_seed(seed)
        return nn.Linear(in_features, _IS_CLASSES)


class RandomResNetFeatures(nn.Module):
    """Fixed-seed, randomly initialised ResNet-18: 512-d pooled features and its random 1000-way logits.

    Args:
        seed: Weight seed; the default keeps scores comparable across machines and runs.
        input_size: Side the images are resized to (bilinear, antialiased when shrinking).

    Shape:
        input: (N, 1, H, W) or (N, 3, H, W) in [-1, 1]; :meth:`forward` -> (N, 512);
        :meth:`embed` -> ((N, 512), (N, 1000)).
    """

    def __init__(self, seed: int = 0, input_size: int = 128):
        super().__init__()
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torchvision.models.resnet18(weights=None)
        self.head = net.fc  # the random 1000-way classifier, kept for IS
        net.fc = nn.Identity()
        self.net = net
        self.input_size = input_size
        self.num_features = 512
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net(_resize(_gray_to_rgb(x.float()), self.input_size))
        return features, self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)[0]


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception-v3: 2048-d pool features and its (unbiased) logits for IS.

    Args:
        weights_path: Local weights file; None uses the torch hub cache (see :func:`inception_cache_path`).
        allow_download: When neither is there, let torch-fidelity download the file (needs the internet).

    Shape:
        input: (N, 1, H, W) or (N, 3, H, W) in [-1, 1], any size (torch-fidelity resizes to 299 itself);
        :meth:`forward` -> (N, 2048).
    """

    def __init__(self, weights_path: str | None = None, allow_download: bool = True):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = _inception_weights(weights_path, allow_download)
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path
            )
        except Exception as exc:  # an offline download, or a file whose tensors do not fit Inception-v3
            why = f"{type(exc).__name__}: {_first_line(exc)}"
            if weights_path is not None:
                raise MissingWeightsError(
                    f"{weights_path} does not hold the FID Inception-v3 weights ({why}); "
                    f"expected torch-fidelity's {INCEPTION_WEIGHTS_FILE}"
                ) from None
            raise MissingWeightsError(
                f"FID Inception weights unavailable ({why}); " + _inception_hint()
            ) from None
        self.num_features = 2048
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _gray_to_rgb(x.float())
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # torch-fidelity takes uint8 RGB
        features, logits = self.net(x)
        return features, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)[0]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _inception_hint() -> str:
    return (
        f"download {INCEPTION_WEIGHTS_URL} once and put it at {inception_cache_path()} (the torch hub cache; "
        "TORCH_HOME moves it), or pass its path as the extractor's weights file, or use extractor 'random-resnet18'"
    )


def _inception_weights(weights_path: str | None, allow_download: bool) -> str | None:
    """The weights file to load; None means torch-fidelity downloads it into the hub cache."""
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise MissingWeightsError(f"Inception weights file not found: {path}; " + _inception_hint())
        try:
            # torch-fidelity loads with weights_only=False; check it is a plain tensor file before it does
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MissingWeightsError(
                f"{path} is not a torch weights file ({_first_line(exc)}); expected {INCEPTION_WEIGHTS_FILE}"
            ) from None
        return str(path)
    cached = inception_cache_path()
    if cached.is_file():
        return str(cached)
    if not allow_download:
        raise MissingWeightsError(
            f"FID Inception weights {INCEPTION_WEIGHTS_FILE} not cached; " + _inception_hint()
        )
    return None


class NpsSegNetFeatures(nn.Module):
    """The encoder of a trained NPsSegNet: globally pooled deepest features, in-domain for EM.

    Its IS logits come from a fixed-seed random 1000-way head on those features (the segmenter has no image
    classes), so that IS is comparable only under the same checkpoint.

    Args:
        checkpoint: An NPsSegNet file written by ``save_segmenter``.
        input_size: Side the images are resized to; None: the checkpoint's ``data.image_size`` if recorded,
            else the input's side rounded up to a multiple of 32 (the encoder's stride).

    Shape:
        input: (N, 1, H, W) in [-1, 1]; :meth:`forward` -> (N, C) with C the deepest encoder width.
    """

    def __init__(self, checkpoint: str | Path, input_size: int | None = None, seed: int = 0):
        super().__init__()
        from tgan_ray.models.npssegnet import load_segmenter

        model, meta = load_segmenter(checkpoint)
        self.encoder = model.encoder
        self.in_channels = int(getattr(self.encoder, "_in_channels", 1))
        self.num_features = int(self.encoder.out_channels[-1])
        recorded = (meta.get("data") or {}).get("image_size") if isinstance(meta, dict) else None
        self.input_size = input_size or (int(recorded) if recorded else None)
        self.head = _random_head(self.num_features, seed)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        if x.dim() == 3:
            x = x[:, None]
        x = (x.clamp(-1, 1) + 1) / 2  # NPsSegNet trains on images in [0, 1]
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.repeat(1, 3, 1, 1)
        side = self.input_size or 32 * math.ceil(max(x.shape[-2:]) / 32)
        features = self.encoder(_resize(x, side))[-1].mean(dim=(-2, -1))
        return features, self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)[0]


def extractor_label(name: str) -> str:
    """The name used in metric keys: the extractor name, or ``npssegnet-<file stem>`` (no path: MLflow-safe)."""
    if name.startswith("npssegnet:"):
        return f"npssegnet-{Path(name.split(':', 1)[1]).stem}"
    return name


def build_feature_extractor(
    name: str = "random-resnet18", weights_path: str | None = None, allow_download: bool = True
) -> nn.Module:
    """Create a feature extractor by name (see :data:`EXTRACTORS`).

    Args:
        name: ``random-resnet18``, ``inception`` or ``npssegnet:<checkpoint path>``.
        weights_path: ``inception`` only: a local copy of the FID Inception weights.
        allow_download: ``inception`` only: download the weights when they are not cached.

    Returns:
        An ``nn.Module`` in eval mode on the CPU; ``forward`` gives features, ``embed`` (features, logits).
    """
    if name == "random-resnet18":
        return RandomResNetFeatures()
    if name == "inception":
        return InceptionFeatures(weights_path, allow_download)
    if name.startswith("npssegnet:"):
        checkpoint = name.split(":", 1)[1]
        if not checkpoint:
            raise ValueError(
                "extractor 'npssegnet:' needs a checkpoint path: npssegnet:/path/to/npssegnet.pt"
            )
        return NpsSegNetFeatures(checkpoint)
    raise KeyError(f"unknown feature extractor {name!r}; choose one of: {', '.join(EXTRACTORS)}")
