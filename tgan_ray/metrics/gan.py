"""Image-quality scores for generated EM images: FID, KID (unbiased kernel MMD), IS, SSIM and PSNR.

GAN losses do not converge, so checkpoints are chosen by these scores on generated vs real images, never by loss.
FID, KID and IS live in an extractor's feature space, so their values are only comparable under one extractor and
every key names it (``kid_random-resnet18``). SSIM and PSNR compare pixels of paired images and need no extractor.

    extractor = build_feature_extractor("random-resnet18")
    scores = image_quality(fake, real, extractor, "random-resnet18")   # fid_/kid_/kid_std_/is_/is_std_<name>
    pairs = paired_quality(fake_from_masks, real)                      # {"ssim": .., "psnr": ..}

Extractors (:func:`build_feature_extractor`):

- ``random-resnet18``: a ResNet-18 with fixed-seed random weights. Works offline; random embeddings are a
  published choice for non-natural images, and EM micrographs are far from ImageNet anyway. Its IS uses the
  fixed-seed random 1000-way head, so that IS means only "confident and diverse under this random head": compare it
  only with other IS values of the same extractor, never with a published Inception Score.
- ``inception``: torch-fidelity's FID Inception-v3 (the standard FID/KID/IS weights). Needs the weights file in the
  torch hub cache or given as ``weights_path``; see :class:`MissingWeightsError`.
- ``npssegnet:<checkpoint>``: the encoder of an in-domain NPsSegNet checkpoint (globally pooled deepest features);
  its IS, like the random ResNet's, comes from a fixed-seed random 1000-way head on those features.

The implementations are torch-fidelity's (KID, IS and FID from features) and torchmetrics' (SSIM, PSNR); this module
feeds them gray EM images and sizes their settings to the small sets EM stacks give (FID on fewer images than
feature dimensions takes an exact shortcut, see :func:`fid_from_features`).
"""

from __future__ import annotations

import math
import warnings
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
PSNR_CAP_DB = 100.0  # PSNR of identical images is infinite; capped so tables and JSON stay finite
_IS_CLASSES = 1000


class MissingWeightsError(FileNotFoundError):
    """The feature extractor's weights are neither cached nor given."""


class GANMetricWarning(UserWarning):
    """Scores computed on too few images to be reliable (they are still returned)."""


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


