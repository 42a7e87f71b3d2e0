"""How the ablation (:mod:`tgan_ray.ablation`) scores its variants against held-out images, and plots them.

It holds the held-out crops (a regular grid inside each frame, with their rough masks), the scoring of one
variant (a chain of generator files: unpaired FID/KID/IS of its outputs for random prior masks, paired
SSIM/PSNR of its outputs for the held-out crops' own masks), the column order of the resulting table, and its
plot (one panel per metric). The runner that trains the variants and writes the outputs is
:mod:`tgan_ray.ablation`.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np

# Column order of the table; the extractor's metric columns go after these.
ID_COLUMNS = ("variant", "generator", "train_images", "n_generated", "n_real")


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


def held_out_set(pipe, stems: list[str], mask_of, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The :func:`held_out_crops` of every held-out frame (working scale) and of its rough mask, concatenated.

    Shape:
        -> (N, size, size) each, N summed over ``stems``.
    """
    crops = [held_out_crops(pipe.work_frame(s), mask_of(s), size) for s in stems]
    return np.concatenate([c[0] for c in crops]), np.concatenate([c[1] for c in crops])


def score_variant(
    variant: dict,
    random_masks: np.ndarray,
    real: np.ndarray,
    real_masks: np.ndarray,
    extractor,
    extractor_name: str,
    log=print,
) -> dict:
    """Unpaired and paired scores of one variant (a chain of generator files).

    Args:
        variant: ``variant``, ``generator``, ``train_images``, ``generators`` (model files, applied in order)
            and ``checkpoint``.
        random_masks: Masks sampled from the prior; their outputs are scored unpaired (FID, KID, IS).
        real: Held-out crops, the reference of every score.
        real_masks: The held-out crops' rough masks; their outputs are compared with ``real`` (SSIM, PSNR).
        extractor: Feature extractor of FID/KID/IS (see
            :func:`~tgan_ray.metrics.gan_extractors.build_feature_extractor`).
        extractor_name: Its name; the metric keys carry its label.
        log: Progress messages; the metrics' warnings (too few images, a score left out) go there.

    Returns:
        One table row: the variant's id columns, its scores and its checkpoint.
    """
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
        scores = image_quality(tensor(generate(random_masks)), tensor(real), extractor, extractor_name)
    for message in {str(w.message) for w in caught if issubclass(w.category, GANMetricWarning)}:
        log(f"   warning: {message}")
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


def score_table(rows: list[dict]):
    """The rows of :func:`score_variant` as a DataFrame: :data:`ID_COLUMNS`, the metrics, then the checkpoint."""
    import pandas as pd

    table = pd.DataFrame(rows)
    return table[
        [*ID_COLUMNS, *[c for c in table.columns if c not in (*ID_COLUMNS, "checkpoint")], "checkpoint"]
    ]


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
