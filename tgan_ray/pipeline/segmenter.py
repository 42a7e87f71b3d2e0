"""Step 7: NPsSegNet on the virtual pairs (and real crops with pseudo-labels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.manifest import round_step
from tgan_ray.pipeline.common import load_pngs, spread


class SegmenterStep:
    """Step 7 of :class:`~tgan_ray.pipeline.Pipeline`."""

    def step_segmenter(self, prior: dict, virtual_step: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.model_uri import resolve_model
        from tgan_ray.models.npssegnet import load_segmenter, save_segmenter
        from tgan_ray.train import train_stage

        manifest = Path(virtual_step["manifest"])  # the pairs step_virtual chose, relative to their folder
        pairs = json.loads(manifest.read_text())["pairs"]
        images = load_pngs(manifest.parent, [p["image"] for p in pairs])
        masks = load_pngs(manifest.parent, [p["mask"] for p in pairs], is_mask=True)
        n_val = max(1, round(len(pairs) * 0.2))  # paper: train:test 4:1
        noise = self._missing_noise(images)
        real_images, real_labels = self._pseudo_labelled_crops(len(pairs) - n_val, rnd)
        if self.cfg.segmenter.ignore_unmasked:
            masks[n_val:] = self.unmasked_left_out(images[n_val:], masks[n_val:], rnd)
        if self.cfg.segmenter.ignore_undrawn:
            masks[n_val:] = self.undrawn_left_out(images[n_val:], masks[n_val:], rnd)
        result = train_stage(
            "segmenter",
            self.cfg.segmenter,
            {
                "train_images": images[n_val:],
                "train_masks": masks[n_val:],
                "val_images": images[:n_val],
                "val_masks": masks[:n_val],
                "noise_std": np.float32(noise),
                "real_images": real_images,
                "real_labels": real_labels,
            },
            self.cfg,
            self.folder.uri(),  # Train checkpoints under <run>/ray, on S3 for an S3 run folder
            self.tracker,
            name=f"round{rnd}-segmenter",
        )
        model, _ = load_segmenter(resolve_model(result.model_path, self.cfg).path)
        path = self.run_dir / f"round{rnd}" / "npssegnet.pt"
        save_segmenter(
            model,
            path,
            meta={
                "data": self.data_cfg.model_dump(mode="json"),
                "round": rnd,
                "val_miou": float(result.metrics.get("val/miou", float("nan"))),
                "source_run": self.folder.remote or str(self.run_dir.resolve()),
                "min_particle_px": self._min_particle_px(prior),
                "particle_contrast": self.real_particle_contrast(rnd),
            },
        )
        return {**result.to_dict(), "model": str(path), "noise_std": noise}

    def unmasked_left_out(self, images: np.ndarray, masks: np.ndarray, rnd: int) -> np.ndarray:
        """Training masks with the particles a generator painted outside its mask marked unsure (IGNORE)."""
        from tgan_ray.masks import ClassicalSegmenter
        from tgan_ray.masks.consistency import unmasked_particles
        from tgan_ray.masks.pseudo import IGNORE

        settings = self.manifest.outputs(round_step(1, "rough")).get("settings")
        if not settings:  # rough.method sam / model: no classical settings of this stack yet
            stems = [f["stem"] for f in self.manifest.outputs("stack")["frames"]]
            work = [self.work_frame(stems[i]) for i in spread(len(stems))]
            contrast, radii = ClassicalSegmenter(self.cfg.rough.particle_contrast).stack_radii(work)
            settings = {"contrast": contrast, "radii": radii}
        r = self.cfg.rough
        strict = ClassicalSegmenter(settings["contrast"], r.min_particle_px, r.confidence)
        loose = ClassicalSegmenter(settings["contrast"], r.min_particle_px, confidence=0.0)
        out, left_out = masks.copy(), 0.0
        for image, label in zip(images, out):
            radius, _ = strict.pick_radius(image, settings["radii"])
            unsure = unmasked_particles(loose.segment(image, radius), label)
            label[unsure] = IGNORE
            left_out += float(unsure.mean()) / len(images)
        self.log(
            f"   blobs painted outside their masks: {left_out:.1%} of training pixels left out of the loss"
        )
        return out

    def undrawn_left_out(self, images: np.ndarray, masks: np.ndarray, rnd: int) -> np.ndarray:
        """Training masks with the masked particles their image does not show marked unsure (IGNORE)."""
        from tgan_ray.masks.consistency import undrawn_particles
        from tgan_ray.masks.pseudo import IGNORE

        reference = self.real_particle_contrast(rnd)
        min_fraction = self.cfg.segmenter.min_drawn_contrast
        out, particles, undrawn = masks.copy(), 0, 0
        for image, label in zip(images, out):
            missing = undrawn_particles(image, label == 1, reference, min_fraction)
            particles, undrawn = particles + int((label == 1).sum()), undrawn + int(missing.sum())
            label[missing] = IGNORE
        self.log(
            f"   masked particles their image does not show: {undrawn / max(particles, 1):.1%} of particle "
            "pixels left out of the loss"
        )
        return out

    def _pseudo_labelled_crops(self, n_virtual: int, rnd: int) -> tuple[np.ndarray, np.ndarray]:
        """Real crops of the non-test frames with step 2's pseudo-labels, ``segmenter.real_fraction`` of the set."""
        from tgan_ray.data.working import random_crops
        from tgan_ray.masks.pseudo import IGNORE, read_pseudo_label

        fraction = self.cfg.segmenter.real_fraction
        rough = self.manifest.outputs(round_step(rnd, "rough"))
        size = self.cfg.data.image_size
        if fraction <= 0 or "pseudo" not in rough:
            return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.uint8)
        folder = Path(rough["pseudo"])
        stems = sorted(p.stem for p in folder.glob("*.png"))
        n = max(1, round(n_virtual * fraction / (1 - fraction)))
        labels = [read_pseudo_label(folder / f"{s}.png") for s in stems]
        images, crops = random_crops(
            [self.work_frame(s) for s in stems], size, n, self.rng, labels, self.cfg.data.positive_crops
        )
        unsure = float(np.mean(crops == IGNORE))
        self.log(
            f"   {n} real crops with pseudo-labels from {len(stems)} images ({unsure:.0%} of pixels unsure)"
        )
        return images, crops

    def _missing_noise(self, virtual: np.ndarray) -> float:
        """Pixel noise the virtual images lack compared with the real frames (both at the working scale)."""
        from tgan_ray.data.working import missing_noise_std

        frames = [f for f in self.manifest.outputs("stack")["frames"] if f.get("learn", True)]
        real = [self.work_frame(f["stem"]) for f in frames[:32]]
        noise = missing_noise_std(real, virtual[:64])
        self.log(
            f"   noise the virtual images lack: std {noise:.4f} (added in training, segmenter.augment=em)"
        )
        return noise

    def _min_particle_px(self, prior: dict) -> float:
        """Smallest particle the segmenter may report, working px: a fraction of the prior's 5th percentile."""
        from tgan_ray.masks.prior import MorphologyPrior

        areas = MorphologyPrior.load(prior["prior"]).particles["area"]
        fraction = self.cfg.segmenter.min_particle_fraction
        return float(fraction * np.percentile(areas, 5)) if len(areas) else 0.0