@torch.no_grad()
def _embed_all(extractor: nn.Module, images: torch.Tensor, batch_size: int = 32):
    """Features (float64, for stable covariances) and logits (None if the extractor has no ``embed``)."""
    device = next(extractor.parameters()).device
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device)
        if hasattr(extractor, "embed"):
            f, lg = extractor.embed(x)
            logits.append(lg.double().cpu())
        else:  # any plain feature module works for FID/KID
            f = extractor(x)
        feats.append(f.double().cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def kid_from_features(f_real: torch.Tensor, f_fake: torch.Tensor, subsets: int = 100, seed: int = 0) -> tuple:
    """Unbiased KID (cubic polynomial-kernel MMD², torch-fidelity) mean and std, subsets sized to fit small sets.

    The subset size is the smaller set's size (torch-fidelity's default 1000 exceeds any EM stack). With a single
    image per set the unbiased estimator is undefined, so the biased MMD² is returned (finite, with a warning).

    Returns:
        (mean, std) over the random subsets.
    """
    from torch_fidelity.metric_kid import kernel_poly, kid_features_to_metric, mmd2

    n_real, n_fake = len(f_real), len(f_fake)
    if n_real == 0 or n_fake == 0:
        raise ValueError(f"KID needs images in both sets, got {n_real} real and {n_fake} generated")
    size = min(n_real, n_fake, 1000)
    if size < 2:
        warnings.warn(
            f"KID on {size} image per set: unbiased MMD² undefined, using the biased one",
            GANMetricWarning,
            stacklevel=2,
        )
        x, y = f_real[:1].double().numpy(), f_fake[:1].double().numpy()
        kw = {"kid_kernel_poly_degree": 3, "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1}
        return float(
            mmd2(kernel_poly(x, x, **kw), kernel_poly(x, y, **kw), kernel_poly(y, y, **kw), mmd_est="biased")
        ), 0.0
    # Subsets of the whole of both sets are all the same set: one is enough.
    subsets = 1 if size == n_real == n_fake else subsets
    out = kid_features_to_metric(
        f_real.double(),
        f_fake.double(),
        kid_subsets=subsets,
        kid_subset_size=size,
        verbose=False,
        rng_seed=seed,
    )
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def fid_from_features(f_real: torch.Tensor, f_fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets.

    With at least as many images as feature dimensions this is torch-fidelity's computation. EM sets are smaller
    than that (tens of images, 512 or 2048 dimensions), and there torch-fidelity's d x d eigendecomposition costs
    seconds per call on a CPU and is numerically poor for rank-deficient covariances; the same trace term is then
    taken exactly from the small n x m cross-Gram matrix instead (see :func:`_trace_sqrt_product`). FID is biased
    upward on small sets either way, and stays finite; one image gets a zero covariance.
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    f_real, f_fake = f_real.double(), f_fake.double()
    if min(len(f_real), len(f_fake)) > f_real.shape[1]:
        stats = fid_features_to_statistics(f_real.cpu()), fid_features_to_statistics(f_fake.cpu())
        fid = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    else:
        a, b = f_real - f_real.mean(0), f_fake - f_fake.mean(0)
        trace_real = (a * a).sum() / max(len(a) - 1, 1)
        trace_fake = (b * b).sum() / max(len(b) - 1, 1)
        mean_term = ((f_real.mean(0) - f_fake.mean(0)) ** 2).sum()
        fid = float(mean_term + trace_real + trace_fake - 2 * _trace_sqrt_product(a, b))
    return max(float(fid), 0.0)  # identical sets give ~-1e-9 from round-off; FID is >= 0


def _trace_sqrt_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tr sqrt(S_a S_b) for S = X^T X / (n - 1) of centred features X: the nuclear norm of a b^T, scaled.

    The non-zero eigenvalues of A^T A B^T B equal those of (A B^T)(A B^T)^T, i.e. the squared singular values of
    A B^T, so the d x d square root reduces to an n x m SVD.
    """
    scale = math.sqrt(max(len(a) - 1, 1) * max(len(b) - 1, 1))
    return torch.linalg.matrix_norm(a @ b.T, ord="nuc") / scale


def is_from_logits(logits: torch.Tensor, seed: int = 0) -> tuple[float, float]:
    """Inception Score (torch-fidelity) mean and std, with splits sized to the set (>= 5 images per split)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    splits = max(1, min(10, len(logits) // 5))
    out = isc_features_to_metric(logits.double(), splits=splits, shuffle=True, rng_seed=seed)
    return out["inception_score_mean"], out["inception_score_std"]


def _check_images(x: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() not in (3, 4):
        raise ValueError(
            f"{what} images must be a tensor (N, 1, H, W) in [-1, 1], got {getattr(x, 'shape', type(x))}"
        )
    if len(x) == 0:
        raise ValueError(f"no {what} images to score")
    return x[:, None] if x.dim() == 3 else x


def image_quality(
    generated: torch.Tensor,
    real: torch.Tensor,
    extractor: nn.Module,
    extractor_name: str = "random-resnet18",
    min_images: int = 10,
    with_is: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """FID, KID and IS of generated vs real images in one extractor's feature space.

    Args:
        generated: Generated images in [-1, 1].
        real: Real images in [-1, 1] (need not be as many).
        extractor: From :func:`build_feature_extractor`.
        extractor_name: Its name; keys use :func:`extractor_label` of it.
        min_images: Fewer images than this in either set: a :class:`GANMetricWarning` with the numbers.
        with_is: Add the Inception Score of the generated set (needs an extractor with ``embed``).
        seed: Seed of KID's subsets and IS's shuffling.

    Returns:
        ``{"fid_<ex>", "kid_<ex>", "kid_std_<ex>", "is_<ex>", "is_std_<ex>"}``, all finite: a score that could
        not be finite is left out with a warning, never returned as NaN.

    Shape:
        generated: (N, 1, H, W); real: (M, 1, H, W). 3-channel input is used as is.
    """
    generated, real = _check_images(generated, "generated"), _check_images(real, "real")
    n_fake, n_real = len(generated), len(real)
    if min(n_fake, n_real) < min_images:
        warnings.warn(
            f"only {n_real} real and {n_fake} generated images for FID/KID/IS (fewer than {min_images}): "
            "scores are noisy and FID is biased upward; compare them only at equal set sizes",
            GANMetricWarning,
            stacklevel=2,
        )
    label = extractor_label(extractor_name)
    f_real, _ = _embed_all(extractor, real)
    f_fake, logits = _embed_all(extractor, generated)
    kid, kid_std = kid_from_features(f_real, f_fake, seed=seed)
    out = {
        f"fid_{label}": fid_from_features(f_real, f_fake),
        f"kid_{label}": kid,
        f"kid_std_{label}": kid_std,
    }
    if with_is and logits is not None:
        out[f"is_{label}"], out[f"is_std_{label}"] = is_from_logits(logits, seed)
    for key in [k for k, v in out.items() if not math.isfinite(v)]:
        warnings.warn(f"{key} is not finite on these images and is left out", GANMetricWarning, stacklevel=2)
        del out[key]
    return out


def paired_quality(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """SSIM and PSNR of each generated image against its paired real image (torchmetrics), averaged.

    Args:
        generated: Generated images in [-1, 1].
        real: The real image each was generated for (e.g. from its rough mask), same shape.

    Returns:
        ``{"ssim": .., "psnr": ..}``: mean SSIM (11 px Gaussian window, smaller on tiny images) and mean per-image
        PSNR in dB, capped at :data:`PSNR_CAP_DB` for identical images.

    Shape:
        generated, real: (N, 1, H, W).
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    generated, real = _check_images(generated, "generated"), _check_images(real, "real")
    if generated.shape != real.shape:
        raise ValueError(
            f"paired scores need one generated image per real one: {tuple(generated.shape)} vs "
            f"{tuple(real.shape)}"
        )
    fake01 = ((generated.float().clamp(-1, 1) + 1) / 2).cpu()
    real01 = ((real.float().clamp(-1, 1) + 1) / 2).cpu()
    window = min(11, min(real.shape[-2:]) // 2 * 2 - 1)  # odd and no larger than the image
    ssim = structural_similarity_index_measure(fake01, real01, data_range=1.0, kernel_size=max(window, 3))
    psnr = peak_signal_noise_ratio(fake01, real01, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return {"ssim": float(ssim), "psnr": float(psnr.clamp(max=PSNR_CAP_DB).mean())}
