"""Steps 2->6: the morphology prior and its random masks, pix2pix, the 1st generation, CycleGAN, the 2nd
generation, and the virtual pairs the segmenter trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.manifest import round_step, write_json
from tgan_ray.pipeline.common import load_mask, load_pngs, quiet_ray_data


class GANSteps:
    """Steps 2->6 of :class:`~tgan_ray.pipeline.Pipeline`."""

    def mask_seed(self, rnd: int) -> int:
        """Seed of round ``rnd``'s random masks (steps 4 and 6 draw mask i from (seed, i))."""
        return self.cfg.data.seed + 1000 * rnd

    def step_prior(self, stack: dict, rough: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.generate_actor import pair_paths
        from tgan_ray.io import write_mask_png
        from tgan_ray.masks.prior import MorphologyPrior, compare_to_prior
        from tgan_ray.masks.sampling import sample_capped_mask_at

        masks = [load_mask(Path(rough["folder"]) / f"{s}.png") for s in stack["subset1"]]
        folder = self.run_dir / f"round{rnd}"
        # Sampled from the saved prior, as generate_dataset samples them (the JSON rounds to 6 digits): mask i is
        # the same file here, in the 1st generation's set and in the virtual dataset.
        prior = MorphologyPrior.load(MorphologyPrior.from_masks(masks).save(folder / "prior.json"))
        p, size, seed = self.cfg.prior, self.cfg.data.image_size, self.mask_seed(rnd)
        sampled = np.stack(
            [
                sample_capped_mask_at(prior, size, seed, i, p.max_empty_fraction, p.border_policy)[0]
                for i in range(p.n_masks)
            ]
        )
        ks = compare_to_prior(prior, list(sampled))
        write_json(folder / "prior_ks.json", ks)
        # The virtual dataset's masks/ (pix2pix validates on them before any image is generated).
        names = []
        for i, mask in enumerate(sampled):
            path = pair_paths(i)["mask"]
            write_mask_png(folder / "virtual" / path, mask)
            names.append(Path(path).name)
        empty = float(np.mean(~sampled.any(axis=(1, 2))))
        self.tracker.log_metrics({f"round{rnd}/prior_ks_{k}": v for k, v in ks.items() if v is not None})
        self.log(
            f"   {len(names)} random masks, {empty:.0%} empty (prior.max_empty_fraction={p.max_empty_fraction:g}); "
            "KS distance to the prior: " + ", ".join(f"{k}={v:.3f}" for k, v in ks.items() if v is not None)
        )
        return {"prior": str(folder / "prior.json"), "ks": ks, "masks": names, "seed": seed, "empty": empty}

    def real_crops(self, stems: list[str], n: int, masks: list[np.ndarray] | None = None):
        from tgan_ray.data.working import random_crops

        images = [self.work_frame(s) for s in stems]
        return random_crops(
            images, self.cfg.data.image_size, n, self.rng, masks, self.cfg.data.positive_crops
        )

    # -- step 3: pix2pix ------------------------------------------------------------------------------------------
    def pix2pix_data(self, stack: dict, rough: dict, prior: dict, rnd: int) -> dict[str, np.ndarray]:
        """Subset-1 crops with their rough masks; validation: random masks vs real crops of the other images."""
        d = self.cfg.data
        images, masks = self.real_crops(stack["subset1"], d.real_crops, self.pix2pix_masks(stack, rough))
        n_val = min(self.cfg.pix2pix.eval_images, len(prior["masks"]))
        val_masks = load_pngs(
            self.run_dir / round_step(rnd, "virtual") / "masks", prior["masks"][:n_val], True
        )
        val_real, _ = self.real_crops(stack["subset2"] + stack["test"], max(n_val, 8))
        return {"train_images": images, "train_masks": masks, "val_masks": val_masks, "val_images": val_real}

    def pix2pix_masks(self, stack: dict, rough: dict) -> list[np.ndarray]:
        """pix2pix's input masks of subset 1: rough particles 1, background 0, and (``pix2pix.unsure_input``)
        what step 2 is unsure of IGNORE.

        Precision-first rough masks leave faint particles unmasked. Given as background, they teach the
        generator that background sometimes grows a particle, and it paints particles that the drawn masks
        do not hold. The band that pseudo-labels add around each confident edge is not carried over: masks
        drawn from the prior have sharp edges.
        """
        from scipy import ndimage as ndi

        from tgan_ray.masks.pseudo import IGNORE, read_pseudo_label

        stems = stack["subset1"]
        masks = [load_mask(Path(rough["folder"]) / f"{s}.png") for s in stems]
        if not self.cfg.pix2pix.unsure_input or "pseudo" not in rough:
            return masks
        out = []
        for stem, mask in zip(stems, masks):
            unsure = read_pseudo_label(Path(rough["pseudo"]) / f"{stem}.png") == IGNORE
            unsure &= ~ndi.binary_dilation(mask > 0)
            out.append(np.where(unsure, IGNORE, mask).astype(np.uint8))
        return out

    def step_pix2pix(self, stack: dict, rough: dict, prior: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.train import train_stage

        data = self.pix2pix_data(stack, rough, prior, rnd)
        result = train_stage(
            "pix2pix",
            self.cfg.pix2pix,
            data,
            self.cfg,
            self.folder.uri(),  # Train checkpoints under <run>/ray, on S3 for an S3 run folder
            self.tracker,
            name=f"round{rnd}-pix2pix",
        )
        return result.to_dict()

    # -- steps 4 and 6: the generated sets, with Ray Data ----------------------------------------------------------
    def step_gen(
        self, src: str, dst: str, stage: dict, rnd: int, pix2pix: dict | None = None
    ) -> dict[str, Any]:
        """Generate from the round's prior with Ray Data (:func:`~tgan_ray.generate.generate_dataset`).

        The code path of ``tgan generate``: masks sampled by index, a generator actor pool, PNG pairs and a
        manifest.parquet; a crash resumes from the pairs already written.

        Args:
            src, dst: ``"masks", "gen1"``: step 4, the pix2pix ``stage`` makes the 1st generation in
                ``round{r}/gen1/`` (CycleGAN's domain A). ``"gen1", "gen2"``: step 6, pix2pix then the CycleGAN
                ``stage`` make the virtual dataset in ``round{r}/virtual/`` (2nd generation in images/, the 1st
                kept in gen1/).
            stage: the stage whose generator runs last (its ``checkpoint_path``).
            rnd: the round.
            pix2pix: the round's pix2pix stage (``"gen1", "gen2"`` only).

        Returns:
            :class:`~tgan_ray.generate.GenerateResult` as a dict, and ``folder``: the generated images.
        """
        from tgan_ray.generate import generate_dataset, stage_model_uri

        model = stage_model_uri(stage["checkpoint_path"], self.cfg)
        if (src, dst) == ("masks", "gen1"):
            sub, p2p, cyc = round_step(rnd, "gen1"), model, None
        elif (src, dst) == ("gen1", "gen2") and pix2pix is not None:
            p2p, cyc = stage_model_uri(pix2pix["checkpoint_path"], self.cfg), model
            sub = round_step(rnd, "virtual")
        else:
            raise ValueError(f"step_gen({src!r}, {dst!r}): use masks -> gen1, or gen1 -> gen2 with pix2pix=")
        out = self.folder.uri(sub)  # the actors write there; an S3 run folder's copy fetches it after
        with quiet_ray_data():
            result = generate_dataset(
                self.folder.uri(f"round{rnd}", "prior.json"),
                p2p,
                cyc,
                self.cfg.prior.n_masks,
                out,
                self.cfg,
                seed=self.mask_seed(rnd),
                write_gen1=cyc is not None,
            )
        self.log(
            f"   {result.count} pairs in {out} ({result.generated} generated, {result.reused} kept from before; "
            f"{result.images_per_s:.1f} pairs/s)"
        )
        self.folder.pull(sub)
        return {**self.folder.to_local(result.to_dict(), sub), "folder": str(self.run_dir / sub / "images")}

    # -- step 5: CycleGAN -----------------------------------------------------------------------------------------
    def cyclegan_data(self, stack: dict, gen1: dict) -> dict[str, np.ndarray]:
        """A = 1st generation, B = real crops of subset 2; validation B from the test images."""
        folder = Path(gen1["folder"])
        gen = load_pngs(folder, sorted(p.name for p in folder.glob("*.png")))
        n_val = min(self.cfg.cyclegan.eval_images, max(len(gen) // 5, 2))
        real_b, _ = self.real_crops(stack["subset2"], self.cfg.data.real_crops)
        val_b, _ = self.real_crops(stack["test"] or stack["subset2"], max(n_val, 8))
        return {"train_a": gen[n_val:], "train_b": real_b, "val_a": gen[:n_val], "val_b": val_b}

    def step_cyclegan(self, stack: dict, gen1: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.train import train_stage

        result = train_stage(
            "cyclegan",
            self.cfg.cyclegan,
            self.cyclegan_data(stack, gen1),
            self.cfg,
            self.folder.uri(),  # Train checkpoints under <run>/ray, on S3 for an S3 run folder
            self.tracker,
            name=f"round{rnd}-cyclegan",
        )
        return result.to_dict()

    # -- step 6's output: the pairs the segmenter trains on ----------------------------------------------------
    def step_virtual(self, stack: dict, prior: dict, gen2: dict, rnd: int) -> dict[str, Any]:
        """Write the virtual dataset's manifest.json; its images are the generation that looks most real.

        The 2nd generation (images/) is used unless it is further from the real images (KID, same extractor and
        real crops) than the 1st (gen1/): an undertrained CycleGAN can erase particles, and a segmenter trained
        on such pairs learns wrong labels. Pair by pair, an image that does not show every particle of its mask
        (``masks/consistency.py``) is replaced by the other generation's when that one does. The choices and the
        scores are recorded.
        """
        import pandas as pd
        import torch

        from tgan_ray.metrics.gan import image_quality
        from tgan_ray.metrics.gan_extractors import build_feature_extractor

        virtual = Path(gen2["out"])
        rows = pd.read_parquet(gen2["manifest"])  # every generated pair, by index
        sample = rows.head(64)
        real, _ = self.real_crops(stack["test"] or stack["subset2"], max(len(sample), 16))
        extractor = build_feature_extractor("random-resnet18")

        def kid(column: str) -> float:
            fake = torch.from_numpy(load_pngs(virtual, sample[column].tolist()))[:, None] * 2 - 1
            scores = image_quality(fake, torch.from_numpy(real)[:, None] * 2 - 1, extractor, with_is=False)
            return float(scores["kid_random-resnet18"])

        scores = {"gen1": kid("gen1"), "gen2": kid("image")}
        source = "gen2" if scores["gen2"] <= scores["gen1"] else "gen1"
        if source == "gen1":
            self.log(
                f"   CycleGAN output is less realistic than pix2pix's (KID {scores['gen2']:.4g} vs "
                f"{scores['gen1']:.4g}): the virtual dataset uses the 1st generation; "
                "train CycleGAN longer (cyclegan.epochs) to get the 2nd"
            )
        self.tracker.log_metrics({f"round{rnd}/virtual_kid_{k}": v for k, v in scores.items()})
        first, second = ("image", "gen1") if source == "gen2" else ("gen1", "image")
        pairs, chosen = self._drawn_pairs(rows, virtual, first, second, rnd)
        self.log(
            f"   virtual pairs: {chosen['first']} from the {source} images, {chosen['second']} from the other "
            f"generation (the {source} image left a particle out), {chosen['neither']} with a particle neither drew"
        )
        self.tracker.log_metrics({f"round{rnd}/virtual_pairs_{k}": v for k, v in chosen.items()})
        write_json(
            virtual / "manifest.json",
            {
                "pairs": pairs,
                "count": len(pairs),
                "source": source,
                "kid_random-resnet18": scores,
                "chosen": chosen,
            },
        )
        return {
            "manifest": str(virtual / "manifest.json"),
            "count": len(pairs),
            "source": source,
            "kid": scores,
            "chosen": chosen,
        }

    def real_particle_contrast(self, rnd: int) -> float:
        """The real particles' signed median contrast to their support (step 2's masks of subset 1)."""
        from tgan_ray.masks.consistency import median_contrast

        rough = self.manifest.outputs(round_step(rnd, "rough"))
        stems = list(rough["particles"])
        return median_contrast(
            [self.work_frame(s) for s in stems],
            [load_mask(Path(rough["folder"]) / f"{s}.png") for s in stems],
        )

    def _drawn_pairs(self, rows, virtual: Path, first: str, second: str, rnd: int):
        """Pairs whose image shows every particle of the mask: column ``first``, else ``second``, else ``first``."""
        from PIL import Image

        from tgan_ray.masks.consistency import shows_all_particles

        reference = self.real_particle_contrast(rnd)
        min_fraction = self.cfg.segmenter.min_drawn_contrast

        def shows_all(column: str, row) -> bool:
            image = np.asarray(Image.open(virtual / row[column]), dtype=np.float32) / 255
            return shows_all_particles(image, load_mask(virtual / row["mask"]), reference, min_fraction)

        pairs, chosen = [], {"first": 0, "second": 0, "neither": 0}
        for _, row in rows.iterrows():
            if shows_all(first, row):
                column, key = first, "first"
            elif shows_all(second, row):
                column, key = second, "second"
            else:
                column, key = first, "neither"
            chosen[key] += 1
            pairs.append({"image": row[column], "mask": row["mask"], "first_generation": row["gen1"]})
        return pairs, chosen
