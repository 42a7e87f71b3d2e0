"""Stack splits, tiling/resizing and the way back, augmentation pipelines and torch datasets."""

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from tgan_ray.data.datasets import PairedDataset, SegmentationDataset, UnpairedDataset, fit_to_size, read_gray
from tgan_ray.data.splits import StackSplit, split_stack
from tgan_ray.data.tiling import (
    TileMap,
    resize_to,
    restore,
    sliding_window_predict,
    tile_image,
    to_working_size,
    unresize,
    untile,
)
from tgan_ray.data.transforms import reseed, segmenter_transform, train_transform
from tgan_ray.data.transforms import test_transform as make_test_transform

NAMES = [f"img_{i:02d}.png" for i in range(20)]


# --- splits -------------------------------------------------------------------------------------------------


def test_split_sizes_disjoint_and_complete():
    split = split_stack(NAMES, subset1_size=5, test_fraction=0.2, seed=0)
    assert len(split.subset1) == 5 and len(split.test) == 4 and len(split.subset2) == 11
    assert sorted(split.all) == sorted(NAMES)
    assert len(set(split.all)) == len(NAMES)


def test_split_reproducible_order_independent_and_seeded():
    a = split_stack(NAMES, 5, 0.2, seed=3)
    b = split_stack(list(reversed(NAMES)), 5, 0.2, seed=3)
    c = split_stack(np.random.default_rng(1).permutation(NAMES).tolist(), 5, 0.2, seed=3)
    assert a == b == c
    assert split_stack(NAMES, 5, 0.2, seed=4) != a


def test_split_keeps_one_image_for_subset2():
    split = split_stack(NAMES[:6], subset1_size=5, test_fraction=0.5, seed=0)
    assert len(split.subset1) == 5 and len(split.subset2) == 1 and split.test == []


def test_split_error_names_numbers_and_setting():
    with pytest.raises(
        ValueError, match=r"stack has 3 usable images; subset 1 needs 5 \(data.subset1_size\)"
    ):
        split_stack(NAMES[:3], subset1_size=5, test_fraction=0.2, seed=0)
    with pytest.raises(ValueError, match="duplicate"):
        split_stack(["a", "a", "b"], 1, 0.0, 0)


def test_split_save_load_roundtrip(tmp_path):
    split = split_stack(NAMES, 5, 0.2, seed=0)
    split.save(tmp_path / "run" / "split.json")
    assert StackSplit.load(tmp_path / "run" / "split.json") == split
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        StackSplit.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="not found"):
        StackSplit.load(tmp_path / "missing.json")


# --- tiling -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 256), (300, 200), (97, 131), (40, 50), (1, 7), (64, 64)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_tile_untile_roundtrip_exact(shape, overlap):
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    tiles, tmap = tile_image(image, 64, overlap)
    assert tiles.shape[1:] == (64, 64) and tiles.shape[0] == tmap.n_tiles
    np.testing.assert_allclose(untile(tiles, tmap), image, rtol=0, atol=1e-6)


def test_untile_blends_overlaps_smoothly():
    # Each tile predicts a different constant: the blend must ramp between them, never jump by a full step.
    tiles, tmap = tile_image(np.zeros((200, 200), np.float32), 64, overlap=0.5)
    preds = np.arange(tmap.n_tiles, dtype=np.float32)[:, None, None] * np.ones((1, 64, 64), np.float32)
    blended = untile(preds, tmap)
    n_cols = len({c for _, c in tmap.boxes})  # tiles one row apart differ by n_cols
    assert np.abs(np.diff(blended, axis=1)).max() < 0.2
    assert np.abs(np.diff(blended, axis=0)).max() < 0.2 * n_cols


def test_untile_keeps_channels_and_checks_shape():
    image = np.random.default_rng(1).random((100, 70)).astype(np.float32)
    tiles, tmap = tile_image(image, 32, 0.25)
    two = np.stack([tiles, 1 - tiles], axis=1)
    out = untile(two, tmap)
    assert out.shape == (2, 100, 70)
    np.testing.assert_allclose(out[1], 1 - image, atol=1e-6)
    with pytest.raises(ValueError, match="untile expects"):
        untile(tiles[:-1], tmap)


def test_resize_mapping_gives_effective_pixel_size():
    frame = np.random.default_rng(0).random((2048, 2048)).astype(np.float32)
    small, tmap = resize_to(frame, 512)
    assert small.shape == (512, 512) and small.dtype == np.float32
    assert tmap.scale == 4.0
    assert tmap.effective_pixel_size_nm(0.25) == pytest.approx(1.0)
    assert tile_image(frame[:128, :128], 64)[1].effective_pixel_size_nm(0.25) == 0.25


