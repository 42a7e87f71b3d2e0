"""The run's self-check, on synthetic stacks built to pass and to fail (the exact masks are known)."""

import numpy as np
import pytest
from skimage.measure import label

from tgan_ray.analysis import selfcheck
from tgan_ray.data.synthetic import SynthConfig, make_image
from tgan_ray.masks import ClassicalSegmenter


@pytest.fixture(scope="module")
def stack():
    cfg = SynthConfig(modality="haadf", size=192, pixel_size_nm=0.5, mean_diameter_nm=6.0, snr=6.0)
    frames = [make_image(cfg, rng=seed) for seed in range(4)]
    images = [f[0] for f in frames]
    truth = [f[1] for f in frames]
    rough = ClassicalSegmenter("bright")
    contrast, radii = rough.stack_radii(images)
    confident = [rough.segment(im, radii, contrast) for im in images]
    return {"images": images, "truth": truth, "confident": confident, "diameter": 2 * float(np.median(radii))}


_particles = selfcheck.label_free_particles


def _keep_a_third(mask):
    labels = label(mask)
    return mask & (labels % 3 == 0)


def test_masks_that_find_the_rough_particles_pass(stack):
    plausibility = selfcheck.rough_plausibility(stack["images"], stack["confident"], stack["diameter"])
    agreement = selfcheck.confident_recall(_particles(stack["truth"]), stack["confident"])
    check = selfcheck.verdict(plausibility, agreement)
    assert plausibility["ok"], plausibility["reasons"]
    assert agreement["confident"] > 10 and agreement["recall"] > 0.9
    assert check["verdict"] == "ok" and check["warning"] is None


def test_masks_that_miss_the_rough_particles_warn(stack):
    plausibility = selfcheck.rough_plausibility(stack["images"], stack["confident"], stack["diameter"])
    for worse in ([_keep_a_third(m) for m in stack["truth"]], [np.zeros_like(m) for m in stack["truth"]]):
        check = selfcheck.verdict(
            plausibility, selfcheck.confident_recall(_particles(worse), stack["confident"])
        )
        assert check["verdict"] == "check"
        assert "miss" in check["warning"] and "tgan segment --rough" in check["warning"]
        assert "\n" not in check["warning"]


def test_masks_mostly_of_false_particles_warn(stack):
    """Label-free particles with no classical candidate under them: a few are fine, most of them warn."""
    rough = ClassicalSegmenter("bright", confidence=0.0)
    contrast, radii = rough.stack_radii(stack["images"])
    candidates = [rough.segment(im, radii, contrast) for im in stack["images"]]
    plausibility = selfcheck.rough_plausibility(stack["images"], stack["confident"], stack["diameter"])
    agreement = selfcheck.confident_recall(_particles(stack["truth"]), stack["confident"])
    support = selfcheck.supported_share(_particles(stack["truth"]), candidates)
    assert support["share"] > 0.9
    assert selfcheck.verdict(plausibility, agreement, support=support)["verdict"] == "ok"
    yy, xx = np.mgrid[:192, :192]
    flooded = []
    for truth, cand in zip(stack["truth"], candidates):
        extra = np.zeros_like(truth, bool)
        for y in range(8, 192, 16):
            for x in range(8, 192, 16):
                disc = (yy - y) ** 2 + (xx - x) ** 2 <= 9
                if not (ndi_dilate(truth | cand) & disc).any():
                    extra |= disc
        flooded.append(truth | extra)
    support = selfcheck.supported_share(_particles(flooded), candidates)
    assert support["share"] < 0.5
    check = selfcheck.verdict(plausibility, agreement, support=support)
    assert check["verdict"] == "check" and "no classical candidate" in check["warning"]


def ndi_dilate(mask):
    from scipy import ndimage as ndi

    return ndi.binary_dilation(mask, iterations=2)


def test_swollen_or_merged_particles_count_as_missed(stack):
    """Masks that cover every confident particle but are three times too wide match none of them at IoU 0.3."""
    from scipy import ndimage as ndi

    swollen = [ndi.binary_dilation(m, iterations=6) for m in stack["truth"]]
    agreement = selfcheck.confident_recall(_particles(swollen), stack["confident"])
    assert agreement["recall"] < 0.5
    plausibility = selfcheck.rough_plausibility(stack["images"], stack["confident"], stack["diameter"])
    assert selfcheck.verdict(plausibility, agreement)["verdict"] == "check"


