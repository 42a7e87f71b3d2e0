"""Post-processing of NPsSegNet masks: what the network marks vs what is reported as a particle."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tgan_ray.config import DataConfig, SegmenterConfig
from tgan_ray.data.tiling import inference_tile_side, tile_image, untile
from tgan_ray.inference import Segmenter, clean_mask
from tgan_ray.models import create_segmenter, save_segmenter


def _disks() -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    mask = ((yy - 20) ** 2 + (xx - 20) ** 2 < 64) | ((yy - 45) ** 2 + (xx - 40) ** 2 < 49)
    mask[20, 20] = False  # a one-pixel hole inside a particle
    mask[5, 55] = mask[60, 3] = mask[61, 3] = True  # specks of noise
    return mask


def test_clean_mask_drops_specks_and_fills_small_holes():
    mask = _disks()
    clean = clean_mask(mask, 10)
    assert not clean[5, 55] and not clean[60:62, 3].any()
    assert clean[20, 20]
    assert clean.sum() == (mask.sum() - 3 + 1)  # both particles kept whole
    np.testing.assert_array_equal(clean_mask(mask, 0), mask)  # 0: every pixel kept
    assert not clean_mask(np.zeros((8, 8), bool), 5).any()


def test_segmenter_applies_the_prior_minimum_at_each_frame_scale(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "npssegnet.pt"
    data = DataConfig(image_size=64, resize_mode="tile", scale=0.5, target_particle_px=None)
    net = create_segmenter("unet", "resnet18", None, decoder_channels=[16, 8, 8, 8, 8])
    save_segmenter(net, path, meta={"data": data.model_dump(mode="json"), "min_particle_px": 4.0})
    seg = Segmenter(path)
    assert seg.min_particle_px == 4.0
    # A frame at scale 0.5: 4 working px are 16 original px, so a 9-px object goes and a 25-px one stays.
    prob = np.zeros((64, 64), np.float32)
    prob[10:13, 10:13] = 0.9
    prob[30:35, 30:35] = 0.9
    mask = seg.to_mask(prob)
    assert not mask[10:13, 10:13].any() and mask[30:35, 30:35].all()


def test_particles_fainter_than_real_ones_are_not_reported(tmp_path):
    """A bright particle stays; a grain of support the network also marked, at a fifth of the real particles'
    contrast, goes (the bar: min_drawn_contrast x the contrast the pipeline wrote into the checkpoint). With no
    reference in the checkpoint, or the bar at 0, every marked object is reported."""
    torch.manual_seed(0)
    data = DataConfig(image_size=64, resize_mode="tile", scale=0.5, target_particle_px=None)
    net = create_segmenter("unet", "resnet18", None, decoder_channels=[16, 8, 8, 8, 8])
    meta = {"data": data.model_dump(mode="json")}
    with_ref = save_segmenter(net, tmp_path / "with.pt", meta={**meta, "particle_contrast": 0.5})
    without = save_segmenter(net, tmp_path / "without.pt", meta=meta)
    image = np.full((64, 64), 0.3, np.float32)
    image[10:18, 10:18] = 0.8  # contrast 0.5: as real particles
    image[40:48, 40:48] = 0.4  # contrast 0.1: under 0.3 x 0.5
    prob = np.zeros_like(image)
    prob[10:18, 10:18] = prob[40:48, 40:48] = 0.9
    mask = Segmenter(with_ref).to_mask(prob, image=image)
    assert mask[10:18, 10:18].all() and not mask[40:48, 40:48].any()
    assert Segmenter(with_ref).to_mask(prob).sum() == 128  # no image: nothing to measure
    assert Segmenter(without).to_mask(prob, image=image).sum() == 128
    off = Segmenter(with_ref, seg_cfg=SegmenterConfig(min_drawn_contrast=0))
    assert off.to_mask(prob, image=image).sum() == 128
    # BF-TEM: dark particles, a negative reference; the same faint grain, now darker than its support, goes.
    dark = Segmenter(save_segmenter(net, tmp_path / "dark.pt", meta={**meta, "particle_contrast": -0.5}))
    mask = dark.to_mask(prob, image=1 - image)
    assert mask[10:18, 10:18].all() and not mask[40:48, 40:48].any()
    # At the working scale (the self-check, later rounds' rough masks): the same test with the ring at RING_PX.
    assert Segmenter(with_ref).drop_faint(prob > 0.5, image).sum() == 64


def test_a_frames_own_rough_particles_set_its_faint_bar(tmp_path):
    """Given the rough segmenter's mask of the frame, the bar is a fraction of that frame's particles' contrast,
    not the stack's: on a frame whose particles are brighter than the stack's median, grains as bright as the
    stack's bar let through are dropped. Too few rough particles to measure: the stack's bar, as before."""
    torch.manual_seed(0)
    data = DataConfig(image_size=64, resize_mode="tile", scale=0.5, target_particle_px=None)
    net = create_segmenter("unet", "resnet18", None, decoder_channels=[16, 8, 8, 8, 8])
    seg = Segmenter(
        save_segmenter(
            net, tmp_path / "m.pt", meta={"data": data.model_dump(mode="json"), "particle_contrast": 0.2}
        )
    )
    image = np.full((96, 96), 0.2, np.float32)
    rough = np.zeros(image.shape, bool)
    for k in range(5):  # the frame's particles: contrast 0.6, three times the stack's median
        image[8 + 16 * k : 14 + 16 * k, 8:14] = 0.8
        rough[8 + 16 * k : 14 + 16 * k, 8:14] = True
    image[40:46, 60:66] = 0.32  # a grain at 0.12: over 0.3 x the stack's 0.2, under 0.3 x the frame's 0.6
    marked = rough.copy()
    marked[40:46, 60:66] = True
    assert seg.drop_faint(marked, image)[40:46, 60:66].all()  # the stack's bar
    kept = seg.drop_faint(marked, image, rough=rough)
    assert not kept[40:46, 60:66].any() and kept[rough].all()
    few = rough.copy()
    few[8 + 16 * 4 :, :] = False  # four particles: not enough to measure the frame by
    assert seg.drop_faint(marked, image, rough=few)[40:46, 60:66].all()


def _tiny_segmenter(tmp_path, **meta_data) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "npssegnet.pt"
    data = {**DataConfig(image_size=64, resize_mode="tile").model_dump(mode="json"), **meta_data}
    net = create_segmenter("unet", "resnet18", None, decoder_channels=[16, 8, 8, 8, 8])
    return save_segmenter(net, path, meta={"data": data})


def test_inference_tiles_cover_a_frame_with_little_overlap_work():
    side = inference_tile_side((1664, 1664), 512, 32)
    assert side == 448  # 4 x 4 tiles of 448 px, not 4 x 4 of 512
    frame = np.random.default_rng(0).random((1664, 1664)).astype(np.float32)
    tiles, tmap = tile_image(frame, side, 32 / side)
    assert tiles.shape == (16, 448, 448) and tiles.size / frame.size < 1.2
    np.testing.assert_allclose(untile(tiles, tmap), frame, atol=1e-6)  # the tiles blend back to the frame
    assert inference_tile_side((1664, 1000), 512, 32) == 448  # square tiles: the longer side decides
    assert inference_tile_side((100, 70), 512, 16) == 128  # a small frame: one tile just larger than it
    assert inference_tile_side((512, 384), 512, 128) == 512  # the paper's resized frame: one tile, as before
    with pytest.raises(ValueError, match="multiple of 32"):
        inference_tile_side((100, 100), 100, 16)


def test_large_inference_tiles_and_bf16_agree_with_training_tiles(tmp_path):
    path = _tiny_segmenter(tmp_path)
    frame = np.random.default_rng(1).random((300, 260)).astype(np.float32)
    small = Segmenter(path, seg_cfg=SegmenterConfig(inference_tile=64, inference_precision="fp32"))
    large = Segmenter(path, seg_cfg=SegmenterConfig(inference_tile=256, inference_precision="fp32"))
    bf16 = Segmenter(path, seg_cfg=SegmenterConfig(inference_tile=256, inference_precision="bf16"))
    assert large.tile(frame)[0].shape == (4, 192, 192)  # 64 px training tiles would take 36
    p_small, p_large, p_bf16 = (s.probability_working(frame) for s in (small, large, bf16))
    assert p_small.shape == p_large.shape == frame.shape
    assert np.abs(p_large - p_small).mean() < 0.02  # only tile borders see other context
    assert np.abs(p_bf16 - p_large).max() < 0.05


def test_checkpoint_of_an_earlier_version_still_loads(tmp_path):
    # data.augment and data.num_loader_workers were dropped from the config after models were saved with them
    path = _tiny_segmenter(tmp_path, augment=True, num_loader_workers=0)
    assert Segmenter(path).data_cfg.image_size == 64


def test_frames_segmented_together_match_frames_segmented_alone(tmp_path):
    seg = Segmenter(_tiny_segmenter(tmp_path), seg_cfg=SegmenterConfig(inference_precision="fp32"))
    rng = np.random.default_rng(2)
    frames = [rng.random(shape).astype(np.float32) for shape in ((100, 100), (300, 260), (100, 100))]
    together = seg.probabilities(frames, [None, 0.5, None])
    alone = [seg.probability(f, s) for f, s in zip(frames, [None, 0.5, None], strict=True)]
    for a, b, f in zip(together, alone, frames, strict=True):
        assert a.shape == f.shape
        np.testing.assert_allclose(a, b, atol=1e-4)
