"""Pseudo-labels of real frames: confident particles, unsure pixels left out of NPsSegNet's loss."""

import numpy as np
import torch

from tgan_ray.data.datasets import SegmentationDataset
from tgan_ray.data.transforms import segmenter_transform
from tgan_ray.masks.pseudo import IGNORE, pseudo_label, read_pseudo_label, write_pseudo_label
from tgan_ray.models.losses import SegmentationLoss


def _disk(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_unsure_pixels_are_what_only_the_loose_setting_finds_and_the_edges():
    confident = _disk((48, 48), (12, 12), 6)
    faint = _disk((48, 48), (34, 34), 5)
    label = pseudo_label(confident, confident | faint, band_px=1)
    assert label[12, 12] == 1  # inside a confident particle
    assert label[12, 18] == IGNORE and label[12, 19] == IGNORE  # its edge, both sides
    assert (label[faint] == IGNORE).all()  # found only at the loosest setting
    assert label[0, 40] == 0 and label[40, 5] == 0  # support
    assert set(np.unique(label)) == {0, 1, IGNORE}


def test_pseudo_label_png_reads_back(tmp_path):
    label = pseudo_label(_disk((32, 32), (16, 16), 5), _disk((32, 32), (16, 16), 8))
    write_pseudo_label(tmp_path / "a.png", label)
    assert np.array_equal(read_pseudo_label(tmp_path / "a.png"), label)


def test_ignored_pixels_do_not_move_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    target = (torch.rand(2, 16, 16) > 0.7).long()
    target[:, :4] = IGNORE
    loss = SegmentationLoss(ignore_index=IGNORE)(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad[:, :, :4].abs().max() == 0  # no gradient from unsure pixels
    assert logits.grad[:, :, 4:].abs().max() > 0
    # with no unsure pixel, the loss is the paper's
    plain = (torch.rand(2, 16, 16) > 0.7).long()
    assert torch.allclose(
        SegmentationLoss(ignore_index=IGNORE)(logits, plain), SegmentationLoss()(logits, plain)
    )


def test_segmentation_dataset_keeps_the_ignore_label_through_augmentation():
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    label = pseudo_label(_disk((32, 32), (16, 16), 6), _disk((32, 32), (16, 16), 9))
    data = SegmentationDataset([image], [label], transform=segmenter_transform(0.0), ignore_label=IGNORE)
    _, y = data[0]
    assert set(torch.unique(y).tolist()) <= {0, 1, IGNORE} and (y == IGNORE).any() and (y == 1).any()
    # without ignore_label every non-zero value is a particle, as before
    _, y = SegmentationDataset([image], [label])[0]
    assert set(torch.unique(y).tolist()) == {0, 1}
