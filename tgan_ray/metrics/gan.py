"""Image-quality scores for generated EM images: FID, KID (unbiased kernel MMD), IS, SSIM and PSNR.

GAN losses do not converge, so checkpoints are chosen by these scores on generated vs real images, never by loss.
FID, KID and IS live in an extractor's feature space, so their values are only comparable under one extractor and
every key names it (``kid_random-resnet18``). SSIM and PSNR compare pixels of paired images and need no extractor.

    extractor = build_feature_extractor("random-resnet18")             # from tgan_ray.metrics.gan_extractors
    scores = image_quality(fake, real, extractor, "random-resnet18")   # fid_/kid_/kid_std_/is_/is_std_<name>
    pairs = paired_quality(fake_from_masks, real)                      # {"ssim": .., "psnr": ..}

The extractors (a fixed-seed random ResNet-18, the FID Inception-v3, an NPsSegNet encoder) and their weights are
in :mod:`tgan_ray.metrics.gan_extractors`; this module embeds images with one and computes the scores.

The implementations are torch-fidelity's (KID, IS and FID from features) and torchmetrics' (SSIM, PSNR); this module
feeds them gray EM images and sizes their settings to the small sets EM stacks give (FID on fewer images than
feature dimensions takes an exact shortcut, see :func:`fid_from_features`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from tgan_ray.metrics.gan_extractors import extractor_label

PSNR_CAP_DB = 100.0  # PSNR of identical images is infinite; capped so tables and JSON stay finite


class GANMetricWarning(UserWarning):
    """Scores computed on too few images to be reliable (they are still returned)."""


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
