"""Ray Train stages on a real local Ray: 2 gloo workers, resume from checkpoint, recovery of a killed worker."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tgan_ray.config import load_config
from tgan_ray.tracking import Tracker
from tgan_ray.train import train_stage
from tgan_ray.train.plumbing import CHECKPOINT_MODEL, CHECKPOINT_STATE

SIZE = 64


def _discs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright noisy discs on a dark background, with their masks: a learnable toy."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, masks = [], []
    for _ in range(n):
        mask = np.zeros((SIZE, SIZE), bool)
        for _ in range(rng.integers(2, 5)):
            cy, cx, r = rng.integers(8, SIZE - 8, 2).tolist() + [int(rng.integers(4, 8))]
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image = 0.2 + 0.6 * mask + rng.normal(0, 0.05, mask.shape)
        images.append(np.clip(image, 0, 1).astype(np.float32))
        masks.append(mask.astype(np.uint8))
    return np.stack(images), np.stack(masks)


def _cfg(tmp_path: Path, **overrides):
    base = {
        "ray.num_workers": 1,
        "ray.cpus_per_worker": 0.5,
        "ray.max_failures": 1,
        "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    return load_config("quick", overrides={**base, **overrides})


def _state(result) -> dict:
    return torch.load(Path(result.checkpoint_path) / CHECKPOINT_STATE, weights_only=True)


def test_pix2pix_two_gloo_workers_reports_kid_checkpoint(ray_local, tmp_path):
    cfg = _cfg(
        tmp_path,
        **{
            "ray.num_workers": 2,
            "pix2pix.epochs": 1,
            "pix2pix.epochs_decay": 1,
            "pix2pix.steps_per_epoch": 2,
            "pix2pix.eval_every": 1,
            "pix2pix.batch_size": 2,
        },
    )
    images, masks = _discs(8)
    result = train_stage(
        "pix2pix",
        cfg.pix2pix,
        {
            "train_images": images,
            "train_masks": masks,
            "val_masks": masks[:6].astype(np.float32),
            "val_images": images[:6],
        },
        cfg,
        tmp_path / "run",
    )
    assert (Path(result.checkpoint_path) / CHECKPOINT_MODEL).is_file()
    assert np.isfinite(result.metrics["val/kid_random-resnet18"])
    assert result.metrics["score"] == result.metrics["val/kid_random-resnet18"]
    from tgan_ray.inference import load_generator, run_generator

    out = run_generator(load_generator(result.model_path), masks[:2].astype(np.float32))
    assert out.shape == (2, SIZE, SIZE) and 0 <= out.min() and out.max() <= 1


def test_segmenter_learns_logs_to_mlflow_and_resumes(ray_local, tmp_path):
    images, masks = _discs(24)
    data = {
        "train_images": images[4:],
        "train_masks": masks[4:],
        "val_images": images[:4],
        "val_masks": masks[:4],
    }
    parent = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "test").start_child("parent")
    # 8 epochs: before about 6 the network (BatchNorm still settling) marks no pixel, and "nothing" scores
    # MIoU 0.46 here. The run is seeded, so the figure repeats (it wandered from 0.46 to 0.54 when it was not).
    cfg = _cfg(tmp_path, **{"segmenter.epochs": 8, "segmenter.steps_per_epoch": 5, "segmenter.batch_size": 4})
    scratch = set(Path(tempfile.gettempdir()).glob("tgan-ckpt-*"))
    first = train_stage("segmenter", cfg.segmenter, data, cfg, tmp_path / "run", parent, name="seg")
    assert _state(first)["starts"] == [0]
    # Each checkpoint is written to a temporary folder, then uploaded: no copy is left behind in /tmp.
    assert _left_behind(scratch) == set()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    losses = [
        m.value
        for m in sorted(
            client.get_metric_history(first.extra["mlflow_run_id"], "train/loss"), key=lambda m: m.step
        )
    ]
    assert len(losses) == 8 and losses[-1] < losses[0]
    child = client.get_run(first.extra["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert first.metrics["val/miou"] > 0.8

    # Same run name, more epochs: continues from the stored checkpoint instead of starting over.
    cfg2 = _cfg(
        tmp_path, **{"segmenter.epochs": 10, "segmenter.steps_per_epoch": 5, "segmenter.batch_size": 4}
    )
    second = train_stage("segmenter", cfg2.segmenter, data, cfg2, tmp_path / "run", parent, name="seg")
    state = torch.load(Path(second.latest_checkpoint_path) / CHECKPOINT_STATE, weights_only=True)
    assert state["starts"] == [0, 8] and state["epoch"] == 9


def _left_behind(before: set[Path], wait_s: float = 10.0) -> set[Path]:
    """Checkpoint folders in the temp dir that were not there before and stay there.

    Another pytest-xdist worker may be training at the same moment: its folders come and go within seconds.
    """
    import time

    new = set(Path(tempfile.gettempdir()).glob("tgan-ckpt-*")) - before
    deadline = time.monotonic() + wait_s
    while new and time.monotonic() < deadline:
        time.sleep(1.0)
        new &= set(Path(tempfile.gettempdir()).glob("tgan-ckpt-*"))
    return new


def test_killed_worker_restarts_from_last_checkpoint(ray_local, tmp_path):
    images, masks = _discs(12)
    data = {
        "train_images": images[2:],
        "train_masks": masks[2:],
        "val_images": images[:2],
        "val_masks": masks[:2],
    }
    cfg = _cfg(tmp_path, **{"segmenter.epochs": 5, "segmenter.steps_per_epoch": 3, "segmenter.batch_size": 4})
    marker = tmp_path / "killed-once"
    result = train_stage(
        "segmenter",
        cfg.segmenter,
        data,
        cfg,
        tmp_path / "run",
        name="seg-fault",
        extra_config={"fault_injection": {"epoch": 4, "marker": str(marker)}},
    )
    assert marker.exists(), "the worker was never killed"
    state = torch.load(Path(result.latest_checkpoint_path) / CHECKPOINT_STATE, weights_only=True)
    # Killed during the last epoch: the restart resumed from a stored checkpoint, not from scratch, and finished.
    # (Which one depends on how many of the reports Ray's controller had registered before the kill.)
    assert len(state["starts"]) == 2 and state["starts"][0] == 0 and state["starts"][1] >= 1
    assert state["epoch"] == 4

    # The stage is done: pruning leaves its best model alone, loadable, and frees the rest.
    from tgan_ray.models.npssegnet import load_segmenter
    from tgan_ray.train.driver import prune_checkpoints

    best = Path(result.checkpoint_path)
    assert prune_checkpoints(result.to_dict()) > 0
    assert list(Path(result.storage_uri).glob("checkpoint_*")) == [best]
    assert [f.name for f in best.iterdir()] == [CHECKPOINT_MODEL]
    load_segmenter(str(best / CHECKPOINT_MODEL))
    assert prune_checkpoints(result.to_dict()) == 0  # idempotent


def test_unknown_stage_names_the_choices(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(KeyError, match="pix2pix, cyclegan, segmenter"):
        train_stage("unet", cfg.segmenter, {}, cfg, tmp_path)
