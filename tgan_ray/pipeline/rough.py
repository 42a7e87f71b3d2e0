"""Step 2: rough masks of subset 1 and pseudo-labels of every non-test frame, from the classical
segmenter (round 1) or the previous round's NPsSegNet."""

from __future__ import annotations

from typing import Any

import numpy as np

from tgan_ray.manifest import round_step
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

        A later round of a run whose round 1 was classical learns from what step 8 would have returned instead
        (:meth:`_tandem`): the network alone misses particles its teacher found (PtW: F1 0.75 alone, 0.82 merged).
        """
        from tgan_ray.analysis.selfcheck import CANDIDATE_PROBABILITY
        from tgan_ray.inference import Segmenter

        if rnd == 1:
            from tgan_ray.model_uri import resolve_model_uri

            model = resolve_model_uri(self.seed_model, self.cfg)  # a path, s3:// or models:/name/version
        else:
            model = self.run_dir / f"round{rnd - 1}" / "npssegnet.pt"
        seg = Segmenter(model, self.data_cfg, self.cfg.segmenter)
        tandem = self._tandem(seg, rnd)

        def segment(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            probability = seg.probability_working(work)
            unsure = probability > CANDIDATE_PROBABILITY
            if tandem is None:
                return seg.working_mask(probability, work), unsure
            return tandem(work, probability, unsure)

        return segment

    def _tandem(self, seg, rnd: int):
        """``(work, probability, unsure) -> (confident, candidates)`` as step 8 merges (``segmenter.merge_rough``,
        ``merge_candidates``), with round 1's classical settings; None where step 8 would not merge."""
        from tgan_ray.analysis.selfcheck import tandem_mask
        from tgan_ray.masks import ClassicalSegmenter

        s, r = self.cfg.segmenter, self.cfg.rough
        if rnd == 1 or not s.merge_rough:
            return None
        settings = self.manifest.outputs(round_step(1, "rough")).get("settings") or {}
        if not settings.get("radii"):  # round 1 used a seed model or Segment Anything
            return None
        strict = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, r.confidence)

        def segment(work: np.ndarray, probability: np.ndarray, unsure: np.ndarray):
            rough, loose = strict.segment_with_candidates([work], settings["radii"], settings["contrast"])[0]
            agreed = loose if s.merge_candidates else None
            return tandem_mask(seg, probability, work, 1.0, rough, agreed)[0], unsure | loose

        return segment
