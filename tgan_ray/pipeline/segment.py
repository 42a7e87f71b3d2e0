"""Step 8 and after: segment the real stack, the self-check, the report and the model registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.manifest import round_step
from tgan_ray.pipeline.common import PipelineError, load_mask, own_scales, quiet_ray_data, sidecar_pixel_size


class SegmentSteps:
    """Step 8, the self-check, the report and the registry of :class:`~tgan_ray.pipeline.Pipeline`."""

    def step_segment(self, stack: dict, seg: dict) -> dict[str, Any]:
        """Segment the real stack with Ray Data (:func:`~tgan_ray.segment.segment_stack`, as ``tgan segment``).

        Masks go to ``<run>/masks/<stem>.png``; the image and particle tables and segment_stack's PSD summary to
        ``<run>/segment/``. The segmenter's checkpoint holds the stack's working scale. A crash resumes from the
        masks already written.

        Raises:
            PipelineError: an image that step 1 read could not be segmented.
        """
        import pandas as pd

        from tgan_ray.segment import STATUS_ERROR, segment_stack

        with quiet_ray_data():
            result = segment_stack(
                seg["model"],
                self.images,
                self.folder.uri("segment"),
                self.cfg,
                masks_dir=self.folder.uri("masks"),
                fallback_pixel_size_nm=sidecar_pixel_size(stack["frames"][0]["source"]),
                frame_scales=own_scales(stack),
            )
        outputs = result.to_dict()
        for sub in ("segment", "masks"):  # the actors wrote there; an S3 run folder's copy fetches it
            self.folder.pull(sub)
            outputs = self.folder.to_local(outputs, sub)
        outputs["folder"] = str(self.run_dir / "masks")
        table = pd.read_parquet(outputs["images_table"]).set_index("image")
        status = table["status"].to_dict()
        failed = [f["stem"] for f in stack["frames"] if status.get(f["stem"], STATUS_ERROR) == STATUS_ERROR]
        if failed:
            reasons = "; ".join(f"{s}: {table['reason'].get(s, 'not listed any more')}" for s in failed[:3])
            raise PipelineError(
                f"step 8 could not segment {len(failed)} image(s) of {self.images}: {reasons}"
            )
        self.log(
            f"   {len(stack['frames'])} images: {result.segmented} segmented, {result.reused} masks kept from "
            f"before; {result.particles} particles ({result.seconds:.1f}s)"
        )
        from tgan_ray.analysis.selfcheck import LEAD_ROUGH

        rough_led = sorted(table.index[table["lead"] == LEAD_ROUGH])
        if rough_led:  # segmenter.merge_rough: frames where NPsSegNet missed most of the rough particles
            self.log(
                f"   the rough segmenter's masks lead on {len(rough_led)} frame(s), where NPsSegNet missed most of "
                f"its particles: {', '.join(rough_led[:5])}{' ...' if len(rough_led) > 5 else ''}"
            )
        return outputs

    # -- the self-check: can the label-free masks be trusted? (analysis/selfcheck.py) -------------------------
    def step_selfcheck(self, stack: dict, seg: dict) -> dict[str, Any]:
        """Step 2's particles, and the final NPsSegNet against the classical segmenter's confident particles on
        frames it never trained on (the test split), at the working scale."""
        from tgan_ray.analysis import selfcheck
        from tgan_ray.inference import Segmenter
        from tgan_ray.masks import ClassicalSegmenter

        rough = self.manifest.outputs(round_step(1, "rough"))
        settings = rough.get("settings") or {}
        radii = settings.get("radii") or []
        expected = 2 * float(np.median(radii)) if radii else self.cfg.data.target_particle_px
        subset1 = stack["subset1"]
        plausibility = selfcheck.rough_plausibility(
            [self.work_frame(s) for s in subset1],
            [load_mask(Path(rough["folder"]) / f"{s}.png") for s in subset1],
            expected,
        )
        frames = stack["test"] or stack["subset2"][:8]
        agreement: dict[str, Any] = {"recall": None, "confident": 0, "found": 0}
        support: dict[str, Any] = {}
        if radii:
            r = self.cfg.rough
            strict = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, r.confidence)
            model = Segmenter(seg["model"], self.data_cfg, self.cfg.segmenter)
            works = [self.work_frame(stem) for stem in frames]
            label_free = [model.segment_working(work) for work in works]
            # the frames share the threads; the candidates are the loose blobs at each frame's picked radius
            confident, candidates = zip(
                *strict.segment_with_candidates(works, radii, settings["contrast"]), strict=True
            )
            particles = selfcheck.label_free_particles(label_free)
            agreement = selfcheck.confident_recall(particles, confident)
            support = selfcheck.supported_share(particles, candidates)
        virtual = self.manifest.outputs(f"round{self.cfg.run.rounds}/virtual")
        realism = {
            "source": virtual.get("source"),
            "kid": (virtual.get("kid") or {}).get(virtual.get("source")),
        }
        result = selfcheck.verdict(plausibility, agreement, realism, support) | {"frames": frames}
        if result["warning"]:
            self.log(f"   warning: {result['warning']}")
        elif agreement["recall"] is not None:
            supported = (
                f", and {support['share']:.0%} of their {support['particles']} particles have a classical "
                "candidate under them"
                if support.get("share") is not None
                else ""
            )
            self.log(
                f"   self-check ok: the label-free masks find {agreement['recall']:.0%} of the "
                f"{agreement['confident']} particles the rough segmenter is sure of{supported} "
                f"({len(frames)} held-out frames)"
            )
        self.tracker.log_metrics({"selfcheck/confident_recall": agreement["recall"] or 0.0})
        return result

    # -- the report -----------------------------------------------------------------------------------------------
    def step_report(self, stack: dict, masks: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.pipeline.report import build_report

        return build_report(self, stack, masks, rnd)

    # -- the registry: the final NPsSegNet as a model version (``tgan serve models:/<name>/<version>``) ----------
    def step_register(self, seg: dict) -> dict[str, Any]:
        name = self.cfg.tracking.registered_model
        metrics = {k: v for k, v in seg.get("metrics", {}).items() if k.startswith("val/")}
        version = self.tracker.register_model(seg["model"], name, metrics)
        if version:
            self.log(f"   registered models:/{name}/{version}")
        return {"name": name, "version": version}
