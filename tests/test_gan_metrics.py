"""GAN image-quality scores on tiny synthetic EM sets: identity ~0, degradation worse, offline extractors."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from tgan_ray.data.synthetic import SynthConfig, make_image
from tgan_ray.metrics.gan import (
    GANMetricWarning,
    fid_from_features,
    image_quality,
    kid_from_features,
    paired_quality,
)
from tgan_ray.metrics.gan_extractors import (
    INCEPTION_WEIGHTS_FILE,
    MissingWeightsError,
    build_feature_extractor,
    extractor_label,
)

SIZE = 64


def _as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32))[:, None] * 2 - 1


@pytest.fixture(scope="module")
def em_sets() -> dict[str, torch.Tensor]:
    """Real HAADF tiles (two disjoint draws) and a blurred + noisy copy of the first."""
    images = np.stack([make_image(SynthConfig(size=SIZE), rng=i)[0] for i in range(24)])
    rng = np.random.default_rng(0)
    degraded = np.clip(
        np.stack([gaussian_filter(a, 2.0) for a in images]) + rng.normal(0, 0.2, images.shape), 0, 1
    )
    return {"a": _as_tensor(images[:12]), "b": _as_tensor(images[12:]), "degraded": _as_tensor(degraded[:12])}


@pytest.fixture(scope="module")
def resnet():
    return build_feature_extractor("random-resnet18")


def test_identical_sets_score_about_zero_and_degraded_worse(em_sets, resnet):
    same = image_quality(em_sets["a"], em_sets["a"], resnet, "random-resnet18")
    other = image_quality(em_sets["b"], em_sets["a"], resnet, "random-resnet18")
    worse = image_quality(em_sets["degraded"], em_sets["a"], resnet, "random-resnet18")
    assert set(same) == {f"{m}_random-resnet18" for m in ("fid", "kid", "kid_std", "is", "is_std")}
    assert all(math.isfinite(v) for d in (same, other, worse) for v in d.values())
    assert same["fid_random-resnet18"] == pytest.approx(0.0, abs=1e-6)
    # unbiased MMD² of a set with itself is ~0 (slightly negative: the estimator assumes independent draws)
    assert abs(same["kid_random-resnet18"]) < 0.05 * worse["kid_random-resnet18"]
    assert worse["kid_random-resnet18"] > 5 * max(other["kid_random-resnet18"], 1e-6)
    assert worse["fid_random-resnet18"] > 5 * other["fid_random-resnet18"]


def test_paired_ssim_psnr_prefer_the_clean_images(em_sets):
    same = paired_quality(em_sets["a"], em_sets["a"])
    worse = paired_quality(em_sets["degraded"], em_sets["a"])
    assert same == {"ssim": pytest.approx(1.0), "psnr": 100.0}  # identical: capped, not inf
    assert worse["ssim"] < 0.5 < same["ssim"] and worse["psnr"] < 30
    with pytest.raises(ValueError, match="one generated image per real one"):
        paired_quality(em_sets["a"][:3], em_sets["a"][:4])


def test_small_sets_warn_with_the_number_and_stay_finite(em_sets, resnet):
    with pytest.warns(GANMetricWarning, match="only 3 real and 2 generated"):
        scores = image_quality(em_sets["b"][:2], em_sets["a"][:3], resnet, "random-resnet18")
    assert all(math.isfinite(v) for v in scores.values()) and len(scores) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GANMetricWarning)
        one = image_quality(em_sets["b"][:1], em_sets["a"][:1], resnet, "random-resnet18")
    assert all(math.isfinite(v) for v in one.values()) and "kid_random-resnet18" in one
    with pytest.raises(ValueError, match="no generated images"):
        image_quality(em_sets["b"][:0], em_sets["a"], resnet)


def test_kid_subsets_fit_unequal_small_sets():
    g = torch.Generator().manual_seed(0)
    f_real, f_fake = torch.randn(7, 16, generator=g), torch.randn(30, 16, generator=g) + 1.0
    mean, std = kid_from_features(f_real, f_fake, subsets=20)  # torch-fidelity's default subset size is 1000
    assert math.isfinite(mean) and mean > 0 and std > 0


def test_small_set_fid_equals_torch_fidelity():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(1)
    f_real, f_fake = (
        torch.randn(9, 64, generator=g).double(),
        torch.randn(13, 64, generator=g).double() * 1.5 + 0.3,
    )
    reference = fid_statistics_to_metric(
        fid_features_to_statistics(f_real), fid_features_to_statistics(f_fake), False
    )
    assert fid_from_features(f_real, f_fake) == pytest.approx(
        reference["frechet_inception_distance"], rel=1e-6
    )


def test_gray_goes_to_three_channels_and_the_extractor_is_fixed(em_sets, resnet):
    gray = em_sets["a"][:3]
    f_gray, logits = resnet.embed(gray)
    f_rgb = resnet(gray.repeat(1, 3, 1, 1))
    assert f_gray.shape == (3, 512) and logits.shape == (3, 1000)
    torch.testing.assert_close(f_gray, f_rgb)
    torch.manual_seed(123)  # the global seed must not change the extractor's weights
    torch.testing.assert_close(build_feature_extractor("random-resnet18")(gray), f_gray)
    big = torch.nn.functional.interpolate(gray, size=(256, 256), mode="bilinear")
    assert resnet(big).shape == (3, 512)  # any input size is resized to the extractor's


def test_missing_inception_weights_error_names_the_file(tmp_path, monkeypatch):
    empty = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(empty))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere must not hide TORCH_HOME
    with pytest.raises(MissingWeightsError) as err:
        build_feature_extractor("inception", allow_download=False)
    message = str(err.value)
    assert INCEPTION_WEIGHTS_FILE in message and str(empty / "hub" / "checkpoints") in message
    assert "\n" not in message
    with pytest.raises(MissingWeightsError, match="not found: .*nowhere.pth"):
        build_feature_extractor("inception", weights_path=str(tmp_path / "nowhere.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not weights")
    with pytest.raises(MissingWeightsError, match="junk.pth is not a torch weights file"):
        build_feature_extractor("inception", weights_path=str(junk))


def test_inception_reads_a_local_weights_file(tmp_path, em_sets):
    # A file with the right tensors (random values) stands in for the 95 MB download.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Shell(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            return None

    torch.save({}, tmp_path / "empty.pth")
    shell = Shell("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    weights = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(shell.state_dict(), weights)
    inception = build_feature_extractor("inception", weights_path=str(weights))
    features, logits = inception.embed(em_sets["a"][:2])  # gray, 64 px -> RGB uint8, 299 px inside
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all()


def test_npssegnet_encoder_extractor(tmp_path, em_sets):
    from tgan_ray.models.npssegnet import create_segmenter, save_segmenter

    path = save_segmenter(
        create_segmenter("unetplusplus", "resnet18"), tmp_path / "seg.pt", meta={"data": {"image_size": SIZE}}
    )
    name = f"npssegnet:{path}"
    extractor = build_feature_extractor(name)
    assert extractor_label(name) == "npssegnet-seg"
    scores = image_quality(em_sets["degraded"], em_sets["a"], extractor, name)
    assert set(scores) == {f"{m}_npssegnet-seg" for m in ("fid", "kid", "kid_std", "is", "is_std")}
    assert all(math.isfinite(v) for v in scores.values())
    assert (
        image_quality(em_sets["a"], em_sets["a"], extractor, name)["fid_npssegnet-seg"]
        < scores["fid_npssegnet-seg"]
    )
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_feature_extractor(f"npssegnet:{tmp_path / 'missing.pt'}")


def test_unknown_extractor_lists_the_choices():
    with pytest.raises(KeyError, match="random-resnet18, inception, npssegnet"):
        build_feature_extractor("vgg")
