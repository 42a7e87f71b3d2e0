"""The ablation (paper Figure 3) end to end on a tiny synthetic stack, on a real local Ray, and its helpers."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from tgan_ray.ablation import plan_subsets, run_ablation
from tgan_ray.ablation_scores import held_out_crops
from tgan_ray.config import load_config
from tgan_ray.data.synthetic import make_stack

_TINY_GAN = {
    "epochs": 1,
    "epochs_decay": 0,
    "steps_per_epoch": 2,
    "batch_size": 2,
    "eval_every": 1,
    "eval_images": 8,
}


def test_plan_subsets_drops_sizes_that_do_not_fit():
    logged = []
    assert plan_subsets(12, (5, 10, 20, 40, None), logged.append) == [5, 10, 12]
    assert any("20" in line for line in logged) and any("40" in line for line in logged)
    assert plan_subsets(6, (3, 6, None), logged.append) == [3, 6]  # 'all' = 6 is counted once
    with pytest.raises(ValueError, match="size 0 must be >= 1"):
        plan_subsets(6, (0, 3))
    with pytest.raises(ValueError, match="no ablation subset size .* fits the 4 training images"):
        plan_subsets(4, (5, 10), logged.append)


def test_held_out_crops_stay_inside_the_frame():
    image = np.arange(96 * 80, dtype=np.float32).reshape(96, 80)
    mask = (image % 7 == 0).astype(np.uint8)
    crops, masks = held_out_crops(image, mask, 64)
    assert crops.shape == (4, 64, 64) and masks.shape == crops.shape
    assert crops[0, 0, 0] == image[0, 0] and crops[-1, -1, -1] == image[-1, -1]  # corners, no padding
    assert np.array_equal(masks[-1], mask[32:, 16:])
    small, _ = held_out_crops(image[:40, :40], mask[:40, :40], 64)  # smaller than a crop: padded once
    assert small.shape == (1, 64, 64)


def test_ablation_writes_one_row_per_variant_and_resumes(ray_local, tmp_path):
    stack = make_stack(tmp_path / "stack", n=8, size=96, seed=3)
    overrides = {
        "data.real_crops": 12,
        "prior.n_masks": 16,
        "ray.num_workers": 1,
        "ray.cpus_per_worker": 0.5,
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        **{f"{stage}.{k}": v for stage in ("pix2pix", "cyclegan") for k, v in _TINY_GAN.items()},
    }
    cfg = load_config("quick", overrides=overrides)
    out = tmp_path / "ablation"
    table = run_ablation(str(stack / "images"), out, cfg, subset_sizes=(3, 6, 20), log=lambda m: None)

    assert list(table["variant"]) == ["pix2pix-3", "pix2pix-6", "pix2pix-3+cyclegan"]  # 20 > 6 is dropped
    assert list(table["train_images"]) == [3, 6, 3]
    metrics = ["fid_random-resnet18", "kid_random-resnet18", "is_random-resnet18", "ssim", "psnr"]
    assert all(math.isfinite(v) for v in table[metrics].to_numpy().ravel())
    assert table["n_real"].nunique() == 1 and table["n_real"].iloc[0] >= 2  # crops of the 2 held-out frames
    on_disk = pd.read_csv(out / "ablation.csv")
    assert list(on_disk["variant"]) == list(table["variant"])
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["extractor"] == "random-resnet18" and len(saved["rows"]) == 3
    assert not set(saved["held_out"]) & set(saved["training_pool"])
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logged: list[str] = []
    again = run_ablation(str(stack / "images"), out, cfg, subset_sizes=(3, 6), log=logged.append)
    assert sum("skipped" in line for line in logged) >= 7  # stack, prior, 2 pix2pix, gen1, cyclegan, scores
    pd.testing.assert_frame_equal(again, table)
    with pytest.raises(ValueError, match="smallest subset of 3 images, now 6; use a new output folder"):
        run_ablation(str(stack / "images"), out, cfg, subset_sizes=(6,), log=lambda m: None)
