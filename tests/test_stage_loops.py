"""Each training stage's own loop, without Ray: a few steps on 64x64 tensors in a plain process.

``BaseStageTester`` holds the contract every stage keeps (``train/stages.py``): an epoch of finite losses that
moves the weights, a validation score under the stage's own key, a state that restores, an exported model that
the inference code loads, and a sample grid. One subclass per stage brings its data. The same tests run on a GPU
with bf16 and channels_last (``gpu``-marked, skipped without CUDA).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tgan_ray.config import load_config
from tgan_ray.train.plumbing import local_context
from tgan_ray.train.stages import create_stage

SIZE = 64
CONTEXTS = [
    pytest.param({"device": "cpu"}, id="cpu-fp32"),
    pytest.param(
        {"device": "cuda", "precision": "bf16", "channels_last": True}, id="cuda-bf16", marks=pytest.mark.gpu
    ),
]


def discs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright noisy discs on a dark background (float32 in [0, 1]) and their masks (uint8 {0, 1})."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images, masks = [], []
    for _ in range(n):
        mask = np.zeros((SIZE, SIZE), bool)
        for _ in range(3):
            cy, cx = rng.integers(10, SIZE - 10, 2)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        images.append(np.clip(0.2 + 0.6 * mask + rng.normal(0, 0.05, mask.shape), 0, 1).astype(np.float32))
        masks.append(mask.astype(np.uint8))
    return np.stack(images), np.stack(masks)


def _weights(stage) -> torch.Tensor:
    return torch.cat([v.detach().float().flatten().cpu() for v in _state_tensors(stage.state_dict())])


def _state_tensors(state) -> list[torch.Tensor]:
    nets = state["nets"] if "nets" in state else {"net": state["net"]}
    return [t for sd in nets.values() for t in sd.values() if t.is_floating_point()]


@pytest.mark.filterwarnings("ignore::tgan_ray.metrics.gan.GANMetricWarning")  # 2 images a side: a smoke score
class BaseStageTester:
    """The contract of a stage, run on a few steps. Subclasses set ``stage`` and build ``data()``."""

    stage: str = ""
    overrides: dict = {}

    def data(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def stage_cfg(self) -> dict:
        section = "segmenter" if self.stage == "segmenter" else self.stage
        cfg = getattr(load_config("quick"), section).model_dump(mode="json")
        return cfg | {"batch_size": 2, "steps_per_epoch": 2, "epochs": 2} | self.overrides

    def build(self, context: dict, seed: int = 0):
        ctx = local_context(seed=seed, **context)
        return create_stage(self.stage, self.stage_cfg(), self.data(), ctx)

    @pytest.mark.parametrize("context", CONTEXTS)
    def test_an_epoch_moves_the_weights_with_finite_losses(self, context):
        stage = self.build(context)
        before = _weights(stage)
        metrics = stage.train_epoch(0)
        assert metrics and all(np.isfinite(v) for v in metrics.values())
        assert not torch.equal(before, _weights(stage))

    @pytest.mark.parametrize("context", CONTEXTS)
    def test_evaluate_reports_the_score_it_is_chosen_by(self, context):
        stage = self.build(context)
        stage.train_epoch(0)
        scores = stage.evaluate()
        assert stage.score in scores and np.isfinite(scores[stage.score])
        grid = stage.sample_grid()
        assert grid.dtype == np.uint8 and grid.ndim == 2

    def test_state_restores_into_a_fresh_stage(self):
        trained = self.build({"device": "cpu"})
        trained.train_epoch(0)
        fresh = self.build({"device": "cpu"}, seed=1)
        assert not torch.equal(_weights(trained), _weights(fresh))
        fresh.load_state_dict(trained.state_dict())
        assert torch.equal(_weights(trained), _weights(fresh))
        assert np.isfinite(list(fresh.train_epoch(1).values())).all()  # optimiser state restored too

    def test_seeded_epochs_repeat(self):
        a = self.build({"device": "cpu"})  # draws from torch's generator, which local_context seeds
        metrics_a = [a.train_epoch(epoch) for epoch in range(2)]
        b = self.build({"device": "cpu"})
        assert [b.train_epoch(epoch) for epoch in range(2)] == metrics_a
        assert torch.equal(_weights(a), _weights(b))

    def test_exported_model_loads_for_inference(self, tmp_path):
        stage = self.build({"device": "cpu"})
        stage.train_epoch(0)
        stage.export(tmp_path / "model.pt")
        self.check_export(tmp_path / "model.pt")

    def check_export(self, path) -> None:
        from tgan_ray.inference import load_generator, run_generator

        generator = load_generator(path, "cpu")
        out = run_generator(
            generator, self.data()["val_masks" if self.stage == "pix2pix" else "val_a"][:2], 2
        )
        assert out.shape == (2, SIZE, SIZE) and 0 <= out.min() <= out.max() <= 1


class TestPix2PixStage(BaseStageTester):
    stage = "pix2pix"
    overrides = {"eval_images": 4}

    def data(self):
        images, masks = discs(6)
        return {
            "train_images": images[:4],
            "train_masks": masks[:4],
            "val_masks": masks[4:].astype(np.float32),
            "val_images": images[4:],
        }


class TestCycleGANStage(BaseStageTester):
    stage = "cyclegan"
    overrides = {"eval_images": 4, "pool_size": 2}  # full after one step: later steps draw from the pool

    def data(self):
        images, _ = discs(8)
        blurred = np.stack([np.clip(i * 0.5 + 0.25, 0, 1) for i in images])  # the "1st generation" domain
        return {"train_a": blurred[:4], "train_b": images[:4], "val_a": blurred[4:], "val_b": images[4:]}


class TestSegmenterStage(BaseStageTester):
    stage = "segmenter"
    overrides = {"val_every": 1}

    def data(self):
        images, masks = discs(8)
        real_labels = masks[:2].copy()
        real_labels[:, :8] = 255  # unsure: left out of the loss
        return {
            "train_images": images[:4],
            "train_masks": masks[:4],
            "val_images": images[4:6],
            "val_masks": masks[4:6],
            "noise_std": np.float32(0.02),
            "real_images": images[6:],
            "real_labels": real_labels,
        }

    def check_export(self, path) -> None:
        from tgan_ray.models.npssegnet import load_segmenter

        net, meta = load_segmenter(path)
        logits = net(torch.from_numpy(self.data()["val_images"][:, None]))
        assert logits.shape == (2, 2, SIZE, SIZE) and "segmenter" in meta


def test_capped_epochs_draw_from_every_item_and_keep_their_length():
    """``steps_per_epoch`` caps an epoch, not the data: a set larger than one epoch is sampled from end to end.

    NPsSegNet's set is the virtual pairs followed by the real crops (a ConcatDataset). When an epoch was the
    set's first ``steps x batch`` items, the real crops were never seen.
    """
    from torch.utils.data import ConcatDataset, TensorDataset

    from tgan_ray.train.plumbing import build_loader, set_epoch

    torch.manual_seed(0)  # the shuffles: the counts below then never vary
    virtual, real = TensorDataset(torch.arange(0, 60)), TensorDataset(torch.arange(60, 100))
    ctx = local_context(seed=0)
    loader = build_loader(ConcatDataset([virtual, real]), 4, ctx, steps_per_epoch=3)
    seen = []
    for epoch in range(10):
        set_epoch(loader, epoch)
        batches = [b[0] for b in loader]
        assert len(batches) == len(loader) == 3 and all(len(b) == 4 for b in batches)
        assert loader.batch_size == 4  # what the worker's images/s line reads
        seen += torch.cat(batches).tolist()
    assert max(seen) >= 60, "the second part of the set (the real crops) was never drawn"
    assert len(set(seen)) > 60  # ten epochs of 12 items: most of the 100, not the first 12 over and over

    small = build_loader(TensorDataset(torch.arange(5)), 4, ctx, steps_per_epoch=3)
    assert [len(b[0]) for b in small] == [4, 4, 4]  # a 5-item subset 1 still fills a 3-step epoch
