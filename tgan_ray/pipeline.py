"""Steps 1-8 of the method as one resumable run (DESIGN.md).

    result = run_pipeline("stack/", "runs/r1", load_config("quick"))

Run folder::

    manifest.json         finished steps and their outputs (re-running the same command resumes)
    config.yaml  stack.json  mlflow.db
    work/<stem>.npy       frames normalised and rescaled to the working scale
    round1/rough/         step 2: rough masks of subset 1
    round1/prior.json     step 2->4: morphology prior (+ KS distances of the sampled masks)
    round1/virtual/       steps 4-6: masks/, gen1/, gen2/ and manifest.json (the virtual labelled dataset)
    round1/npssegnet.pt   step 7: the label-free segmenter
    masks/<stem>.png      step 8: masks of the real stack at original resolution (0/255)
    particles.csv  summary.json  plots/  report.html
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.config import Config, config_to_dict, flatten_config, save_config
from tgan_ray.manifest import Manifest, write_json
from tgan_ray.tracking import Tracker, resolve_tracking_uri


class PipelineError(ValueError):
    """A run that cannot go on: the message says why and what to change."""


@dataclass
class PipelineResult:
    run_dir: Path
    summary: dict[str, Any]
    report: Path
    segmenter: Path


def _png_u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _save_pngs(folder: Path, arrays: np.ndarray, is_mask: bool = False) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, a in enumerate(arrays):
        name = f"{i:06d}.png"
        tmp = folder / f".{name}.tmp"
        Image.fromarray((a > 0).astype(np.uint8) * 255 if is_mask else _png_u8(a)).save(tmp, format="PNG")
        tmp.replace(folder / name)
        names.append(name)
    return names


def _load_pngs(folder: Path, names: list[str], is_mask: bool = False) -> np.ndarray:
    from PIL import Image

    arrays = [np.asarray(Image.open(folder / n)) for n in names]
    return np.stack([(a > 127).astype(np.uint8) if is_mask else a.astype(np.float32) / 255 for a in arrays])


class Pipeline:
    """One run folder and the steps that fill it. Each ``step_*`` is skipped when the manifest has it done."""

    def __init__(
        self, images: str, run_dir: str | Path, cfg: Config, seed_model: str | None = None, log=print
    ):
        self.images, self.cfg, self.log = images, cfg, log
        self.seed_model = seed_model or (cfg.rough.seed_model if cfg.rough.method == "model" else None)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.run_dir)
        self.rng = np.random.default_rng(cfg.data.seed)
        saved = self.manifest.get("config")
        if saved is not None and saved != config_to_dict(cfg):
            changed = sorted(k for k, v in flatten_config(cfg).items() if _flat(saved).get(k) != v)
            raise PipelineError(
                f"run folder {self.run_dir} was started with a different config ({', '.join(changed[:5])}); "
                "use a new --out, or the same settings to resume"
            )
        if saved is None:
            self.manifest.set("config", config_to_dict(cfg))
            self.manifest.set("images", images)
        save_config(cfg, self.run_dir / "config.yaml")
        self.tracker = self._parent_run()

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
        self.log(f"== {name}: finished in {time.time() - t0:.1f}s")
        return outputs

    def _work(self, stem: str) -> np.ndarray:
        return np.load(self.run_dir / "work" / f"{stem}.npy").astype(np.float32)

    # -- step 1: the stack -------------------------------------------------------------------------------------
    def step_stack(self) -> dict[str, Any]:
        from tgan_ray.data.splits import split_stack
        from tgan_ray.data.working import to_working, working_scale
        from tgan_ray.io import list_stack, load_stack, normalize_intensity

        d = self.cfg.data
        uris = list_stack(self.images, self.cfg.storage)
        ems, skipped = load_stack(uris, self.cfg.storage, min_images=max(d.min_images, d.subset1_size + 1))
        sidecar = _sidecar_pixel_size(uris[0]) if uris else None
        normalised = [
            normalize_intensity(em.data, d.norm_low_percentile, d.norm_high_percentile) for em in ems
        ]
        stack_scale = self._stack_scale(normalised)
        frames, seen = [], set()
        (self.run_dir / "work").mkdir(exist_ok=True)
        for em, norm in zip(ems, normalised):
            stem = Path(em.source).stem
            while stem in seen:  # two folders with the same file name
                stem += "_"
            seen.add(stem)
            scale = working_scale(norm.shape, self.data_cfg_for(stack_scale))
            np.save(self.run_dir / "work" / f"{stem}.npy", to_working(norm, scale).astype(np.float16))
            pixel = d.pixel_size_nm or em.pixel_size_nm or sidecar
            frames.append(
                {
                    "stem": stem,
                    "source": em.source,
                    "shape": list(norm.shape),
                    "scale": scale,
                    "pixel_size_nm": pixel,
                }
            )
        split = split_stack([f["stem"] for f in frames], d.subset1_size, d.test_fraction, d.seed)
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

    def data_cfg_for(self, scale: float):
        """The data settings with the stack's resolved scale: what inference on new frames must reuse."""
        return self.cfg.data.model_copy(update={"scale": scale, "target_particle_px": None})

    @property
    def data_cfg(self):
        return self.data_cfg_for(self.manifest.outputs("stack")["scale"])

    # -- step 2: rough masks -------------------------------------------------------------------------------------
    def step_rough(self, stack: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.masks import check_masks, create_rough_segmenter

        if rnd == 1 and not self.seed_model:
            segmenter = create_rough_segmenter(self.cfg.rough)
            segment = segmenter.segment
        else:
            from tgan_ray.inference import Segmenter

            if rnd == 1:
                from tgan_ray.model_uri import resolve_model_uri

                model = resolve_model_uri(self.seed_model, self.cfg)  # a path, s3:// or models:/name/version
            else:
                model = self.run_dir / f"round{rnd - 1}" / "npssegnet.pt"
            seg = Segmenter(model, self.data_cfg, self.cfg.segmenter)
            segment = seg.segment_working
        stems = stack["subset1"]
        masks = [segment(self._work(s)) for s in stems]
        check_masks(masks, stems)
        folder = self.run_dir / f"round{rnd}" / "rough"
        _save_pngs_named(folder, stems, masks)
        counts = {s: int(_count(m)) for s, m in zip(stems, masks)}
        self.log(f"   rough masks: {sum(counts.values())} particles in {len(stems)} images")
        return {"folder": str(folder), "particles": counts}

    # -- steps 2->4: morphology prior and random masks -----------------------------------------------------------
    def step_prior(self, stack: dict, rough: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.masks.prior import MorphologyPrior, compare_to_prior, sample_mask_at

        masks = [_load_mask(Path(rough["folder"]) / f"{s}.png") for s in stack["subset1"]]
        prior = MorphologyPrior.from_masks(masks)
        size = self.cfg.data.image_size
        seed = self.cfg.data.seed + 1000 * rnd
        n, max_empty = self.cfg.prior.n_masks, int(self.cfg.prior.max_empty_fraction * self.cfg.prior.n_masks)
        kept, empty, index = [], 0, 0
        # Each mask stays reproducible from (seed, index); empty draws past the allowed share are skipped.
        while len(kept) < n and index < 50 * n:
            mask = sample_mask_at(prior, size, seed, index)[0]
            index += 1
            if not mask.any():
                if empty >= max_empty:
                    continue
                empty += 1
            kept.append(mask)
        sampled = np.stack(kept)
        ks = compare_to_prior(prior, list(sampled))
        folder = self.run_dir / f"round{rnd}"
        prior.save(folder / "prior.json")
        write_json(folder / "prior_ks.json", ks)
        names = _save_pngs(folder / "virtual" / "masks", sampled, is_mask=True)
        self.tracker.log_metrics({f"round{rnd}/prior_ks_{k}": v for k, v in ks.items() if v is not None})
        self.log(
            "   KS distance of sampled masks to the prior: "
            + ", ".join(f"{k}={v:.3f}" for k, v in ks.items() if v is not None)
        )
        return {"prior": str(folder / "prior.json"), "ks": ks, "masks": names}

    def _real_crops(self, stems: list[str], n: int, masks_folder: Path | None = None):
        from tgan_ray.data.working import random_crops

        images = [self._work(s) for s in stems]
        masks = [_load_mask(masks_folder / f"{s}.png") for s in stems] if masks_folder else None
        return random_crops(
            images, self.cfg.data.image_size, n, self.rng, masks, self.cfg.data.positive_crops
        )

    # -- step 3: pix2pix ------------------------------------------------------------------------------------------
    def pix2pix_data(self, stack: dict, rough: dict, prior: dict, rnd: int) -> dict[str, np.ndarray]:
        """Subset-1 crops with their rough masks; validation: random masks vs real crops of the other images."""
        d = self.cfg.data
        images, masks = self._real_crops(stack["subset1"], d.real_crops, Path(rough["folder"]))
        n_val = min(self.cfg.pix2pix.eval_images, len(prior["masks"]))
        val_masks = _load_pngs(
            self.run_dir / f"round{rnd}" / "virtual" / "masks", prior["masks"][:n_val], True
        )
        val_real, _ = self._real_crops(stack["subset2"] + stack["test"], max(n_val, 8))
        return {"train_images": images, "train_masks": masks, "val_masks": val_masks, "val_images": val_real}

    def step_pix2pix(self, stack: dict, rough: dict, prior: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.train import train_stage

        data = self.pix2pix_data(stack, rough, prior, rnd)
        result = train_stage(
            "pix2pix",
            self.cfg.pix2pix,
            data,
            self.cfg,
            self.run_dir,
            self.tracker,
            name=f"round{rnd}-pix2pix",
        )
        return result.to_dict()

    # -- step 4: 1st generation -----------------------------------------------------------------------------------
    def _generate(self, model_path: str, inputs: np.ndarray) -> np.ndarray:
        from tgan_ray.inference import load_generator, run_generator

        return run_generator(load_generator(model_path), inputs, batch_size=16)

    def step_gen(self, src: str, dst: str, stage: dict, rnd: int) -> dict[str, Any]:
        virtual = self.run_dir / f"round{rnd}" / "virtual"
        names = sorted(p.name for p in (virtual / src).glob("*.png"))
        inputs = _load_pngs(virtual / src, names, is_mask=(src == "masks")).astype(np.float32)
        out = self._generate(str(Path(stage["checkpoint_path"]) / "model.pt"), inputs)
        _save_pngs(virtual / dst, out)
        return {"folder": str(virtual / dst), "count": len(out)}

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
            self.run_dir,
            self.tracker,
            name=f"round{rnd}-cyclegan",
        )
        return result.to_dict()

    # -- step 6 is step_gen again (gen1 -> gen2); the virtual dataset's manifest ---------------------------------
    def step_virtual(self, stack: dict, prior: dict, gen2: dict, rnd: int) -> dict[str, Any]:
        """Write the virtual dataset's manifest; its images are the generation that looks most real.

        The 2nd generation is used unless it is further from the real images (KID, same extractor and real
        crops) than the 1st: an undertrained CycleGAN can erase particles, and a segmenter trained on such pairs
        learns wrong labels. The choice and both scores are recorded.
        """
        import torch

        from tgan_ray.metrics.gan import build_feature_extractor, image_quality

        virtual = self.run_dir / f"round{rnd}" / "virtual"
        names = prior["masks"]
        sample = names[: min(len(names), 64)]
        real, _ = self._real_crops(stack["test"] or stack["subset2"], max(len(sample), 16))
        extractor = build_feature_extractor("random-resnet18")

        def kid(folder: str) -> float:
            fake = torch.from_numpy(_load_pngs(virtual / folder, sample))[:, None] * 2 - 1
            scores = image_quality(fake, torch.from_numpy(real)[:, None] * 2 - 1, extractor, with_is=False)
            return float(scores["kid_random-resnet18"])

        scores = {"gen1": kid("gen1"), "gen2": kid("gen2")}
        source = "gen2" if scores["gen2"] <= scores["gen1"] else "gen1"
        if source == "gen1":
            self.log(
                f"   CycleGAN output is less realistic than pix2pix's (KID {scores['gen2']:.4g} vs "
                f"{scores['gen1']:.4g}): the virtual dataset uses the 1st generation; "
                "train CycleGAN longer (cyclegan.epochs) to get the 2nd"
            )
        self.tracker.log_metrics({f"round{rnd}/virtual_kid_{k}": v for k, v in scores.items()})
        pairs = [
            {"image": f"{source}/{n}", "mask": f"masks/{n}", "first_generation": f"gen1/{n}"} for n in names
        ]
        write_json(
            virtual / "manifest.json",
            {"pairs": pairs, "count": len(pairs), "source": source, "kid_random-resnet18": scores},
        )
        return {
            "manifest": str(virtual / "manifest.json"),
            "count": len(pairs),
            "source": source,
            "kid": scores,
        }

    # -- step 7: NPsSegNet ----------------------------------------------------------------------------------------
    def step_segmenter(self, prior: dict, virtual_step: dict, rnd: int) -> dict[str, Any]:
        from tgan_ray.models.npssegnet import load_segmenter, save_segmenter
        from tgan_ray.train import train_stage

        virtual = self.run_dir / f"round{rnd}" / "virtual"
        names = prior["masks"]
        images = _load_pngs(virtual / virtual_step.get("source", "gen2"), names)
        masks = _load_pngs(virtual / "masks", names, is_mask=True)
        n_val = max(1, round(len(names) * 0.2))  # paper: train:test 4:1
        result = train_stage(
            "segmenter",
            self.cfg.segmenter,
            {
                "train_images": images[n_val:],
                "train_masks": masks[n_val:],
                "val_images": images[:n_val],
                "val_masks": masks[:n_val],
            },
            self.cfg,
            self.run_dir,
            self.tracker,
            name=f"round{rnd}-segmenter",
        )
        model, _ = load_segmenter(result.model_path)
        path = self.run_dir / f"round{rnd}" / "npssegnet.pt"
        save_segmenter(
            model,
            path,
            meta={
                "data": self.data_cfg.model_dump(mode="json"),
                "round": rnd,
                "val_miou": float(result.metrics.get("val/miou", float("nan"))),
                "source_run": str(self.run_dir.resolve()),
            },
        )
        return {**result.to_dict(), "model": str(path)}

    # -- step 8: segment the real stack ------------------------------------------------------------------------
    def step_segment(self, stack: dict, seg: dict) -> dict[str, Any]:
        from tgan_ray.inference import Segmenter
        from tgan_ray.io import load_stack, normalize_intensity, write_mask_png

        segmenter = Segmenter(seg["model"], self.data_cfg, self.cfg.segmenter)
        out = self.run_dir / "masks"
        out.mkdir(exist_ok=True)
        d = self.cfg.data
        for i, frame in enumerate(stack["frames"]):
            ems, _ = load_stack([frame["source"]], self.cfg.storage, min_images=1)
            norm = normalize_intensity(ems[0].data, d.norm_low_percentile, d.norm_high_percentile)
            write_mask_png(out / f"{frame['stem']}.png", segmenter.segment(norm))
            self.log(f"   segmented {i + 1}/{len(stack['frames'])}: {frame['stem']}")
        return {"folder": str(out)}

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

    def run(self) -> PipelineResult:
        stack = self._step("stack", self.step_stack)
        seg = None
        for rnd in range(1, self.cfg.run.rounds + 1):
            r = f"round{rnd}"
            rough = self._step(f"{r}/rough", self.step_rough, stack, rnd)
            prior = self._step(f"{r}/prior", self.step_prior, stack, rough, rnd)
            p2p = self._step(f"{r}/pix2pix", self.step_pix2pix, stack, rough, prior, rnd)
            gen1 = self._step(f"{r}/gen1", self.step_gen, "masks", "gen1", p2p, rnd)
            cyc = self._step(f"{r}/cyclegan", self.step_cyclegan, stack, gen1, rnd)
            gen2 = self._step(f"{r}/gen2", self.step_gen, "gen1", "gen2", cyc, rnd)
            virtual = self._step(f"{r}/virtual", self.step_virtual, stack, prior, gen2, rnd)
            seg = self._step(f"{r}/segmenter", self.step_segmenter, prior, virtual, rnd)
        masks = self._step("segment", self.step_segment, stack, seg)
        report = self._step("report", self.step_report, stack, masks, self.cfg.run.rounds)
        self._step("register", self.step_register, seg)
        self.tracker.end()
        return PipelineResult(self.run_dir, report["summary"], Path(report["report"]), Path(seg["model"]))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def _sidecar_pixel_size(first_uri: str) -> float | None:
    """A stack-wide calibration file, ``pixel_size.json`` ({"pixel_size_nm": ...}), beside or above the images.

    PNG and JPEG carry no calibration; `tgan synth` writes this file, and users can too.
    """
    import json

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
    from PIL import Image

    return np.asarray(Image.open(path)) > 127


def _save_pngs_named(folder: Path, stems: list[str], masks: list[np.ndarray]) -> None:
    from tgan_ray.io import write_mask_png

    folder.mkdir(parents=True, exist_ok=True)
    for s, m in zip(stems, masks):
        write_mask_png(folder / f"{s}.png", m)


def run_pipeline(
    images: str, out: str | Path, cfg: Config, seed_model: str | None = None, log=print
) -> PipelineResult:
    """Run (or resume) steps 1-8 on a stack: a folder, a glob or an s3:// prefix."""
    from tgan_ray.runtime import init_ray

    init_ray(cfg.ray)
    return Pipeline(images, out, cfg, seed_model, log).run()
