"""Post-processing of NPsSegNet masks: what the network marks vs what is reported as a particle."""

import numpy as np
import torch

from tgan_ray.config import DataConfig
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