def test_resize_non_square_pads_and_maps_back():
    mask = np.zeros((300, 200), bool)
    mask[100:160, 70:150] = True  # clear of the reflected border strip
    small, tmap = resize_to(mask, 60, order=0)
    assert small.dtype == bool and small.shape == (60, 60)
    assert tmap.scale == pytest.approx(5.0) and tmap.pad == (0, 0, 50, 50)
    back = unresize(small, tmap, order=0)
    assert back.shape == mask.shape
    assert (back == mask).mean() > 0.99
    # A 60x80 px particle is 12x16 px at working scale: sizes scale with the one factor.
    assert small.sum() == pytest.approx(mask.sum() / 25, rel=0.1)


@pytest.mark.parametrize("mode", ["resize", "tile"])
def test_to_working_size_and_restore(mode, tmp_path):
    image = np.random.default_rng(2).random((150, 150)).astype(np.float32)
    tiles, tmap = to_working_size(image, 64, mode=mode, overlap=0.25)
    assert tiles.shape[1:] == (64, 64)
    assert restore(tiles, tmap).shape == image.shape
    assert TileMap.from_dict(tmap.to_dict()) == tmap
    if mode == "tile":
        np.testing.assert_allclose(restore(tiles, tmap), image, atol=1e-6)
    with pytest.raises(ValueError, match="data.resize_mode"):
        to_working_size(image, 64, mode="stretch")


@pytest.mark.parametrize("shape", [(200, 170), (30, 45)])
def test_sliding_window_predict_numpy_and_torch(shape):
    image = np.random.default_rng(3).random(shape).astype(np.float32)
    calls = []

    def square(batch):
        calls.append(batch.shape)
        return batch**2

    prob = sliding_window_predict(square, image, tile=64, overlap=0.25, batch_size=3)
    assert prob.shape == shape and prob.dtype == np.float32
    np.testing.assert_allclose(prob, image**2, atol=1e-5)
    assert all(c[0] <= 3 and c[1:] == (1, 64, 64) for c in calls)

    def torch_fn(batch):
        assert isinstance(batch, torch.Tensor)
        return torch.sigmoid(batch)[:, 0]

    prob_t = sliding_window_predict(torch_fn, image, tile=64, overlap=0.5, as_torch=True)
    np.testing.assert_allclose(prob_t, 1 / (1 + np.exp(-image)), atol=1e-5)


def test_sliding_window_predict_checks_output_shape():
    with pytest.raises(ValueError, match="predict_fn returned shape"):
        sliding_window_predict(lambda b: b[:, :, :10], np.zeros((64, 64), np.float32), tile=32)


# --- transforms ---------------------------------------------------------------------------------------------


