"""The three trainable steps of the method as stages of one Ray Train loop (``worker.py``).

A stage owns its networks, optimisers, data loaders and one epoch of training; the loop owns everything else
(resume, evaluation cadence, checkpoints, reports, MLflow). Register new stages in :data:`STAGES`.

Data arrive as numpy arrays (through the object store), already at the training scale:
- pix2pix:   ``train_masks``/``train_images`` (subset 1 rough masks and images), ``val_masks``/``val_images``.
- cyclegan:  ``train_a`` (1st generation) and ``train_b`` (real subset 2), ``val_a``/``val_b``.
- segmenter: ``train_images``/``train_masks`` (virtual dataset), ``val_images``/``val_masks``; optional
  ``noise_std``, the pixel noise the virtual images lack compared with the real stack (for ``augment="em"``);
  optional ``real_images``/``real_labels``, real crops with pseudo-labels (0, 1, 255 = left out of the loss).
Images are float32 in [0, 1] (N x H x W); masks are uint8 {0, 1}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tgan_ray.config import CycleGANConfig, Pix2PixConfig, SegmenterConfig
from tgan_ray.train.plumbing import (
    WorkerContext,
    build_loader,
    optimizer_to,
    prepare_network,
    set_epoch,
    to_uint8_grid,
    unwrap,
)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


class Stage:
    """Contract of a stage. ``score``/``mode`` choose the checkpoint kept as best."""

    score: str = ""
    mode: str = "min"
    num_epochs: int = 1
    eval_every: int = 1

    def train_epoch(self, epoch: int) -> dict[str, float]: ...
    def evaluate(self) -> dict[str, float]: ...
    def sample_grid(self) -> np.ndarray: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def export(self, path: Path) -> None: ...


class GANStage(Stage):
    """pix2pix (mask -> image, paired) or CycleGAN (1st generation <-> real, unpaired).

    The score is KID on generated vs held-out real images under a fixed offline extractor: GAN losses do not
    converge, so a checkpoint is never chosen by loss.
    """

    mode = "min"

    def __init__(self, name: str, cfg: dict, data: dict[str, np.ndarray], ctx: WorkerContext, extractor: str):
        from tgan_ray.data.datasets import PairedDataset, UnpairedDataset
        from tgan_ray.data.transforms import train_transform
        from tgan_ray.models import create_gan

        self.name, self.ctx, self.extractor_name = name, ctx, extractor
        self.cfg = (Pix2PixConfig if name == "pix2pix" else CycleGANConfig).model_validate(cfg)
        from tgan_ray.metrics.gan_extractors import extractor_label

        self.score = f"val/kid_{extractor_label(extractor)}"
        self.num_epochs = self.cfg.epochs + self.cfg.epochs_decay
        self.eval_every = self.cfg.eval_every
        self.model = create_gan(name, self.cfg)
        for key in list(self.model.nets.keys()):
            self.model.nets[key] = prepare_network(self.model.nets[key], ctx)
        self.model.autocast = ctx.autocast
        self.opt_g, self.opt_d = self.model.optimizers()
        self.sched_g, self.sched_d = self.model.schedulers(self.cfg.epochs, self.cfg.epochs_decay)
        size = data["train_images" if name == "pix2pix" else "train_b"].shape[-1]
        if name == "pix2pix":
            from tgan_ray.masks.pseudo import IGNORE

            train = PairedDataset(
                list(data["train_images"]),
                list(data["train_masks"]),
                transform=train_transform(),
                size=size,
                unsure_label=IGNORE,  # step 2's unsure regions (pix2pix.unsure_input)
            )
            self.val_inputs = data["val_masks"].astype(np.float32)  # masks -> generated images
        else:
            train = UnpairedDataset(list(data["train_a"]), list(data["train_b"]), size=size)
            self.val_inputs = data["val_a"]  # 1st generation -> 2nd generation
        self.val_real = data["val_images" if name == "pix2pix" else "val_b"]
        self.loader = build_loader(train, self.cfg.batch_size, ctx, self.cfg.steps_per_epoch)
        self._extractor = None

    def _batch(self, item: dict) -> dict[str, torch.Tensor]:
        if self.name == "pix2pix":
            item = {"A": item["mask"], "B": item["image"]}
        return {k: self.ctx.to_device(v) for k, v in item.items() if k in ("A", "B")}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        set_epoch(self.loader, epoch)
        for net in self.model.nets.values():
            net.train()
        rows = [self.model.train_step(self._batch(item)) for item in self.loader]
        lr = self.opt_g.param_groups[0]["lr"]
        self.sched_g.step()
        self.sched_d.step()
        return {f"train/{k}": v for k, v in _mean(rows).items()} | {"train/lr": lr}

    def generate(self, inputs: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Inputs in [0, 1] (N x H x W) -> generated images in [0, 1], on the path steps 4 and 6 generate on
        (``inference.run_generator``), so that the KID that picks a checkpoint scores what it will generate."""
        from tgan_ray.inference import run_generator

        generator = unwrap(self.model.nets[self.model.generator_names[0]])
        was_training = generator.training
        try:
            return run_generator(generator.eval(), inputs, batch_size)
        finally:
            generator.train(was_training)

    def evaluate(self) -> dict[str, float]:
        from tgan_ray.metrics.gan import image_quality
        from tgan_ray.metrics.gan_extractors import build_feature_extractor, extractor_label

        if self._extractor is None:
            self._extractor = build_feature_extractor(self.extractor_name).to(self.ctx.device)
        n = min(self.cfg.eval_images, len(self.val_inputs))
        fake = torch.from_numpy(self.generate(self.val_inputs[:n]))[:, None] * 2 - 1
        real = torch.from_numpy(np.array(self.val_real, dtype=np.float32))[:, None] * 2 - 1
        scores = image_quality(fake, real, self._extractor, extractor_label(self.extractor_name))
        return {f"val/{k}": v for k, v in scores.items()}

    def sample_grid(self) -> np.ndarray:
        k = min(4, len(self.val_inputs))
        fake = self.generate(self.val_inputs[:k])
        real = np.asarray(self.val_real[:k], dtype=np.float32)
        return to_uint8_grid([list(self.val_inputs[:k]), list(fake), list(real)])  # input | output | real

    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": {k: unwrap(v).state_dict() for k, v in self.model.nets.items()},
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "sched_d": self.sched_d.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state["nets"].items():
            unwrap(self.model.nets[k]).load_state_dict(v)
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        optimizer_to(self.opt_g, self.ctx.device)
        optimizer_to(self.opt_d, self.ctx.device)
        self.sched_g.load_state_dict(state["sched_g"])
        self.sched_d.load_state_dict(state["sched_d"])

    def export(self, path: Path) -> None:
        """The main generator alone (mask -> image, or 1st generation -> real), for inference."""
        key = self.model.generator_names[0]
        torch.save(
            {
                "kind": self.name,
                "config": self.cfg.model_dump(mode="json"),
                "generator": unwrap(self.model.nets[key]).state_dict(),
            },
            path,
        )


