"""Mask quality on a hard synthetic stack with known ground truth: the rough segmenter alone vs label-free NPsSegNet.

    python bench/pipeline_quality.py --out /tmp/bench-quality            # quick preset, low-SNR HAADF stack
    python bench/pipeline_quality.py --snr 2 --n 10 --size 256 --modality bf-tem

Prints pixel MIoU and object F1 (IoU >= 0.5 matching) over all images of the stack, for (a) the classical rough
segmenter (step 2, training-free) and (b) the label-free NPsSegNet after the whole pipeline (step 8).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from tgan_ray.io import read_mask_png

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def score(pred_masks: dict[str, np.ndarray], gt_dir: Path) -> dict[str, float]:
    from tgan_ray.metrics.segmentation import aggregate, segmentation_scores

    rows = [
        segmentation_scores(pred, read_mask_png(gt_dir / f"{stem}.png")) for stem, pred in pred_masks.items()
    ]
    agg = aggregate(rows)
    return {k: agg[k] for k in ("miou", "iou", "precision", "recall", "f1")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/tgan-bench-quality", help="Working folder.")
    ap.add_argument("--n", type=int, default=10, help="Images in the synthetic stack.")
    ap.add_argument("--size", type=int, default=256, help="Image side, px.")
    ap.add_argument("--snr", type=float, default=2.5, help="Signal-to-noise ratio (low = hard).")
    ap.add_argument("--modality", default="haadf", help="haadf | bf-tem.")
    ap.add_argument("--preset", default="quick", help="Config preset.")
    ap.add_argument("--set", action="append", default=[], help="Config override key=value (repeatable).")
    ap.add_argument(
        "--smoke-test", action="store_true", help="Tiny stack and epochs: checks the script runs."
    )
    args = ap.parse_args()

    import yaml

    from tgan_ray.config import load_config
    from tgan_ray.data.synthetic import make_stack
    from tgan_ray.io import normalize_intensity, read_image
    from tgan_ray.masks import ClassicalSegmenter
    from tgan_ray.pipeline import run_pipeline

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if args.smoke_test:
        args.n, args.size = 6, 128
        overrides.update(
            {
                "pix2pix.epochs": 2,
                "pix2pix.epochs_decay": 0,
                "cyclegan.epochs": 1,
                "cyclegan.epochs_decay": 0,
                "segmenter.epochs": 2,
                "prior.n_masks": 24,
            }
        )
    cfg = load_config(args.preset, overrides=overrides)
    out = Path(args.out)
    stack = out / "stack"
    if not (stack / "images").is_dir():
        make_stack(stack, n=args.n, modality=args.modality, size=args.size, snr=args.snr, seed=7, hard=True)

    rough = ClassicalSegmenter(cfg.rough.particle_contrast, cfg.rough.min_particle_px, cfg.rough.confidence)
    rough_masks = {
        p.stem: rough.segment(normalize_intensity(read_image(str(p)).data))
        for p in sorted((stack / "images").glob("*.png"))
    }
    t = time.time()
    run_pipeline(str(stack / "images"), out / "run", cfg, log=lambda m: None)
    minutes = (time.time() - t) / 60
    label_free = {s: read_mask_png(out / "run" / "masks" / f"{s}.png") for s in rough_masks}

    rows = {
        "(a) rough segmenter (classical)": score(rough_masks, stack / "masks"),
        "(b) label-free NPsSegNet": score(label_free, stack / "masks"),
    }
    print(
        f"\n{args.modality} stack: {args.n} x {args.size} px, SNR {args.snr}, hard; preset {args.preset}; "
        f"pipeline {minutes:.1f} min"
    )
    print("| segmenter | MIoU | particle IoU | object precision | object recall | object F1 |")
    print("|---|---|---|---|---|---|")
    for name, s in rows.items():
        print(
            f"| {name} | {s['miou']:.3f} | {s['iou']:.3f} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} |"
        )
    (out / "quality.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
