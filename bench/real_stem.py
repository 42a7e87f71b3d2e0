"""The pipeline on real micrographs labelled with boxes only: particle counts and detection F1 vs the boxes.

    python bench/real_stem.py --images ../shared/data/stem-catalysts/images --names PtW1,PtW2,PtW3,PtW5,PtW6,PtW7

YOLO labels (``labels/<stem>.txt``: class cx cy w h, normalised) beside ``images/``. Boxes are not masks, so
this scores detections (box IoU >= 0.3 between each particle's bounding box and a reference box) and counts,
never pixel IoU. Compares (a) the classical rough segmenter and (b) the label-free NPsSegNet. Copies the PSD
and overlay pictures to ``--figures`` for the README.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def yolo_boxes(path: Path, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    rows = [list(map(float, line.split()[1:])) for line in path.read_text().splitlines() if line.strip()]
    b = np.array(rows).reshape(-1, 4)
    return np.stack(
        [
            (b[:, 0] - b[:, 2] / 2) * w,
            (b[:, 1] - b[:, 3] / 2) * h,
            (b[:, 0] + b[:, 2] / 2) * w,
            (b[:, 1] + b[:, 3] / 2) * h,
        ],
        1,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="Folder of images with a sibling labels/ folder.")
    ap.add_argument("--names", default="", help="Comma-separated stems to use (default: all).")
    ap.add_argument("--out", default="/tmp/tgan-real", help="Working folder.")
    ap.add_argument("--preset", default="quick", help="Config preset.")
    ap.add_argument("--iou", type=float, default=0.3, help="Box IoU that counts as a detection.")
    ap.add_argument("--figures", default=None, help="Copy the PSD / overlay figures here.")
    args = ap.parse_args()

    from tgan_ray.config import load_config
    from tgan_ray.io import normalize_intensity, read_image
    from tgan_ray.masks import ClassicalSegmenter
    from tgan_ray.metrics.segmentation import box_detection_scores
    from tgan_ray.pipeline import run_pipeline

    src = Path(args.images)
    names = [n for n in args.names.split(",") if n] or sorted(p.stem for p in src.glob("*.jpg"))
    out = Path(args.out)
    stack = out / "stack"
    stack.mkdir(parents=True, exist_ok=True)
    for n in names:
        target = stack / f"{n}.jpg"
        if not target.exists():
            shutil.copy(src / f"{n}.jpg", target)
    cfg = load_config(args.preset)
    t = time.time()
    run_pipeline(str(stack), out / "run", cfg, log=print)
    minutes = (time.time() - t) / 60

    rough = ClassicalSegmenter(cfg.rough.particle_contrast, cfg.rough.min_particle_px, cfg.rough.confidence)
    totals = {"rough": np.zeros(3), "label-free": np.zeros(3)}
    counts = {"boxes": 0, "rough": 0, "label-free": 0}
    print("\n| image | boxes | rough: found / F1 | label-free: found / F1 |\n|---|---|---|---|")
    for n in names:
        image = read_image(str(stack / f"{n}.jpg")).data
        boxes = yolo_boxes(src.parent / "labels" / f"{n}.txt", image.shape)
        preds = {
            "rough": rough.segment(normalize_intensity(image)),
            "label-free": np.asarray(Image.open(out / "run" / "masks" / f"{n}.png")) > 127,
        }
        cells = []
        for key, mask in preds.items():
            s = box_detection_scores(mask, boxes, args.iou)
            totals[key] += [s["tp"], s["fp"], s["fn"]]
            counts[key] += s["tp"] + s["fp"]
            cells.append(f"{s['tp'] + s['fp']} / {s['f1']:.2f}")
        counts["boxes"] += len(boxes)
        print(f"| {n} | {len(boxes)} | {cells[0]} | {cells[1]} |")
    print(
        "\n| segmenter | particles found (boxes: {}) | precision | recall | F1 |\n|---|---|---|---|---|".format(
            counts["boxes"]
        )
    )
    for key, (tp, fp, fn) in totals.items():
        p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        print(f"| {key} | {counts[key]} | {p:.3f} | {r:.3f} | {2 * p * r / max(p + r, 1e-9):.3f} |")
    print(f"\npipeline: {minutes:.1f} min on {len(names)} images")
    if args.figures:
        fig = Path(args.figures)
        fig.mkdir(parents=True, exist_ok=True)
        for f in (out / "run" / "plots").glob("*.png"):
            if f.name in ("psd.png", "samples.png") or f.name == f"overlay_{names[0]}.png":
                shutil.copy(f, fig / f"real_{f.name}")


if __name__ == "__main__":
    main()
