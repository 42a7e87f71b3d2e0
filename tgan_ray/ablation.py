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
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tgan_ray.config import Config
from tgan_ray.manifest import write_json

DEFAULT_SUBSET_SIZES: tuple[int | None, ...] = (5, 10, 20, 40, None)
# Column order of the table; the extractor's metric columns go after these.
_ID_COLUMNS = ("variant", "generator", "train_images", "n_generated", "n_real")


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


def held_out_crops(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Square crops on a regular grid that lies inside the frame, with the matching mask crops.

    Unlike :func:`tgan_ray.data.tiling.tile_image` no reflected padding enters a crop (unless the frame is smaller
    than a crop): mirrored content would be scored as if it were real.

    Shape:
        image, mask: (H, W) -> (N, size, size) each.
    """
    pad = [(0, max(size - image.shape[0], 0)), (0, max(size - image.shape[1], 0))]
    if any(p for _, p in pad):
        image, mask = np.pad(image, pad, mode="reflect"), np.pad(mask, pad, mode="reflect")
    rows, cols = (
        np.linspace(0, n - size, max(1, math.ceil(n / size))).round().astype(int) for n in image.shape
    )
    crops = [
        (image[r : r + size, c : c + size], mask[r : r + size, c : c + size]) for r in rows for c in cols
    ]
    return np.stack([c[0] for c in crops]).astype(np.float32), np.stack([c[1] for c in crops]).astype(
        np.uint8
    )


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

    # -- scoring --------------------------------------------------------------------------------------------
    def score(
        self, variant: dict, random_masks: np.ndarray, real: np.ndarray, real_masks: np.ndarray
    ) -> dict:
        """Unpaired and paired scores of one variant (a chain of generator files)."""
        import torch

        from tgan_ray.inference import load_generator, pick_device, run_generator
        from tgan_ray.metrics.gan import GANMetricWarning, image_quality, paired_quality

        device = pick_device()
        generators = [load_generator(path, device) for path in variant["generators"]]

        def generate(inputs: np.ndarray) -> np.ndarray:
            out = inputs.astype(np.float32)
            for net in generators:  # pix2pix, then CycleGAN for the tandem
                out = run_generator(net, out)
            return out

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None] * 2 - 1

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = image_quality(
                tensor(generate(random_masks)), tensor(real), self.extractor, self.extractor_name
            )
        for message in {str(w.message) for w in caught if issubclass(w.category, GANMetricWarning)}:
            self.log(f"   warning: {message}")
        scores |= paired_quality(tensor(generate(real_masks)), tensor(real))
        return {
            "variant": variant["variant"],
            "generator": variant["generator"],
            "train_images": variant["train_images"],
            "n_generated": len(random_masks),
            "n_real": len(real),
            **scores,
            "checkpoint": variant["checkpoint"],
        }

    def run(self, subset_sizes: Sequence[int | None] = DEFAULT_SUBSET_SIZES):
        import pandas as pd

        from tgan_ray.inference import pick_device
        from tgan_ray.masks import check_masks
        from tgan_ray.metrics.gan import build_feature_extractor, extractor_label
        from tgan_ray.pipeline import load_pngs

        step, pipe, d = self.pipe.run_step, self.pipe, self.cfg.data
        stack, pool, held_out = self.split()
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
        rough = self.rough_masks(pool[: sizes[-1]] + held_out)
        smallest = pool[: sizes[0]]
        check_masks([self._mask(s) for s in smallest], smallest)  # an empty prior would fail obscurely later
        # The random masks follow the smallest subset's morphology, as in the method (step 4).
        prior = step(f"ablation/prior-{sizes[0]}", pipe.step_prior, {"subset1": smallest}, rough, 1)

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
        first = variants[0]
        gen1 = step(
            f"ablation/gen1-{sizes[0]}",
            pipe.step_gen,
            "masks",
            "gen1",
            {"checkpoint_path": first["checkpoint"]},
            1,
        )
        domain_b = pool[sizes[0] :] or pool  # subset 2; a stack with nothing else re-uses subset 1
        cyc = step(
            f"ablation/cyclegan-{sizes[0]}",
            self.train_cyclegan,
            domain_b,
            gen1,
            f"ablation-cyclegan-{sizes[0]}",
        )
        variants.append(
            {
                "variant": f"pix2pix-{sizes[0]}+cyclegan",
                "generator": "pix2pix+cyclegan",
                "train_images": sizes[0],
                "generators": [first["generators"][0], _model(cyc)],
                "checkpoint": cyc["checkpoint_path"],
            }
        )

        real, real_masks = _held_out_set(pipe, held_out, self._mask, d.image_size)
        n_gen = min(len(prior["masks"]), self.n_generated or max(self.cfg.pix2pix.eval_images, 2 * len(real)))
        if self.n_generated and n_gen < self.n_generated:
            self.log(
                f"   {n_gen} generated images per variant, not {self.n_generated}: prior.n_masks = {n_gen}"
            )
        random_masks = load_pngs(self.out / "round1" / "virtual" / "masks", prior["masks"][:n_gen], True)
        label = extractor_label(self.extractor_name)
        self.extractor = None
        rows = []
        for variant in variants:
            key = f"ablation/score-{variant['variant']}-{label}-{n_gen}"
            if not pipe.manifest.done(key) and self.extractor is None:
                self.extractor = build_feature_extractor(self.extractor_name, self.extractor_weights)
                self.extractor = self.extractor.to(pick_device())
            rows.append(step(key, self.score, variant, random_masks, real, real_masks))
        table = pd.DataFrame(rows)
        table = table[
            [*_ID_COLUMNS, *[c for c in table.columns if c not in (*_ID_COLUMNS, "checkpoint")], "checkpoint"]
        ]
        self.write(table, label, pool, held_out)
        pipe.tracker.end()
        return table

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
                    if k not in _ID_COLUMNS and isinstance(v, (int, float))
                }
            )
        for name in ("ablation.csv", "ablation.json", "ablation.png"):
            run.log_artifact(self.out / name)
        run.end()
        self.log(f"   ablation table: {csv}")


def _model(stage: dict) -> str:
    return str(Path(stage["checkpoint_path"]) / "model.pt")


def _held_out_set(pipe, stems: list[str], mask_of, size: int) -> tuple[np.ndarray, np.ndarray]:
    crops = [held_out_crops(pipe.work_frame(s), mask_of(s), size) for s in stems]
    return np.concatenate([c[0] for c in crops]), np.concatenate([c[1] for c in crops])


def plot_ablation(table, label: str, path: str | Path) -> Path:
    """One panel per metric (FID, KID and IS with their std, SSIM, PSNR): pix2pix against its training-set size as
    a line, the tandem pix2pix + CycleGAN as a star and a dashed level, so "does it beat pix2pix on N images" reads
    off directly. Lines, not bars: IS sits near 1 and bars from zero would hide every difference.

    Returns:
        The written PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (f"fid_{label}", None, "FID", "lower"),
        (f"kid_{label}", f"kid_std_{label}", "KID", "lower"),
        (f"is_{label}", f"is_std_{label}", "IS", "higher"),
        ("ssim", None, "SSIM", "higher"),
        ("psnr", None, "PSNR (dB)", "higher"),
    ]
    panels = [p for p in panels if p[0] in table.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    single = table[table["generator"] == "pix2pix"]
    tandem = table[table["generator"] == "pix2pix+cyclegan"]
    for ax, (col, err, title, better) in zip(axes[0], panels, strict=True):
        ax.errorbar(
            single["train_images"],
            single[col],
            yerr=single[err] if err else None,
            marker="o",
            capsize=3,
            color="tab:blue",
            label="pix2pix",
        )
        for _, row in tandem.iterrows():
            ax.errorbar(
                [row["train_images"]],
                [row[col]],
                yerr=[row[err]] if err else None,
                marker="*",
                markersize=12,
                capsize=3,
                color="tab:orange",
                label=row["variant"],
            )
            ax.axhline(row[col], color="tab:orange", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xticks(list(single["train_images"]), [str(n) for n in single["train_images"]])
        ax.minorticks_off()
        ax.set_xlabel("training images", fontsize=8)
        ax.set_title(f"{title} ({better} is better)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"pix2pix on growing subsets vs pix2pix + CycleGAN (features: {label})", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


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
