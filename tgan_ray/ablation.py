"""The paper's ablation (its Figure 3): does pix2pix on 5 images plus CycleGAN beat pix2pix on more images?

    df = run_ablation("stack/", "runs/ablation", load_config("quick"))      # tgan ablate --images stack/ ...

It trains pix2pix on growing, nested subsets of the stack (5, 10, 20, 40, all by default) and, from the smallest
one, the tandem pix2pix + CycleGAN, then scores every variant against real images it never saw:

- **training**: subsets are prefixes of one order (the pipeline's subset 1, then subset 2 shuffled by
  ``data.seed``), so each contains the smaller ones; every subset gets as many random crops per image as the
  smallest (``data.real_crops`` over its images), and the same GAN settings.
- **held-out images**: the pipeline's test split (``data.test_fraction``). No variant trains on them and no
  checkpoint is chosen with them: checkpoints are chosen by KID against the other (training-pool) images.
- **unpaired scores** (FID, KID, IS): images generated from the same random masks (sampled from the morphology
  prior of the smallest subset's rough masks) for every variant, against crops of the held-out frames.
- **paired scores** (SSIM, PSNR): each held-out crop's rough mask goes through the variant, and the output is
  compared pixel by pixel with that crop. A generator only sees morphology, so this asks how closely it turns a
  real image's particle layout back into that image; shot noise cannot be reproduced, so values stay well below
  those of image-restoration tasks and only their order matters.

Outputs in ``out``: ``ablation.csv``, ``ablation.json`` and ``ablation.png`` (one panel per metric), next to the
pipeline-style run folder (``manifest.json``, ``work/``, ``ray/``, ``mlflow.db``) that makes a re-run resume.
The held-out crops, the scoring of one variant and the plot are in :mod:`tgan_ray.ablation_scores`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.ablation_scores import ID_COLUMNS, held_out_set, plot_ablation, score_table, score_variant
from tgan_ray.config import Config
from tgan_ray.manifest import write_json

DEFAULT_SUBSET_SIZES: tuple[int | None, ...] = (5, 10, 20, 40, None)


def plan_subsets(pool_size: int, sizes: Sequence[int | None], log=print) -> list[int]:
    """Subset sizes that fit the pool, ascending and unique (``None`` = the whole pool).

    Raises:
        ValueError: a size below 1, or no size that fits.
    """
    planned = set()
    for size in sizes:
        if size is None:
            planned.add(pool_size)
        elif int(size) < 1:
            raise ValueError(f"ablation subset size {size} must be >= 1 (or None for all images)")
        elif int(size) > pool_size:
            log(
                f"   subset of {size} images dropped: only {pool_size} training images besides the held-out ones"
            )
        else:
            planned.add(int(size))
    if not planned:
        raise ValueError(f"no ablation subset size in {list(sizes)} fits the {pool_size} training images")
    return sorted(planned)


class Ablation:
    """One ablation run folder: a :class:`~tgan_ray.pipeline.Pipeline` plus resumable ``ablation/*`` steps."""

    def __init__(
        self,
        images: str,
        out: str | Path,
        cfg: Config,
        extractor: str = "random-resnet18",
        extractor_weights: str | None = None,
        n_generated: int | None = None,
        log=print,
    ):
        from tgan_ray.pipeline import Pipeline

        self.cfg, self.log = cfg, log
        self.out = Path(out)
        self.pipe = Pipeline(images, self.out, cfg, log=log)
        self.extractor_name, self.extractor_weights = extractor, extractor_weights
        self.n_generated = n_generated
        self.rough_dir = self.out / "ablation" / "rough"

    # -- data -----------------------------------------------------------------------------------------------
    def split(self) -> tuple[dict, list[str], list[str]]:
        """(stack, training pool in subset order, held-out stems). The pool starts with the pipeline's subset 1,
        then subset 2 in a seeded order, so every subset contains the smaller ones."""
        stack = self.pipe.run_step("stack", self.pipe.step_stack)
        if not stack["test"]:
            raise ValueError(
                f"the ablation needs held-out images, but data.test_fraction={self.cfg.data.test_fraction} leaves "
                f"none of the {len(stack['frames'])} images; raise it"
            )
        rest = [
            str(s) for s in np.random.default_rng(self.cfg.data.seed).permutation(sorted(stack["subset2"]))
        ]
        return stack, [*stack["subset1"], *rest], list(stack["test"])

    def rough_masks(self, stems: list[str]) -> dict[str, Any]:
        """Rough-segment the working-scale frames that have no mask yet (files make this resumable)."""
        from tgan_ray.io import write_mask_png
        from tgan_ray.masks import create_rough_segmenter

        todo = [s for s in stems if not (self.rough_dir / f"{s}.png").is_file()]
        if todo:
            segment = create_rough_segmenter(self.cfg.rough).segment
            self.rough_dir.mkdir(parents=True, exist_ok=True)
            for stem in todo:
                write_mask_png(self.rough_dir / f"{stem}.png", segment(self.pipe.work_frame(stem)))
            self.log(f"   rough masks of {len(todo)} images in {self.rough_dir}")
        return {"folder": str(self.rough_dir)}

    def _mask(self, stem: str) -> np.ndarray:
        from tgan_ray.io import read_mask_png

        return read_mask_png(self.rough_dir / f"{stem}.png").astype(np.uint8)

    # -- training -------------------------------------------------------------------------------------------
    def train_pix2pix(self, train: list[str], pool: list[str], rough: dict, prior: dict, crops: int) -> dict:
        """pix2pix on ``train`` (its rough masks); checkpoints chosen by KID against crops of the whole pool."""
        from tgan_ray.train import train_stage

        data = self.pipe.pix2pix_data({"subset1": train, "subset2": pool, "test": []}, rough, prior, 1)
        if crops > len(data["train_images"]):
            data["train_images"], data["train_masks"] = self.pipe.real_crops(
                train, crops, self.pipe.pix2pix_masks({"subset1": train}, rough)
            )
        result = train_stage(
            "pix2pix",
            self.cfg.pix2pix,
            data,
            self.cfg,
            self.out,
            self.pipe.tracker,
            name=f"ablation-pix2pix-{len(train)}",
        )
        return result.to_dict()

    def train_cyclegan(self, domain_b: list[str], gen1: dict, name: str) -> dict:
        """CycleGAN between the 1st generation and real crops of ``domain_b`` (never the held-out images)."""
        from tgan_ray.train import train_stage

        data = self.pipe.cyclegan_data({"subset2": domain_b, "test": []}, gen1)
        result = train_stage(
            "cyclegan", self.cfg.cyclegan, data, self.cfg, self.out, self.pipe.tracker, name=name
        )
        return result.to_dict()

    # -- the run, step by step -------------------------------------------------------------------------------
    def run(self, subset_sizes: Sequence[int | None] = DEFAULT_SUBSET_SIZES):
        """Train every variant, score it against the held-out images and write the table; each step resumes.

        Returns:
            The table, as :func:`run_ablation` describes it.
        """
        _, pool, held_out = self.split()
        sizes = self.plan(pool, held_out, subset_sizes)
        rough = self.rough_masks(pool[: sizes[-1]] + held_out)
        prior = self.smallest_prior(pool[: sizes[0]], rough)
        variants = self.pix2pix_variants(pool, sizes, rough, prior)
        variants.append(self.tandem_variant(pool, sizes[0], variants[0]))
        table, label = self.score_variants(variants, held_out, prior)
        self.write(table, label, pool, held_out)
        self.pipe.tracker.end()
        return table

    def plan(self, pool: list[str], held_out: list[str], subset_sizes: Sequence[int | None]) -> list[int]:
        """The subset sizes (:func:`plan_subsets`); the smallest is recorded in the manifest.

        Raises:
            ValueError: the run folder ran the ablation with another smallest subset.
        """
        pipe = self.pipe
        sizes = plan_subsets(len(pool), subset_sizes, self.log)
        self.log(
            f"   ablation: pix2pix on {sizes} of {len(pool)} training images, tandem from {sizes[0]}; "
            f"{len(held_out)} held-out images"
        )
        smallest_before = pipe.manifest.get("ablation_smallest_subset")
        if smallest_before not in (None, sizes[0]):
            # The random masks, the 1st generation and the CycleGAN all hang on the smallest subset.
            raise ValueError(
                f"run folder {self.out} ran the ablation with a smallest subset of {smallest_before} images, "
                f"now {sizes[0]}; use a new output folder"
            )
        pipe.manifest.set("ablation_smallest_subset", sizes[0])
        return sizes

    def smallest_prior(self, smallest: list[str], rough: dict) -> dict:
        """The morphology prior of the smallest subset's rough masks."""
        from tgan_ray.masks import check_masks

        pipe = self.pipe
        check_masks([self._mask(s) for s in smallest], smallest)  # an empty prior would fail obscurely later
        # The random masks follow the smallest subset's morphology, as in the method (step 4).
        return pipe.run_step(
            f"ablation/prior-{len(smallest)}", pipe.step_prior, {"subset1": smallest}, rough, 1
        )

    def pix2pix_variants(self, pool: list[str], sizes: list[int], rough: dict, prior: dict) -> list[dict]:
        """pix2pix on the first ``n`` pool images for each size ``n``: one variant each, as
        :func:`score_variant` takes it."""
        step, d = self.pipe.run_step, self.cfg.data
        variants = []
        for n in sizes:
            # As many crops per training image as the smallest subset (the pipeline's pix2pix) gets.
            crops = max(d.real_crops, round(n * d.real_crops / sizes[0]))
            p2p = step(f"ablation/pix2pix-{n}", self.train_pix2pix, pool[:n], pool, rough, prior, crops)
            variants.append(
                {
                    "variant": f"pix2pix-{n}",
                    "generator": "pix2pix",
                    "train_images": n,
                    "generators": [_model(p2p)],
                    "checkpoint": p2p["checkpoint_path"],
                }
            )
        return variants

    def tandem_variant(self, pool: list[str], smallest: int, first: dict) -> dict:
        """The tandem: ``first`` (pix2pix on the smallest subset), then a CycleGAN from its 1st generation."""
        step, pipe = self.pipe.run_step, self.pipe
        gen1 = step(
            f"ablation/gen1-{smallest}",
            pipe.step_gen,
            "masks",
            "gen1",
            {"checkpoint_path": first["checkpoint"]},
            1,
        )
        domain_b = pool[smallest:] or pool  # subset 2; a stack with nothing else re-uses subset 1
        cyc = step(
            f"ablation/cyclegan-{smallest}",
            self.train_cyclegan,
            domain_b,
            gen1,
            f"ablation-cyclegan-{smallest}",
        )
        return {
            "variant": f"pix2pix-{smallest}+cyclegan",
            "generator": "pix2pix+cyclegan",
            "train_images": smallest,
            "generators": [first["generators"][0], _model(cyc)],
            "checkpoint": cyc["checkpoint_path"],
        }

    def score_variants(self, variants: list[dict], held_out: list[str], prior: dict) -> tuple[Any, str]:
        """Every variant's scores on the same held-out crops and random masks.

        Returns:
            The table (:func:`score_table`) and the feature extractor's label.
        """
        from tgan_ray.inference import pick_device
        from tgan_ray.metrics.gan_extractors import build_feature_extractor, extractor_label
        from tgan_ray.pipeline import load_pngs

        step, pipe = self.pipe.run_step, self.pipe
        real, real_masks = held_out_set(pipe, held_out, self._mask, self.cfg.data.image_size)
        n_gen = min(len(prior["masks"]), self.n_generated or max(self.cfg.pix2pix.eval_images, 2 * len(real)))
        if self.n_generated and n_gen < self.n_generated:
            self.log(
                f"   {n_gen} generated images per variant, not {self.n_generated}: prior.n_masks = {n_gen}"
            )
        random_masks = load_pngs(self.out / "round1" / "virtual" / "masks", prior["masks"][:n_gen], True)
        label = extractor_label(self.extractor_name)
        extractor = None  # built only if a score is still to compute
        rows = []
        for variant in variants:
            key = f"ablation/score-{variant['variant']}-{label}-{n_gen}"
            if not pipe.manifest.done(key) and extractor is None:
                extractor = build_feature_extractor(self.extractor_name, self.extractor_weights)
                extractor = extractor.to(pick_device())
            args = (variant, random_masks, real, real_masks, extractor, self.extractor_name, self.log)
            rows.append(step(key, score_variant, *args))
        return score_table(rows), label

    def write(self, table, label: str, pool: list[str], held_out: list[str]) -> None:
        """ablation.csv / .json / .png (atomically), and the numbers into MLflow."""
        csv = self.out / "ablation.csv"
        tmp = csv.with_name(f".{csv.name}.tmp")
        table.to_csv(tmp, index=False)
        os.replace(tmp, csv)
        write_json(
            self.out / "ablation.json",
            {
                "extractor": label,
                "training_pool": pool,
                "held_out": held_out,
                "paired_scores": "SSIM/PSNR: each held-out crop vs the variant's output for that crop's rough mask",
                "unpaired_scores": "FID/KID/IS: outputs for random prior masks vs held-out crops",
                "rows": table.to_dict("records"),
            },
        )
        plot_ablation(table, label, self.out / "ablation.png")
        run = self.pipe.tracker.start_child("ablation", tags={"extractor": label})
        for row in table.to_dict("records"):
            variant = row["variant"].replace("+", "-plus-")  # MLflow metric names allow no '+'
            run.log_metrics(
                {
                    f"{variant}/{k}": v
                    for k, v in row.items()
                    if k not in ID_COLUMNS and isinstance(v, (int, float))
                }
            )
        for name in ("ablation.csv", "ablation.json", "ablation.png"):
            run.log_artifact(self.out / name)
        run.end()
        self.log(f"   ablation table: {csv}")


def _model(stage: dict) -> str:
    return str(Path(stage["checkpoint_path"]) / "model.pt")


def run_ablation(
    images: str,
    out: str | Path,
    cfg: Config,
    subset_sizes: Sequence[int | None] = DEFAULT_SUBSET_SIZES,
    log=print,
    extractor: str = "random-resnet18",
    extractor_weights: str | None = None,
    n_generated: int | None = None,
):
    """Run (or resume) the ablation on a stack and return its table.

    Args:
        images: The stack: a folder, a glob or an s3:// prefix.
        out: Run folder; ``ablation.csv``, ``ablation.json`` and ``ablation.png`` are written there.
        cfg: Config (GAN settings, split, rough masks, Ray, tracking).
        subset_sizes: pix2pix training-set sizes; ``None`` = every non-held-out image; sizes above that are
            dropped. The smallest also seeds the tandem pix2pix + CycleGAN.
        log: Progress messages.
        extractor: Feature extractor of FID/KID/IS (``random-resnet18``, ``inception``, ``npssegnet:<file>``).
        extractor_weights: Local FID Inception weights for ``inception``.
        n_generated: Images generated per variant for FID/KID/IS (default: max(pix2pix.eval_images, twice the
            held-out crops, so KID's subsets vary), at most ``prior.n_masks``).

    Returns:
        A DataFrame with one row per variant: variant, generator, train_images, n_generated, n_real,
        ``fid_/kid_/kid_std_/is_/is_std_<extractor>``, ssim, psnr, checkpoint.
    """
    from tgan_ray.runtime import init_ray

    init_ray(cfg.ray)
    ablation = Ablation(images, out, cfg, extractor, extractor_weights, n_generated, log)
    return ablation.run(subset_sizes)