class SegmenterStage(Stage):
    """NPsSegNet (UNet++/ResNet34) on the virtual dataset; the best checkpoint by validation MIoU."""

    score = "val/miou"
    mode = "max"

    def __init__(self, name: str, cfg: dict, data: dict[str, np.ndarray], ctx: WorkerContext, extractor: str):
        from torch.utils.data import ConcatDataset

        from tgan_ray.data.datasets import SegmentationDataset
        from tgan_ray.data.transforms import segmenter_transform, test_transform, train_transform
        from tgan_ray.masks.pseudo import IGNORE
        from tgan_ray.models.losses import SegmentationLoss
        from tgan_ray.models.npssegnet import create_segmenter

        self.ctx = ctx
        self.cfg = SegmenterConfig.model_validate(cfg)
        self.num_epochs, self.eval_every = self.cfg.epochs, self.cfg.val_every
        extra = {"decoder_channels": self.cfg.decoder_channels} if self.cfg.decoder_channels else {}
        net = create_segmenter(self.cfg.arch, self.cfg.encoder, self.cfg.encoder_weights, **extra)
        self.net = prepare_network(net, ctx)
        self.loss_fn = SegmentationLoss(self.cfg.focal_alpha, ignore_index=IGNORE)
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, self.cfg.lr_step, self.cfg.lr_gamma)
        noise_std = float(data["noise_std"]) if "noise_std" in data else None
        transform = segmenter_transform(noise_std) if self.cfg.augment == "em" else train_transform()
        # Virtual masks may mark blobs painted outside the mask unsure (segmenter.ignore_unmasked).
        train = SegmentationDataset(
            list(data["train_images"]), list(data["train_masks"]), transform=transform, ignore_label=IGNORE
        )
        if len(data.get("real_images", ())):
            # Real crops with pseudo-labels (masks/pseudo.py): their own noise, and unsure pixels left out.
            real = SegmentationDataset(
                list(data["real_images"]),
                list(data["real_labels"]),
                transform=segmenter_transform(0.0) if self.cfg.augment == "em" else train_transform(),
                ignore_label=IGNORE,
            )
            train = ConcatDataset([train, real])
        self.loader = build_loader(train, self.cfg.batch_size, ctx, self.cfg.steps_per_epoch)
        self.val = SegmentationDataset(
            list(data["val_images"]), list(data["val_masks"]), transform=test_transform(), train=False
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        set_epoch(self.loader, epoch)
        self.net.train()
        losses = []
        for image, label in self.loader:
            image, label = self.ctx.to_device(image), label.to(self.ctx.device)
            with self.ctx.autocast():
                logits = self.net(image)
            loss = self.loss_fn(logits.float(), label)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses.append(loss.item())
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        return {"train/loss": float(np.mean(losses)), "train/lr": lr}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        net = unwrap(self.net).eval()
        with self.ctx.autocast():
            return net(self.ctx.to_device(images)).float().argmax(1).cpu()

    def evaluate(self) -> dict[str, float]:
        from tgan_ray.metrics.segmentation import aggregate, segmentation_scores

        rows = []
        for i in range(0, len(self.val), 16):
            items = [self.val[j] for j in range(i, min(i + 16, len(self.val)))]
            pred = self.predict(torch.stack([x for x, _ in items]))
            rows += [segmentation_scores(p.numpy() > 0, y.numpy() > 0) for p, (_, y) in zip(pred, items)]
        return {f"val/{k}": float(v) for k, v in aggregate(rows).items() if isinstance(v, (int, float))}

    def sample_grid(self) -> np.ndarray:
        items = [self.val[j] for j in range(min(4, len(self.val)))]
        pred = self.predict(torch.stack([x for x, _ in items]))
        return to_uint8_grid(
            [[x[0].numpy() for x, _ in items], list(pred.numpy()), [y.numpy() for _, y in items]]
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": unwrap(self.net).state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.net).load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        optimizer_to(self.opt, self.ctx.device)
        self.sched.load_state_dict(state["sched"])

    def export(self, path: Path) -> None:
        """An NPsSegNet checkpoint that ``load_segmenter`` reads (weights_only)."""
        from tgan_ray.models.npssegnet import save_segmenter

        save_segmenter(self.net, path, meta={"segmenter": self.cfg.model_dump(mode="json")})


STAGES: dict[str, type[Stage]] = {"pix2pix": GANStage, "cyclegan": GANStage, "segmenter": SegmenterStage}


def create_stage(
    name: str, cfg: dict, data: dict, ctx: WorkerContext, extractor: str = "random-resnet18"
) -> Stage:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; choose one of: {', '.join(STAGES)}")
    return STAGES[name](name, cfg, data, ctx, extractor)
