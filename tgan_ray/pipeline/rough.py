"""Step 2: rough masks of subset 1 and pseudo-labels of every non-test frame, from the classical
segmenter (round 1) or the previous round's NPsSegNet."""

from __future__ import annotations

from typing import Any

import numpy as np

from tgan_ray.pipeline.common import count_particles, load_mask, save_pngs_named, spread


class RoughStep:
    """Step 2 of :class:`~tgan_ray.pipeline.Pipeline`."""

    def step_rough(self, stack: dict, rnd: int) -> dict[str, Any]:
        """Rough masks of subset 1 (the prior's and pix2pix's), and pseudo-labels of every non-test frame.

        Round 1 runs the classical segmenter at one contrast for the stack and, per frame, the best of the
        stack's candidate particle radii (as ``tgan segment --rough``): a per-frame guess can lock onto noise.
        Later rounds (and ``--seed-model``) use the previous NPsSegNet.
        """
        from tgan_ray.masks import check_masks
        from tgan_ray.masks.pseudo import pseudo_label, write_pseudo_label

        stems = stack["subset1"] + stack["subset2"]
        if rnd == 1 and not self.seed_model and self.cfg.rough.method == "classical":
            segment, settings = self._classical_rough(stems)
        elif (
            rnd == 1 and not self.seed_model
        ):  # Segment Anything: its masks are both confident and candidates
            from tgan_ray.masks import create_rough_segmenter

            sam = create_rough_segmenter(self.cfg.rough)
            segment, settings = (lambda work: (sam.segment(work),) * 2), {}
        else:
            segment, settings = self._model_rough(rnd), {}
        folder = self.run_dir / f"round{rnd}"
        counts = {}
        for stem in stems:
            confident, candidates = segment(self.work_frame(stem))
            write_pseudo_label(folder / "pseudo" / f"{stem}.png", pseudo_label(confident, candidates))
            if stem in stack["subset1"]:
                save_pngs_named(folder / "rough", [stem], [confident])
                counts[stem] = count_particles(confident)
        masks = [load_mask(folder / "rough" / f"{s}.png") for s in stack["subset1"]]
        hint = None
        if rnd > 1:
            hint = f"round {rnd - 1}'s NPsSegNet found none: train it longer (segmenter.epochs) or use --rounds 1"
        check_masks(masks, stack["subset1"], hint)
        self.log(
            f"   rough masks: {sum(counts.values())} particles in {len(counts)} images; "
            f"pseudo-labels of {len(stems)} images"
        )
        return {
            "folder": str(folder / "rough"),
            "pseudo": str(folder / "pseudo"),
            "particles": counts,
            "settings": settings,
        }

    def _classical_rough(self, stems: list[str]):
        """``work -> (confident mask, candidate mask)`` of the classical segmenter, and its stack settings."""
        from skimage.segmentation import clear_border

        from tgan_ray.masks import ClassicalSegmenter
        from tgan_ray.masks.particle_labels import cut_touching

        r = self.cfg.rough
        strict = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, r.confidence)
        loose = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, confidence=0.0)
        picks = spread(len(stems))
        contrast, radii = strict.stack_radii([self.work_frame(stems[i]) for i in picks])
        self.log(
            f"   particle contrast {contrast}; radii at the working scale: {[round(x, 1) for x in radii]}"
        )

        def segment(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            radius, labels = strict.pick_radius(work, radii, contrast)
            candidates = loose.segment(work, radius, contrast)
            # The ring, shape and scale tests cannot judge a particle the frame edge cuts: unsure, not support.
            cut = loose.label(work, radius, contrast, plausible_only=False)
            candidates |= (cut > 0) & (clear_border(cut) == 0)
            return cut_touching(labels), candidates

        return segment, {"contrast": contrast, "radii": [round(x, 3) for x in radii]}

    def _model_rough(self, rnd: int):
        """``work -> (confident mask, candidate mask)`` of an NPsSegNet: p > 0.5, and p > 0.2.

        Not merged with the classical segmenter as step 8 merges them: a round 2 taught by the merged masks
        (unsure: p > 0.2 and the loose classical blobs) lost precision on every PtW frame, F1 0.765 against 0.842
        taught by the network alone. Likely cause: the loose blobs, mostly grains of support, were left out of
        the loss instead of taught as support (docs/quality.md, "A second round").
        """
        from tgan_ray.analysis.selfcheck import CANDIDATE_PROBABILITY
        from tgan_ray.inference import Segmenter

        if rnd == 1:
            from tgan_ray.model_uri import resolve_model_uri

            model = resolve_model_uri(self.seed_model, self.cfg)  # a path, s3:// or models:/name/version
        else:
            model = self.run_dir / f"round{rnd - 1}" / "npssegnet.pt"
        seg = Segmenter(model, self.data_cfg, self.cfg.segmenter)

        def segment(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            probability = seg.probability_working(work)
            return seg.working_mask(probability, work), probability > CANDIDATE_PROBABILITY

        return segment
