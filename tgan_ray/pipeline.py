"""Steps 1-8 of the method as one resumable run (DESIGN.md).

    result = run_pipeline("stack/", "runs/r1", load_config("quick"))

Run folder::

    manifest.json         finished steps and their outputs (re-running the same command resumes)
    config.yaml  stack.json  mlflow.db
    work/<stem>.npy       frames normalised and rescaled to the working scale
    round1/rough/         step 2: rough masks of subset 1
    round1/prior.json     step 2->4: morphology prior (+ prior_ks.json: KS distances of the sampled masks)
    round1/gen1/          step 4 (Ray Data, generate_dataset): masks -> pix2pix: images/ (1st generation),
                          masks/, generate.json, manifest.parquet; CycleGAN's domain A
    round1/virtual/       steps 4-6 (Ray Data, generate_dataset): the virtual labelled dataset: masks/ (random
                          masks, written by step 4 first), gen1/ (1st generation), images/ (2nd generation),
                          generate.json, manifest.parquet (every pair), and manifest.json (the pairs the segmenter
                          trains on: images/ or gen1/, whichever is closer to the real images by KID)
    round1/npssegnet.pt   step 7: the label-free segmenter
    masks/<stem>.png      step 8 (Ray Data, segment_stack): masks of the real stack at original resolution (0/255)
    segment/              step 8: segment.json (model and settings), images.parquet (one row per image),
                          particles.parquet, summary.json (segment_stack's PSD of the stack)
    particles.csv  summary.json  plots/  report.html

``run_dir`` may be an ``s3://`` prefix: S3 then holds the folder above, and the steps work in a local copy of it
(``run_folder.py``), uploaded after every step; Ray workers write ray/, the generated sets, masks/ and segment/ to S3.

Random mask i of round r is ``sample_capped_mask_at(prior, data.image_size, data.seed + 1000 r, i,
prior.max_empty_fraction)``: the same file in round{r}/virtual/masks and round{r}/gen1/masks.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.config import Config, config_to_dict, flatten_config, save_config
from tgan_ray.manifest import Manifest, write_json
from tgan_ray.run_folder import RunFolder
from tgan_ray.tracking import Tracker, resolve_tracking_uri


class PipelineError(ValueError):
    """A run that cannot go on: the message says why and what to change."""


@dataclass
class PipelineResult:
    run_dir: Path  # the local run folder, or the working copy of an S3 one
    summary: dict[str, Any]
    report: Path
    segmenter: Path
    remote: str | None = None  # the S3 run folder, if any


def _load_pngs(folder: Path, names: list[str], is_mask: bool = False) -> np.ndarray:
    from PIL import Image

    from tgan_ray.io import read_mask_png

    if is_mask:
        return np.stack([read_mask_png(folder / n).astype(np.uint8) for n in names])
    return np.stack([np.asarray(Image.open(folder / n)).astype(np.float32) / 255 for n in names])


class Pipeline:
    """One run folder and the steps that fill it. Each ``step_*`` is skipped when the manifest has it done."""

    def __init__(
        self, images: str, run_dir: str | Path, cfg: Config, seed_model: str | None = None, log=print
    ):
        self.images, self.cfg, self.log = images, cfg, log
        self.seed_model = seed_model or (cfg.rough.seed_model if cfg.rough.method == "model" else None)
        self.folder = RunFolder(run_dir, cfg.storage)
        self.folder.pull()  # an S3 run folder resumes on any machine
        self.run_dir = self.folder.local
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.run_dir)
        if self.folder.remote and self.manifest.get("working_copy") != str(self.run_dir):
            self.manifest.set("working_copy", str(self.run_dir))
        self.rng = np.random.default_rng(cfg.data.seed)
        saved = self.manifest.get("config")
        _check_same_config(self.run_dir, saved, cfg)
        if saved is None:
            self.manifest.set("config", config_to_dict(cfg))
            self.manifest.set("images", images)
        save_config(cfg, self.run_dir / "config.yaml")
        self.tracker = self._parent_run()
        self.folder.push()

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def _parent_run(self) -> Tracker:
        uri = resolve_tracking_uri(self.cfg.tracking, self.run_dir)
        root = Tracker(uri, self.cfg.tracking.experiment)
        run_id = self.manifest.get("mlflow_run_id")
        if run_id:
            return Tracker(uri, self.cfg.tracking.experiment, run_id)
        parent = root.start_child(f"pipeline-{self.run_dir.name}", tags={"images": self.images})
        parent.log_params(flatten_config(self.cfg))
        if parent.run_id:
            self.manifest.set("mlflow_run_id", parent.run_id)
        return parent

    def _step(self, name: str, fn, *args) -> dict[str, Any]:
        if self.manifest.done(name):
            self.log(f"== {name}: done earlier, skipped")
            return self.manifest.outputs(name)
        self.log(f"== {name} ...")
        t0 = time.time()
        outputs = fn(*args)
        self.manifest.mark_done(name, outputs, time.time() - t0)
        self.folder.push()
        self.log(f"== {name}: finished in {time.time() - t0:.1f}s")
        return outputs

    def _trained(self, stage: dict[str, Any]) -> dict[str, Any]:
        """A training step is recorded done: keep only its best model (``run.keep_checkpoints`` keeps all)."""
        from tgan_ray.train.driver import prune_checkpoints

        if not self.cfg.run.keep_checkpoints:
            freed = prune_checkpoints(stage, self.cfg.storage)
            if freed:
                self.log(f"   pruned {freed / 2**20:.0f} MB of Ray Train checkpoints (best model kept)")
        return stage

    def _work(self, stem: str) -> np.ndarray:
        return np.load(self.run_dir / "work" / f"{stem}.npy").astype(np.float32)

    # -- step 1: the stack -------------------------------------------------------------------------------------
    def step_stack(self) -> dict[str, Any]:
        from tgan_ray.data.splits import split_stack
        from tgan_ray.data.working import to_working, working_scale
        from tgan_ray.io import list_stack, load_stack
        from tgan_ray.masks.rough import MIN_FRAME_PX
        from tgan_ray.segment import unique_stems

        d = self.cfg.data
        uris = list_stack(self.images, self.cfg.storage)
        stems = unique_stems(uris)  # segment_stack (step 8) names the masks the same way
        ems, skipped = load_stack(uris, self.cfg.storage, min_images=max(d.min_images, d.subset1_size + 1))
        sidecar = _sidecar_pixel_size(uris[0]) if uris else None
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
        from tgan_ray.masks.rough import MIN_FRAME_PX

        r = self.cfg.rough
        seg = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, r.confidence)
        learn = [i for i, f in enumerate(frames) if min(f.shape) * stack_scale >= MIN_FRAME_PX]
        picks = [learn[k] for k in _spread(len(learn))]
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

    # -- step 2: rough masks -------------------------------------------------------------------------------------
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
            confident, candidates = segment(self._work(stem))
            write_pseudo_label(folder / "pseudo" / f"{stem}.png", pseudo_label(confident, candidates))
            if stem in stack["subset1"]:
                _save_pngs_named(folder / "rough", [stem], [confident])
                counts[stem] = _count(confident)
        masks = [_load_mask(folder / "rough" / f"{s}.png") for s in stack["subset1"]]
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
        from tgan_ray.masks.rough import cut_touching

        r = self.cfg.rough
        strict = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, r.confidence)
        loose = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, confidence=0.0)
        picks = _spread(len(stems))
        contrast, radii = strict.stack_radii([self._work(stems[i]) for i in picks])
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
        """``work -> (confident mask, candidate mask)`` of an NPsSegNet: p > 0.5, and p > 0.2."""
        from tgan_ray.inference import Segmenter, clean_mask

        if rnd == 1:
            from tgan_ray.model_uri import resolve_model_uri

            model = resolve_model_uri(self.seed_model, self.cfg)  # a path, s3:// or models:/name/version
        else:
            model = self.run_dir / f"round{rnd - 1}" / "npssegnet.pt"
        seg = Segmenter(model, self.data_cfg, self.cfg.segmenter)

        def segment(work: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            probability = seg.probability_working(work)
            return clean_mask(probability > 0.5, seg.min_particle_px), probability > 0.2

        return segment

    # -- steps 2->4: morphology prior and random masks -----------------------------------------------------------
    def mask_seed(self, rnd: int) -> int:
        """Seed of round ``rnd``'s random masks (steps 4 and 6 draw mask i from (seed, i))."""
        return self.cfg.data.seed + 1000 * rnd

    def step_prior(self, stack: dict, rough: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.generate import pair_paths
        from tgan_ray.io import write_mask_png
        from tgan_ray.masks.prior import MorphologyPrior, compare_to_prior, sample_capped_mask_at

        masks = [_load_mask(Path(rough["folder"]) / f"{s}.png") for s in stack["subset1"]]
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

    def _real_crops(self, stems: list[str], n: int, masks: list[np.ndarray] | None = None):
        from tgan_ray.data.working import random_crops

        images = [self._work(s) for s in stems]
        return random_crops(
            images, self.cfg.data.image_size, n, self.rng, masks, self.cfg.data.positive_crops
        )

    # -- step 3: pix2pix ------------------------------------------------------------------------------------------
    def pix2pix_data(self, stack: dict, rough: dict, prior: dict, rnd: int) -> dict[str, np.ndarray]:
        """Subset-1 crops with their rough masks; validation: random masks vs real crops of the other images."""
        d = self.cfg.data
        images, masks = self._real_crops(stack["subset1"], d.real_crops, self.pix2pix_masks(stack, rough))
        n_val = min(self.cfg.pix2pix.eval_images, len(prior["masks"]))
        val_masks = _load_pngs(
            self.run_dir / f"round{rnd}" / "virtual" / "masks", prior["masks"][:n_val], True
        )
        val_real, _ = self._real_crops(stack["subset2"] + stack["test"], max(n_val, 8))
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
        masks = [_load_mask(Path(rough["folder"]) / f"{s}.png") for s in stems]
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
            sub, p2p, cyc = f"round{rnd}/gen1", model, None
        elif (src, dst) == ("gen1", "gen2") and pix2pix is not None:
            p2p, cyc = stage_model_uri(pix2pix["checkpoint_path"], self.cfg), model
            sub = f"round{rnd}/virtual"
        else:
            raise ValueError(f"step_gen({src!r}, {dst!r}): use masks -> gen1, or gen1 -> gen2 with pix2pix=")
        out = self.folder.uri(sub)  # the actors write there; an S3 run folder's copy fetches it after
        with _quiet_ray_data():
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
        gen = _load_pngs(folder, sorted(p.name for p in folder.glob("*.png")))
        n_val = min(self.cfg.cyclegan.eval_images, max(len(gen) // 5, 2))
        real_b, _ = self._real_crops(stack["subset2"], self.cfg.data.real_crops)
        val_b, _ = self._real_crops(stack["test"] or stack["subset2"], max(n_val, 8))
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

        from tgan_ray.metrics.gan import build_feature_extractor, image_quality

        virtual = Path(gen2["out"])
        rows = pd.read_parquet(gen2["manifest"])  # every generated pair, by index
        sample = rows.head(64)
        real, _ = self._real_crops(stack["test"] or stack["subset2"], max(len(sample), 16))
        extractor = build_feature_extractor("random-resnet18")

        def kid(column: str) -> float:
            fake = torch.from_numpy(_load_pngs(virtual, sample[column].tolist()))[:, None] * 2 - 1
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

    def _drawn_pairs(self, rows, virtual: Path, first: str, second: str, rnd: int):
        """Pairs whose image shows every particle of the mask: column ``first``, else ``second``, else ``first``."""
        from PIL import Image

        from tgan_ray.masks.consistency import median_contrast, shows_all_particles

        rough = self.manifest.outputs(f"round{rnd}/rough")
        stems = list(rough["particles"])
        reference = median_contrast(
            [self._work(s) for s in stems], [_load_mask(Path(rough["folder"]) / f"{s}.png") for s in stems]
        )
        min_fraction = self.cfg.segmenter.min_drawn_contrast

        def shows_all(column: str, row) -> bool:
            image = np.asarray(Image.open(virtual / row[column]), dtype=np.float32) / 255
            return shows_all_particles(image, _load_mask(virtual / row["mask"]), reference, min_fraction)

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

    # -- step 7: NPsSegNet ----------------------------------------------------------------------------------------
    def step_segmenter(self, prior: dict, virtual_step: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.model_uri import resolve_model
        from tgan_ray.models.npssegnet import load_segmenter, save_segmenter
        from tgan_ray.train import train_stage

        manifest = Path(virtual_step["manifest"])  # the pairs step_virtual chose, relative to their folder
        pairs = json.loads(manifest.read_text())["pairs"]
        images = _load_pngs(manifest.parent, [p["image"] for p in pairs])
        masks = _load_pngs(manifest.parent, [p["mask"] for p in pairs], is_mask=True)
        n_val = max(1, round(len(pairs) * 0.2))  # paper: train:test 4:1
        noise = self._missing_noise(images)
        real_images, real_labels = self._pseudo_labelled_crops(len(pairs) - n_val, rnd)
        if self.cfg.segmenter.ignore_unmasked:
            masks[n_val:] = self._unmasked_left_out(images[n_val:], masks[n_val:], rnd)
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
            },
        )
        return {**result.to_dict(), "model": str(path), "noise_std": noise}

    def _unmasked_left_out(self, images: np.ndarray, masks: np.ndarray, rnd: int) -> np.ndarray:
        """Training masks with the particles a generator painted outside its mask marked unsure (IGNORE)."""
        from tgan_ray.masks import ClassicalSegmenter
        from tgan_ray.masks.consistency import unmasked_particles
        from tgan_ray.masks.pseudo import IGNORE

        settings = self.manifest.outputs("round1/rough").get("settings")
        if not settings:  # rough.method sam / model: no classical settings of this stack yet
            stems = [f["stem"] for f in self.manifest.outputs("stack")["frames"]]
            work = [self._work(stems[i]) for i in _spread(len(stems))]
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

    def _pseudo_labelled_crops(self, n_virtual: int, rnd: int) -> tuple[np.ndarray, np.ndarray]:
        """Real crops of the non-test frames with step 2's pseudo-labels, ``segmenter.real_fraction`` of the set."""
        from tgan_ray.data.working import random_crops
        from tgan_ray.masks.pseudo import IGNORE, read_pseudo_label

        fraction = self.cfg.segmenter.real_fraction
        rough = self.manifest.outputs(f"round{rnd}/rough")
        size = self.cfg.data.image_size
        if fraction <= 0 or "pseudo" not in rough:
            return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.uint8)
        folder = Path(rough["pseudo"])
        stems = sorted(p.stem for p in folder.glob("*.png"))
        n = max(1, round(n_virtual * fraction / (1 - fraction)))
        labels = [read_pseudo_label(folder / f"{s}.png") for s in stems]
        images, crops = random_crops(
            [self._work(s) for s in stems], size, n, self.rng, labels, self.cfg.data.positive_crops
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
        real = [self._work(f["stem"]) for f in frames[:32]]
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

    # -- step 8: segment the real stack ------------------------------------------------------------------------
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

        with _quiet_ray_data():
            result = segment_stack(
                seg["model"],
                self.images,
                self.folder.uri("segment"),
                self.cfg,
                masks_dir=self.folder.uri("masks"),
                fallback_pixel_size_nm=_sidecar_pixel_size(stack["frames"][0]["source"]),
                frame_scales=_own_scales(stack),
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
        return outputs

    # -- the self-check: can the label-free masks be trusted? (analysis/selfcheck.py) -------------------------
    def step_selfcheck(self, stack: dict, seg: dict) -> dict[str, Any]:
        """Step 2's particles, and the final NPsSegNet against the classical segmenter's confident particles on
        frames it never trained on (the test split), at the working scale."""
        from tgan_ray.analysis import selfcheck
        from tgan_ray.inference import Segmenter, clean_mask
        from tgan_ray.masks import ClassicalSegmenter
        from tgan_ray.masks.rough import cut_touching

        rough = self.manifest.outputs("round1/rough")
        settings = rough.get("settings") or {}
        radii = settings.get("radii") or []
        expected = 2 * float(np.median(radii)) if radii else self.cfg.data.target_particle_px
        subset1 = stack["subset1"]
        plausibility = selfcheck.rough_plausibility(
            [self._work(s) for s in subset1],
            [_load_mask(Path(rough["folder"]) / f"{s}.png") for s in subset1],
            expected,
        )
        frames = stack["test"] or stack["subset2"][:8]
        agreement: dict[str, Any] = {"recall": None, "confident": 0, "found": 0}
        if radii:
            r = self.cfg.rough
            strict = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, r.confidence)
            model = Segmenter(seg["model"], self.data_cfg, self.cfg.segmenter)
            label_free, confident = [], []
            for stem in frames:
                work = self._work(stem)
                label_free.append(clean_mask(model.probability_working(work) > 0.5, model.min_particle_px))
                confident.append(cut_touching(strict.pick_radius(work, radii, settings["contrast"])[1]))
            agreement = selfcheck.confident_recall(label_free, confident)
        virtual = self.manifest.outputs(f"round{self.cfg.run.rounds}/virtual")
        realism = {
            "source": virtual.get("source"),
            "kid": (virtual.get("kid") or {}).get(virtual.get("source")),
        }
        result = selfcheck.verdict(plausibility, agreement, realism) | {"frames": frames}
        if result["warning"]:
            self.log(f"   warning: {result['warning']}")
        elif agreement["recall"] is not None:
            self.log(
                f"   self-check ok: the label-free masks find {agreement['recall']:.0%} of the "
                f"{agreement['confident']} particles the rough segmenter is sure of ({len(frames)} held-out frames)"
            )
        self.tracker.log_metrics({"selfcheck/confident_recall": agreement["recall"] or 0.0})
        return result

    # -- the report -----------------------------------------------------------------------------------------------
    def step_report(self, stack: dict, masks: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.pipeline_report import build_report

        return build_report(self, stack, masks, rnd)

    # -- the registry: the final NPsSegNet as a model version (``tgan serve models:/<name>/<version>``) ----------
    def step_register(self, seg: dict) -> dict[str, Any]:
        name = self.cfg.tracking.registered_model
        metrics = {k: v for k, v in seg.get("metrics", {}).items() if k.startswith("val/")}
        version = self.tracker.register_model(seg["model"], name, metrics)
        if version:
            self.log(f"   registered models:/{name}/{version}")
        return {"name": name, "version": version}

    def estimate_training(self) -> None:
        """Before a CPU run's first training step: print how long training will take, from a timed warm-up.

        Skipped on a cluster (``ray.address``, or ``RAY_ADDRESS`` inside a Ray job) or with GPU workers, where
        this process's CPU says nothing about the workers'."""
        from tgan_ray.runtime import cluster_address, use_gpu
        from tgan_ray.train.estimate import estimate_line, estimate_training

        if self.manifest.done("round1/pix2pix") or cluster_address(self.cfg.ray) or use_gpu(self.cfg.ray):
            return
        estimate = estimate_training(self.cfg)
        self.manifest.set("training_estimate", estimate)
        self.log(f"   {estimate_line(estimate)}")

    def run(self) -> PipelineResult:
        stack = self._step("stack", self.step_stack)
        self.estimate_training()
        seg = None
        for rnd in range(1, self.cfg.run.rounds + 1):
            r = f"round{rnd}"
            rough = self._step(f"{r}/rough", self.step_rough, stack, rnd)
            prior = self._step(f"{r}/prior", self.step_prior, stack, rough, rnd)
            p2p = self._trained(self._step(f"{r}/pix2pix", self.step_pix2pix, stack, rough, prior, rnd))
            gen1 = self._step(f"{r}/gen1", self.step_gen, "masks", "gen1", p2p, rnd)
            cyc = self._trained(self._step(f"{r}/cyclegan", self.step_cyclegan, stack, gen1, rnd))
            gen2 = self._step(f"{r}/gen2", self.step_gen, "gen1", "gen2", cyc, rnd, p2p)
            virtual = self._step(f"{r}/virtual", self.step_virtual, stack, prior, gen2, rnd)
            seg = self._trained(self._step(f"{r}/segmenter", self.step_segmenter, prior, virtual, rnd))
        masks = self._step("segment", self.step_segment, stack, seg)
        self._step("selfcheck", self.step_selfcheck, stack, seg)
        report = self._step("report", self.step_report, stack, masks, self.cfg.run.rounds)
        self._step("register", self.step_register, seg)
        self.tracker.end()
        return PipelineResult(
            self.run_dir, report["summary"], Path(report["report"]), Path(seg["model"]), self.folder.remote
        )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


@contextlib.contextmanager
def _quiet_ray_data():
    """No Ray Data progress bars inside the pipeline: each step prints its own summary line instead."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


def _spread(n: int, most: int = 8) -> list[int]:
    """Up to ``most`` indices spread evenly over ``n`` frames: the frames that fix a stack's contrast and radii."""
    return sorted({round(i) for i in np.linspace(0, n - 1, min(n, most))})


def _own_scales(stack: dict) -> dict[str, float] | None:
    """stem -> working scale of the frames step 1 gave their own scale (another magnification); None if none."""
    own = {f["stem"]: f["scale"] for f in stack["frames"] if f.get("scale") != stack["scale"]}
    return own or None


def _sidecar_pixel_size(first_uri: str) -> float | None:
    """A stack-wide calibration file, ``pixel_size.json`` ({"pixel_size_nm": ...}), beside or above the images.

    PNG and JPEG carry no calibration; `tgan synth` writes this file, and users can too.
    """
    if str(first_uri).startswith("s3://"):
        return None
    folder = Path(first_uri).parent
    for candidate in (folder / "pixel_size.json", folder.parent / "pixel_size.json"):
        if candidate.is_file():
            try:
                value = json.loads(candidate.read_text()).get("pixel_size_nm")
            except (json.JSONDecodeError, AttributeError):
                raise PipelineError(f"{candidate} is not valid JSON with a pixel_size_nm number") from None
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise PipelineError(f"{candidate}: pixel_size_nm must be a positive number, got {value!r}")
            return value
    return None


def _count(mask: np.ndarray) -> int:
    from skimage.measure import label

    return int(label(mask).max())


def _load_mask(path: Path) -> np.ndarray:
    from tgan_ray.io import read_mask_png

    return read_mask_png(path)


def _save_pngs_named(folder: Path, stems: list[str], masks: list[np.ndarray]) -> None:
    from tgan_ray.io import write_mask_png

    folder.mkdir(parents=True, exist_ok=True)
    for s, m in zip(stems, masks):
        write_mask_png(folder / f"{s}.png", m)


def _check_same_config(run_dir: Path | str, saved: dict | None, cfg: Config) -> None:
    if saved is not None and saved != config_to_dict(cfg):
        changed = sorted(k for k, v in flatten_config(cfg).items() if _flat(saved).get(k) != v)
        raise PipelineError(
            f"run folder {run_dir} was started with a different config ({', '.join(changed[:5])}); "
            "use a new --out, or the same settings to resume"
        )


def check_inputs(images: str, out: str | Path, cfg: Config, seed_model: str | None = None) -> None:
    """What a user can get wrong, checked before Ray, MLflow or a run folder: a failed check leaves nothing.

    The stack (folder, glob or S3 prefix, credentials included), the run folder (a folder, writable, or an S3
    prefix we may list; and, when it holds a run, one started with the same config) and a local seed model.

    Raises:
        StackError, StorageError or PipelineError, each with a one-line message naming the culprit.
    """
    from tgan_ray.io import list_stack
    from tgan_ray.io import storage as st

    list_stack(images, cfg.storage)
    if st.is_s3(out):
        _check_s3_run_folder(str(out), cfg)
    else:
        _check_local_run_folder(Path(out), cfg)
    remote = seed_model and (st.is_s3(seed_model) or ":/" in seed_model)  # s3://, models:/, runs:/
    if seed_model and not remote and not Path(seed_model).is_file():
        raise PipelineError(f"seed model not found: {seed_model}")


def _check_s3_run_folder(out: str, cfg: Config) -> None:
    from tgan_ray.io import storage as st

    st.check_access(out, cfg.storage)  # endpoint, credentials, bucket: one line each
    manifest = st.join(out, "manifest.json")
    if st.exists(manifest, cfg.storage):
        saved = json.loads(st.read_bytes(manifest, cfg.storage)).get("config")
        _check_same_config(out, saved, cfg)


def _check_local_run_folder(out: Path, cfg: Config) -> None:
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; the run folder must be a folder")
    if (out / "manifest.json").is_file():
        _check_same_config(out, Manifest(out).get("config"), cfg)
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PipelineError(f"cannot write the run folder {out}: {parent} is not writable")


def run_pipeline(
    images: str,
    out: str | Path,
    cfg: Config,
    seed_model: str | None = None,
    log=print,
    quiet: bool = False,
    progress=None,
) -> PipelineResult:
    """Run (or resume) steps 1-8 on a stack: a folder, a glob or an s3:// prefix.

    Args:
        out: the run folder: a local folder, or an ``s3://`` prefix (with a local working copy, ``run_folder.py``).
        log: where the step lines go.
        quiet: Ray, Ray Data, Train and MLflow logs and Python warnings go to ``<out>/logs/tgan.log`` (what
            ``tgan run`` does without ``-v``); the unreadable-files warning stays on the terminal.
        progress: with ``quiet``, the sink of the training stages' progress events (default: lines to ``log``;
            the CLI draws :class:`~tgan_ray.terminal.StageBars`).
    """
    from tgan_ray.runtime import init_ray, library_logs_to
    from tgan_ray.terminal import progress_line
    from tgan_ray.train.driver import progress_to

    check_inputs(images, out, cfg, seed_model)
    if not quiet:
        init_ray(cfg.ray)
        return Pipeline(images, out, cfg, seed_model, log).run()

    def lines(event: dict) -> None:
        if event.get("kind") != "end":
            log(progress_line(event))

    with library_logs_to(log_file(out)), progress_to(progress or lines):
        init_ray(cfg.ray, log_to_driver=False)
        return Pipeline(images, out, cfg, seed_model, log).run()


def log_file(run_dir: str | Path) -> Path:
    """Where a quiet run keeps Ray's, Train's and MLflow's logs (in the working copy of an S3 run folder)."""
    return RunFolder(run_dir).local / "logs" / "tgan.log"
