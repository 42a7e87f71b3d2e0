"""Step 1: list and read the stack, normalise it, pick the working scale (per frame where the
magnification differs), split it into subset 1, subset 2 and the test frames."""

from __future__ import annotations

from typing import Any

import numpy as np

from tgan_ray.manifest import write_json
from tgan_ray.pipeline.common import PipelineError, sidecar_pixel_size, spread


class StackStep:
    """Step 1 of :class:`~tgan_ray.pipeline.Pipeline`."""

    def step_stack(self) -> dict[str, Any]:
        from tgan_ray.data.splits import split_stack
        from tgan_ray.data.working import to_working, working_scale
        from tgan_ray.io import list_stack, load_stack
        from tgan_ray.masks.classical import MIN_FRAME_PX
        from tgan_ray.segment import unique_stems

        d = self.cfg.data
        uris = list_stack(self.images, self.cfg.storage)
        stems = unique_stems(uris)  # segment_stack (step 8) names the masks the same way
        ems, skipped = load_stack(uris, self.cfg.storage, min_images=max(d.min_images, d.subset1_size + 1))
        sidecar = sidecar_pixel_size(uris[0]) if uris else None
        normalised = [d.normalize(em.data) for em in ems]
        # Frames too small to analyse (thumbnails, crops of a few px) are segmented in step 8 but not learnt from.
        big = [n for n in normalised if min(n.shape) >= MIN_FRAME_PX]
        if not big:
            raise PipelineError(f"every image of {self.images} is under {MIN_FRAME_PX} px on a side")
        stack_scale = self._stack_scale(big)
        scales = [working_scale(n.shape, self.data_cfg_for(stack_scale)) for n in normalised]
        if d.resize_mode == "tile" and d.target_particle_px and d.magnification_tolerance:
            scales = self._frame_scales([stems[em.source] for em in ems], normalised, stack_scale)
        frames = []
        (self.run_dir / "work").mkdir(exist_ok=True)
        for em, norm, scale in zip(ems, normalised, scales, strict=True):
            stem = stems[em.source]  # two folders with the same file name: "a", "a_"
            work = to_working(norm, scale)
            np.save(self.run_dir / "work" / f"{stem}.npy", work.astype(np.float16))
            pixel = d.pixel_size_nm or em.pixel_size_nm or sidecar
            frames.append(
                {
                    "stem": stem,
                    "source": em.source,
                    "shape": list(norm.shape),
                    "scale": scale,
                    "pixel_size_nm": pixel,
                    "learn": min(work.shape) >= MIN_FRAME_PX,
                }
            )
        small = [f"{f['stem']} ({f['shape'][0]}x{f['shape'][1]} px)" for f in frames if not f["learn"]]
        if small:
            self.log(f"   too small to learn from, segmented only: {', '.join(small[:5])}")
        learn = [f["stem"] for f in frames if f["learn"]]
        split = split_stack(learn, d.subset1_size, d.test_fraction, d.seed)
        out = {
            "frames": frames,
            "skipped": [list(s) for s in skipped],
            "scale": stack_scale,
            "subset1": split.subset1,
            "subset2": split.subset2,
            "test": split.test,
        }
        write_json(self.run_dir / "stack.json", out)
        self.log(
            f"   {len(frames)} images ({len(skipped)} unreadable): subset 1 = {len(split.subset1)}, "
            f"subset 2 = {len(split.subset2)}, test = {len(split.test)}"
        )
        return out

    def _stack_scale(self, frames: list[np.ndarray]) -> float:
        """One working scale for the whole stack (so real size differences between frames survive).

        With ``data.target_particle_px`` the stack is rescaled until its median particle diameter, found by
        scale-space blob detection, is that many px: magnification varies from stack to stack.
        """
        d = self.cfg.data
        if d.resize_mode != "tile" or not d.target_particle_px:
            return d.scale
        from tgan_ray.masks import ClassicalSegmenter

        seg = ClassicalSegmenter(self.cfg.rough.particle_contrast)
        diameter = 2 * float(np.median([seg.estimate_scale(f) for f in frames]))
        scale = float(np.clip(d.target_particle_px / diameter, 1 / 16, 4))
        self.log(f"   median particle diameter {diameter:.1f} px: working scale {scale:.3g}")
        return scale

    def _frame_scales(self, stems: list[str], frames: list[np.ndarray], stack_scale: float) -> list[float]:
        """Per frame, the stack's scale or, for a frame taken at another magnification, its own
        (:func:`~tgan_ray.data.working.frame_scales`): particles measured as step 2 finds them."""
        from tgan_ray.data.working import frame_scales, to_working
        from tgan_ray.masks import ClassicalSegmenter
        from tgan_ray.masks.classical import MIN_FRAME_PX

        r = self.cfg.rough
        seg = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, r.confidence)
        learn = [i for i, f in enumerate(frames) if min(f.shape) * stack_scale >= MIN_FRAME_PX]
        picks = [learn[k] for k in spread(len(learn))]
        contrast, radii = seg.stack_radii([to_working(frames[i], stack_scale) for i in picks])
        diameters = [
            seg.particle_diameter(to_working(f, stack_scale), radii, contrast) if i in learn else None
            for i, f in enumerate(frames)
        ]
        scales = frame_scales(stack_scale, diameters, self.cfg.data.magnification_tolerance)
        moved = [f"{s} (x{x / stack_scale:.2g})" for s, x in zip(stems, scales) if x != stack_scale]
        if moved:
            self.log(
                f"   {len(moved)} frame(s) taken at another magnification, each at its own scale: "
                f"{', '.join(moved[:6])}{' ...' if len(moved) > 6 else ''}"
            )
        return scales

    def data_cfg_for(self, scale: float):
        """The data settings with the stack's resolved scale: what inference on new frames must reuse."""
        return self.cfg.data.model_copy(update={"scale": scale, "target_particle_px": None})

    @property
    def data_cfg(self):
        return self.data_cfg_for(self.manifest.outputs("stack")["scale"])