def _blobs(size=64, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(6):
        r, c = rng.integers(8, size - 8, 2)
        mask[r - 5 : r + 5, c - 3 : c + 4] = 1
    return mask


def test_train_transform_keeps_image_and_mask_aligned():
    aug = train_transform(p=1.0, noise_std_range=(0.0, 0.0), seed=0)
    mask = _blobs()
    image = mask.astype(np.float32) * 0.8 + 0.1  # an image shaped exactly like its mask
    for _ in range(10):
        out = aug(image=image, mask=mask)
        assert out["image"].dtype == np.float32 and out["mask"].dtype == np.uint8
        assert set(np.unique(out["mask"])) <= {0, 1}  # nearest neighbour: the mask stays binary
        agreement = ((out["image"] > 0.5) == (out["mask"] > 0)).mean()
        assert agreement > 0.99


def test_noise_is_image_only_and_clipped():
    aug = train_transform(p=1.0, noise_std_range=(0.1, 0.1), seed=1)
    mask = _blobs()
    image = np.full(mask.shape, 0.5, np.float32)
    changed = 0
    for _ in range(5):
        out = aug(image=image, mask=mask)
        assert 0.0 <= out["image"].min() and out["image"].max() <= 1.0
        changed += out["image"].std() > 0.05
        # A uniform image: any geometric move leaves it uniform, so what is left is noise; the mask is untouched
        # by noise and keeps its area up to the geometric resampling.
        assert abs(int(out["mask"].sum()) - int(mask.sum())) < 0.3 * mask.sum()
    assert changed == 5


def test_segmenter_transform_adds_the_measured_noise_and_varies_exposure():
    mask = _blobs()
    flat = np.full(mask.shape, 0.5, np.float32)
    aug = segmenter_transform(noise_std=0.05, seed=0)
    outs = [aug(image=flat, mask=mask) for _ in range(40)]
    # Noise std drawn from [0.75, 1.5] x 0.05 (p=0.9): far above the paper's 0.012-0.028 range.
    noisy = [o["image"].std() for o in outs if o["image"].std() > 0.01]
    assert len(noisy) >= 30 and 0.02 < np.median(noisy) < 0.08
    means = [o["image"].mean() for o in outs]
    assert np.ptp(means) > 0.1  # brightness / gamma move the whole frame
    for o in outs:
        assert 0.0 <= o["image"].min() and o["image"].max() <= 1.0
        assert abs(int(o["mask"].sum()) - int(mask.sum())) < 0.3 * mask.sum()


def test_reseed_gives_steps_one_shared_stream():
    # albumentations' Compose(seed=) starts both flips on the same stream, so they always fire together.
    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    reseed(pipeline, 0)
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    combos = set()
    for _ in range(40):
        out = pipeline(image=image)["image"]
        combos.add((bool(out[0, 0] > out[0, 3]), bool(out[0, 0] > out[3, 0])))
    assert len(combos) == 4


def test_train_transform_steps_fire_independently():
    aug = train_transform(p=0.5, noise_std_range=(0.2, 0.2), seed=0)
    ramp = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    combos = set()
    for _ in range(60):
        out = aug(image=ramp)["image"]
        flipped = out[16, 2] > out[16, 29]
        noisy = np.abs(np.diff(out[5, 10:20])).mean() > 0.1
        combos.add((bool(flipped), bool(noisy)))
    assert len(combos) == 4


def test_test_transform_is_identity():
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    mask = _blobs(32)
    out = make_test_transform()(image=image, mask=mask)
    np.testing.assert_array_equal(out["image"], image)
    np.testing.assert_array_equal(out["mask"], mask)


# --- datasets -----------------------------------------------------------------------------------------------


def _pairs(n=3, size=80):
    masks = [_blobs(size, seed=i) for i in range(n)]
    images = [(m * 200 + 30).astype(np.uint8) for m in masks]
    return images, masks


def test_paired_dataset_shapes_ranges_and_alignment():
    images, masks = _pairs()
    ds = PairedDataset(images, masks, transform=train_transform(noise_std_range=(0.0, 0.0)), size=48, seed=0)
    assert len(ds) == 3
    item = ds[1]
    assert item["image"].shape == item["mask"].shape == (1, 48, 48)
    assert item["label"].shape == (48, 48) and item["label"].dtype == torch.int64
    assert item["image"].dtype == item["mask"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(item["label"], (item["mask"][0] > 0).long())
    assert ((item["image"][0] > 0) == (item["label"] > 0)).float().mean() > 0.98


def test_unsure_mask_regions_reach_pix2pix_as_a_third_value():
    """pix2pix.unsure_input: what step 2 is unsure of is 0 in the generator's input (between background -1 and
    particle 1), moves with the image under augmentation, and is not a particle in the label."""
    images, masks = _pairs(n=1, size=64)
    mask = masks[0].astype(np.uint8)
    mask[:, :32][mask[:, :32] == 0] = 255  # the left half's background is unsure
    image = images[0].copy()
    image[:, :32] = 250  # ... and bright in the image, so that alignment can be checked
    ds = PairedDataset(
        [image],
        [mask],
        transform=train_transform(noise_std_range=(0.0, 0.0)),
        size=64,
        seed=3,
        unsure_label=255,
    )
    for epoch in range(3):
        ds.set_epoch(epoch)
        item = ds[0]
        unsure = item["mask"][0] == 0
        assert set(item["mask"].unique().tolist()) <= {-1.0, 0.0, 1.0} and unsure.any()
        assert (item["label"][unsure] == 0).all()
        assert (item["image"][0][unsure] > 0).float().mean() > 0.95  # the bright half moved with it
    plain = PairedDataset([image], [mask], size=64, train=False)[
        0
    ]  # no unsure_label: any value > 0 is a particle
    assert set(plain["mask"].unique().tolist()) == {-1.0, 1.0}


def test_seeded_items_are_reproducible_and_vary_by_epoch():
    images, masks = _pairs(size=120)
    ds = PairedDataset(images, masks, transform=train_transform(), size=48, seed=7)
    first = ds[0]["image"]
    assert torch.equal(first, ds[0]["image"])
    ds.set_epoch(1)
    assert not torch.equal(first, ds[0]["image"])


def test_dataset_loads_png_files_lazily(tmp_path):
    images, masks = _pairs(n=2, size=70)
    img_paths, mask_paths = [], []
    for i, (im, m) in enumerate(zip(images, masks, strict=True)):
        img_paths.append(tmp_path / f"im{i}.png")
        mask_paths.append(tmp_path / f"m{i}.png")
        Image.fromarray(im.astype(np.uint16) * 257).save(img_paths[-1])  # 16-bit PNG
        Image.fromarray(m * 255).save(mask_paths[-1])
    ds = SegmentationDataset(img_paths, mask_paths, size=64, train=False)
    image, label = ds[0]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert label.shape == (64, 64) and set(label.unique().tolist()) <= {0, 1}
    expected_image, expected_mask = fit_to_size(images[0] / 255, masks[0], 64, False, "crop", None)
    np.testing.assert_allclose(image[0].numpy(), expected_image, atol=1e-4)
    np.testing.assert_array_equal(label.numpy(), expected_mask)


def test_read_gray_returns_what_the_pipeline_wrote_in_its_dtype(tmp_path):
    """The training loaders read run files through io.read_image; the values must come back bit for bit."""
    import tifffile

    from tgan_ray.io import write_mask_png, write_png

    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (33, 47), dtype=np.uint8)
    grey16 = rng.integers(0, 65536, (33, 47), dtype=np.uint16)
    unit = rng.random((33, 47), dtype=np.float32)
    write_png(tmp_path / "virtual.png", grey8)
    write_png(tmp_path / "deep.png", grey16)
    write_mask_png(tmp_path / "mask.png", grey8 > 128)
    tifffile.imwrite(tmp_path / "deep.tif", grey16)
    tifffile.imwrite(tmp_path / "unit.tif", unit)
    Image.fromarray(np.stack([grey8] * 3, -1)).save(tmp_path / "rgb.png")
    expected = {
        "virtual.png": grey8,
        "deep.png": grey16,
        "mask.png": (grey8 > 128).astype(np.uint8) * 255,
        "deep.tif": grey16,
        "unit.tif": unit,
        "rgb.png": grey8,  # grey stored as RGB comes back unchanged
    }
    for name, want in expected.items():
        got = read_gray(tmp_path / name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    (tmp_path / "cut.png").write_bytes((tmp_path / "virtual.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.png"):
        read_gray(tmp_path / "cut.png")


def test_segmentation_dataset_pads_small_and_resizes_big():
    images, masks = _pairs(n=1, size=40)
    image, label = SegmentationDataset(images, masks, size=64)[0]
    assert image.shape == (1, 64, 64) and label.shape == (64, 64)
    big_images, big_masks = _pairs(n=1, size=200)
    image, label = SegmentationDataset(big_images, big_masks, size=50, fit="resize", train=False)[0]
    assert image.shape == (1, 50, 50)
    assert label.sum() == pytest.approx(big_masks[0].sum() / 16, rel=0.2)


def test_unpaired_dataset_draws_b_at_random():
    a = [np.full((40, 40), i / 10, np.float32) for i in range(3)]
    b = [np.full((40, 40), 0.5 + i / 20, np.float32) for i in range(7)]
    ds = UnpairedDataset(a, b, size=32, seed=0)
    assert len(ds) == 7
    item = ds[4]
    assert item["A"].shape == item["B"].shape == (1, 32, 32)
    assert item["A"][0, 0, 0].item() == pytest.approx(2 * (4 % 3) / 10 - 1, abs=1e-6)
    drawn = {round(ds[i]["B"][0, 0, 0].item(), 4) for i in range(7)}
    ds.set_epoch(1)
    drawn |= {round(ds[i]["B"][0, 0, 0].item(), 4) for i in range(7)}
    assert len(drawn) > 3  # not a fixed pairing
    assert torch.equal(UnpairedDataset(a, b, size=32, seed=0)[4]["B"], item["B"])


def test_dataset_errors_name_the_culprit(tmp_path):
    images, masks = _pairs(n=2)
    with pytest.raises(ValueError, match="2 images but 1 masks"):
        PairedDataset(images, masks[:1])
    with pytest.raises(ValueError, match=r"image #0 is float with range"):
        SegmentationDataset([images[0].astype(np.float32)], masks[:1])[0]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        SegmentationDataset([tmp_path / "nope.png"], masks[:1])[0]
    with pytest.raises(ValueError, match="mask"):
        PairedDataset(images[:1], [masks[0][:10]])[0]


def test_dataloader_batches(tmp_path):
    images, masks = _pairs(n=4, size=64)
    ds = SegmentationDataset(images, masks, transform=train_transform(), size=32)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert x.shape == (4, 1, 32, 32) and y.shape == (4, 32, 32)
