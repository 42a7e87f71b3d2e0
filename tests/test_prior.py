"""Steps 2 -> 4: the morphology prior of rough masks and the random masks sampled from it."""

import json

import numpy as np
import pytest
from skimage.draw import ellipse
from skimage.measure import label

from tgan_ray.masks import (
    MorphologyPrior,
    NoParticlesError,
    compare_to_prior,
    sample_mask,
    sample_mask_at,
    sample_masks,
)


def rough_masks(seed=0, n_masks=4, size=192, n=30, clustered=False):
    """Masks of rough-edged ellipses: log-normal sizes (median 10 px), axis ratios 1-2, some cut by the border."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(n_masks):
        mask = np.zeros((size, size), bool)
        centres = rng.uniform(0, size, (n, 2))
        if clustered:  # a few tight groups
            parents = rng.uniform(0, size, (max(1, n // 6), 2))
            centres = parents[rng.integers(0, len(parents), n)] + rng.normal(0, 8, (n, 2))
        for cy, cx in centres:
            d = np.exp(rng.normal(np.log(10), 0.3))
            ar = 1 + rng.gamma(2.0, 0.2)
            rr, cc = ellipse(
                cy, cx, d / 2 * np.sqrt(ar), d / 2 / np.sqrt(ar), (size, size), rng.uniform(0, np.pi)
            )
            mask[rr, cc] = True
        masks.append(mask)
    return masks


@pytest.fixture(scope="module")
def prior():
    return MorphologyPrior.from_masks(rough_masks())


def test_border_particles_count_for_density_not_shape():
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True  # inside
    mask[0:6, 40:50] = True  # cut by the top border
    prior = MorphologyPrior.from_masks([mask])
    assert prior.n_particles == 1
    assert prior.particles["area"] == [100.0]
    assert prior.images[0]["count"] == 2
    assert prior.densities[0] == pytest.approx(2 / 64**2)
    assert len(prior.nn_spacing) == 2  # both are neighbours


def test_measures_known_shapes():
    mask = np.zeros((200, 200), bool)
    rr, cc = ellipse(100, 100, 20, 10, rotation=0.0)  # semi-axes 20 (rows) and 10 (cols)
    mask[rr, cc] = True
    prior = MorphologyPrior.from_masks([mask])
    p = {k: v[0] for k, v in prior.particles.items()}
    assert p["axis_ratio"] == pytest.approx(2.0, rel=0.05)
    assert p["diameter"] == pytest.approx(2 * np.sqrt(200), rel=0.05)
    assert abs(abs(p["orientation"]) - 0.0) < 0.05  # major axis along rows
    assert p["solidity"] > 0.95 and p["roughness"] < 0.03


def test_labels_input_keeps_touching_particles_apart():
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 10:20], labels[10:20, 20:30] = 1, 2  # touching squares, distinct labels
    assert MorphologyPrior.from_masks([labels]).n_particles == 2
    assert MorphologyPrior.from_masks([labels > 0]).n_particles == 1
    png = (labels > 0).astype(np.uint8) * 255  # a 0/255 mask read from a PNG is a plain mask, not labels
    assert MorphologyPrior.from_masks([png]).n_particles == 1


def test_round_trip_dict_json_file(prior, tmp_path):
    data = json.loads(json.dumps(prior.to_dict()))
    again = MorphologyPrior.from_dict(data)
    assert again.to_dict() == prior.to_dict()
    path = prior.save(tmp_path / "sub" / "prior.json")
    assert MorphologyPrior.load(path).to_dict() == prior.to_dict()
    assert data["summary"]["particles"] == prior.n_particles
    with pytest.raises(FileNotFoundError, match="morphology prior not found"):
        MorphologyPrior.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        MorphologyPrior.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not a morphology prior"):
        MorphologyPrior.from_dict({"particles": {}})


def test_sampled_masks_follow_the_prior(prior):
    masks = [m for m, _ in sample_masks(prior, 40, 192, seed=3)]
    ks = compare_to_prior(prior, masks)
    assert set(ks) == {"diameter", "axis_ratio", "solidity", "roughness", "nn_spacing", "density"}
    assert ks["diameter"] < 0.25 and ks["axis_ratio"] < 0.25, ks
    assert ks["solidity"] < 0.25 and ks["nn_spacing"] < 0.25, ks


def test_sampled_masks_are_not_copies(prior):
    inputs = rough_masks()
    sampled = [sample_mask_at(prior, 192, 0, i)[0] for i in range(10)]
    for s in sampled:
        for m in inputs:
            assert (s & m).sum() / max((s | m).sum(), 1) < 0.5

    # Particles are redrawn, not pasted: few (area, axis ratio, roughness) rows recur exactly. Some do by chance,
    # as a few-pixel particle has only so many rasterised shapes.
    def rows(p):
        return set(zip(*(p.particles[k] for k in ("area", "axis_ratio", "roughness")), strict=True))

    drawn = MorphologyPrior.from_masks(sampled)
    assert len(rows(drawn) & rows(prior)) < 0.1 * drawn.n_particles


def test_same_seed_and_index_same_mask(prior):
    a_mask, a_labels = sample_mask_at(prior, (96, 128), seed=7, index=5)
    b_mask, b_labels = sample_mask_at(prior, (96, 128), seed=7, index=5)
    assert a_mask.shape == (96, 128) and a_mask.dtype == bool and a_labels.dtype == np.int32
    assert np.array_equal(a_mask, b_mask) and np.array_equal(a_labels, b_labels)
    assert not np.array_equal(a_mask, sample_mask_at(prior, (96, 128), seed=7, index=6)[0])
    assert not np.array_equal(a_mask, sample_mask_at(prior, (96, 128), seed=8, index=5)[0])
    # The stream is the same whether drawn in order or by index (Ray shards draw by index).
    streamed = [m for m, _ in sample_masks(prior, 6, (96, 128), seed=7)]
    assert np.array_equal(streamed[5], a_mask)


def test_labels_and_mask_agree_and_particles_stay_apart(prior):
    mask, labels = sample_mask(prior, 192, np.random.default_rng(0))
    assert np.array_equal(mask, labels > 0)
    assert label(mask, connectivity=2).max() >= labels.max() - 2  # a 1-px gap keeps neighbours apart


def test_border_policy_exclude_keeps_particles_inside(prior):
    for i in range(5):
        _, labels = sample_mask_at(prior, 128, 1, i, border_policy="exclude")
        assert labels.max() > 0
        edges = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        assert not edges.any()
    clipped = [sample_mask_at(prior, 128, 1, i, border_policy="clip")[1] for i in range(5)]
    assert any(np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]]).any() for m in clipped)
    with pytest.raises(ValueError, match="border_policy"):
        sample_mask_at(prior, 128, 1, 0, border_policy="wrap")


def test_clustered_masks_give_clustered_samples():
    clustered = MorphologyPrior.from_masks(rough_masks(seed=1, clustered=True))
    assert clustered.clark_evans < 0.85
    assert clustered.cluster_sigma is not None
    sampled = [sample_mask_at(clustered, 192, 0, i)[0] for i in range(24)]
    r_sampled = MorphologyPrior.from_masks(sampled).clark_evans
    assert abs(r_sampled - clustered.clark_evans) < 0.15, (r_sampled, clustered.clark_evans)


def test_empty_rough_masks_raise_a_clear_error():
    with pytest.raises(NoParticlesError, match="no particle to learn from.*--seed-model"):
        MorphologyPrior.from_masks([np.zeros((64, 64), bool)] * 3)
    only_cut = np.zeros((64, 64), bool)
    only_cut[:5, :5] = True
    with pytest.raises(NoParticlesError, match="all 1 particle\(s\) are cut by the frame border"):
        MorphologyPrior.from_masks([only_cut])
    with pytest.raises(ValueError, match="2-D"):
        MorphologyPrior.from_masks([np.zeros((4, 4, 4))])


def test_empty_mask_cap_is_per_index_and_bounds_the_empty_share():
    from tgan_ray.masks.sampling import sample_capped_mask_at

    # ~9 particles per 192 px frame: about 4 in 5 random 32 px masks draw no particle.
    sparse = MorphologyPrior.from_masks(rough_masks(n_masks=4, size=192, n=9))
    n = 100
    plain = [sample_mask_at(sparse, 32, 5, i)[0] for i in range(n)]
    assert np.mean([not m.any() for m in plain]) > 0.6
    for cap in (0.0, 0.2):
        capped = [sample_capped_mask_at(sparse, 32, 5, i, cap)[0] for i in range(n)]
        share = np.mean([not m.any() for m in capped])
        assert share <= cap + 0.08, (cap, share)
        # a non-empty first draw is kept: the capped stream differs from the plain one only where it was empty
        assert all(np.array_equal(c, p) for c, p in zip(capped, plain, strict=True) if p.any())
    # reproducible from (seed, index) alone, in any order; a cap of 1 is the plain stream
    for i in (3, 41, 97):
        np.testing.assert_array_equal(sample_capped_mask_at(sparse, 32, 5, i, 0.2)[0], capped[i])
        np.testing.assert_array_equal(sample_capped_mask_at(sparse, 32, 5, i, 1.0)[0], plain[i])
    assert any(
        not np.array_equal(sample_capped_mask_at(sparse, 32, 6, i, 0.2)[0], capped[i]) for i in range(8)
    )
    with pytest.raises(ValueError, match="max_empty_fraction=1.5"):
        sample_capped_mask_at(sparse, 32, 5, 0, 1.5)