def test_a_step2_of_one_particle_or_of_support_texture_warns(stack):
    one = [np.zeros_like(m) for m in stack["confident"]]
    one[0] = label(stack["confident"][0]) == 1
    check = selfcheck.rough_plausibility(stack["images"], one, stack["diameter"])
    assert not check["ok"] and "1 particle(s) in 4 frame(s)" in check["reasons"][0]
    # "particles" of the wrong size: blobs 4x the stack's scale
    assert not selfcheck.rough_plausibility(stack["images"], stack["confident"], stack["diameter"] / 4)["ok"]
    # "particles" that are support: random discs with no contrast of their own
    texture = [np.zeros_like(m) for m in stack["truth"]]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:192, :192]
    for t, truth in zip(texture, stack["truth"]):
        for _ in range(12):
            y, x = rng.integers(10, 182, 2)
            disc = (yy - y) ** 2 + (xx - x) ** 2 <= 16
            if not (disc & truth).any():
                t |= disc
    check = selfcheck.rough_plausibility(stack["images"], texture, stack["diameter"])
    assert not check["ok"] and any("support texture" in r for r in check["reasons"])


def test_uncertainty_is_the_unsure_share_of_marked_pixels():
    p = np.zeros((10, 10), np.float32)
    assert selfcheck.uncertainty(p) == 0.0
    p[:5] = 0.95
    assert selfcheck.uncertainty(p) == 0.0
    p[5:7] = 0.5
    assert selfcheck.uncertainty(p) == pytest.approx(20 / 70)


def _discs(shape, centres, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return np.any([(yy - y) ** 2 + (xx - x) ** 2 <= radius**2 for y, x in centres], axis=0)


def test_merge_with_rough_lets_the_network_lead_unless_it_misses_most_rough_particles():
    shape, rough_centres = (96, 96), [(16, 16), (16, 48), (48, 16), (48, 48)]
    rough = _discs(shape, rough_centres, 5)
    extra = _discs(shape, [(80, 80)], 5)  # a particle only the network finds

    # The network finds 3 of the 4 rough particles, drawn larger: it leads, keeps its outlines, and gains the 4th.
    network = _discs(shape, rough_centres[:3], 6) | extra
    merged, lead = selfcheck.merge_with_rough(network, rough)
    assert lead == selfcheck.LEAD_NETWORK
    np.testing.assert_array_equal(merged, network | _discs(shape, rough_centres[3:], 5))

    # It finds 1 of 4: the rough masks lead, and the network adds only what touches none of them.
    network = _discs(shape, rough_centres[:1], 6) | extra
    merged, lead = selfcheck.merge_with_rough(network, rough)
    assert lead == selfcheck.LEAD_ROUGH
    np.testing.assert_array_equal(merged, rough | extra)

    # A frame without rough particles: nothing to check the network against, so it leads.
    merged, lead = selfcheck.merge_with_rough(extra, np.zeros(shape, bool))
    assert lead == selfcheck.LEAD_NETWORK and (merged == extra).all()


def test_a_candidate_both_segmenters_see_is_added_and_no_other():
    """add_agreed_candidates: a loose rough blob that touches none of the mask's particles is added where
    NPsSegNet's probability passes 0.2 somewhere in it; one the network gives 0.2 or less, or one that touches a
    particle of the mask (whose outline stays the mask's), is not."""
    mask = np.zeros((60, 60), bool)
    mask[5:15, 5:15] = True  # a particle of the merged mask
    candidates = np.zeros_like(mask)
    candidates[3:17, 3:17] = True  # a looser outline of the same particle
    candidates[30:38, 5:13] = True  # seen by both
    candidates[30:38, 40:48] = True  # a blob of support the network does not mark
    probability = np.full(mask.shape, 0.05, np.float32)
    probability[33, 8] = 0.3  # one pixel is enough: the blob's outline is the rough segmenter's
    probability[30:38, 40:48] = selfcheck.CANDIDATE_PROBABILITY  # not above it
    probability[3:17, 3:17] = 0.9
    out = selfcheck.add_agreed_candidates(mask, candidates, probability)
    expected = mask.copy()
    expected[30:38, 5:13] = True
    assert np.array_equal(out, expected)
    assert np.array_equal(selfcheck.add_agreed_candidates(mask, np.zeros_like(mask), probability), mask)
