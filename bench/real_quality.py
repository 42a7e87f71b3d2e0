"""Real-data quality: the rough segmenter alone vs the label-free NPsSegNet, on real stacks, as ``tgan run`` runs.

    python bench/real_quality.py --preset cpu                        # every stack (hours on 2 CPU cores)
    python bench/real_quality.py --preset cpu --stacks tem-sintering,PtW
    python bench/real_quality.py --rough-only                        # the training-free column alone (minutes)
    python bench/real_quality.py --smoke-test                        # a tiny synthetic stack: checks the script

Each stack is run the way a microscopist would run it: its frames in one folder, ``tgan run`` on the folder
(every frame is the unlabelled stack), and ``tgan segment --rough`` for the baseline. Every frame is scored:

- ``tem-sintering`` (40 BF-TEM frames, pixel masks) and the synthetic stack (exact masks): pixel MIoU and object
  precision / recall / F1 (instances matched one to one at IoU >= 0.5).
- ``stem-catalysts`` (boxes only), grouped by material: detection precision / recall / F1 (a particle's bounding
  box matched one to one to a reference box at box IoU >= ``--box-iou``).
- all: count error (found / reference - 1) and median-diameter error (mask: equivalent diameter; boxes:
  sqrt(w h) of the bounding boxes, on both sides).

Writes ``<out>/real_quality.json`` and prints one Markdown table per stack and one summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Stack:
    name: str
    reference: str  # "masks" or "boxes"
    frames: list[Path]  # image files
    truth: dict[str, Path] = field(default_factory=dict)  # stem -> mask PNG or YOLO box file
    modality: str = ""


def stem_catalyst_stacks(root: Path) -> list[Stack]:
    """The stem-catalysts frames grouped by material and imaging mode, as one session each would be."""
    groups = {
        "PtW": ("HAADF", ["PtW1", "PtW2", "PtW3", "PtW5", "PtW6", "PtW7"]),
        "Pd": (
            "HAADF",
            ["Pd1", "Pd3", "Pd_alumina1", "Pd_silica1", "Pd_silica2", "Pd_silica3", "Pd_silica4"],
        ),
        "Cu": ("HAADF", ["Cu1", "Cu3", "Cu4", "Cu_silica1", "Cu_silica2", "Cu_silica3"]),
        "Ru": ("HAADF", ["Ru1", "Ru2", "Ru3", "Ru4"]),
        "Pt-HAADF": ("HAADF", ["Pt2", "Pt4", "PtC3", "PtCo"]),
        "Pt-BF": ("BF-TEM", ["PtC1", "PtC2", "PtCo1", "PtCo3", "Pt_carbon1", "Pt_carbon2"]),
    }
    return [
        Stack(
            name,
            "boxes",
            [root / "images" / f"{n}.jpg" for n in names],
            {n: root / "labels" / f"{n}.txt" for n in names},
            modality,
        )
        for name, (modality, names) in groups.items()
    ]


def tem_sintering_stack(root: Path) -> Stack:
    frames = sorted((root / "images").glob("*.png"))
    return Stack(
        "tem-sintering", "masks", frames, {f.stem: root / "masks" / f.name for f in frames}, "BF-TEM"
    )


def shared_stack(name: str, data: Path) -> Stack:
    """One of the shared real stacks by name: a stem-catalysts group or tem-sintering (``data``: the shared data)."""
    stacks = {s.name: s for s in stem_catalyst_stacks(data / "stem-catalysts")}
    stacks["tem-sintering"] = tem_sintering_stack(data / "tem-sintering")
    if name not in stacks:
        raise SystemExit(f"unknown stack {name!r}; choose one of: {', '.join(stacks)}")
    return stacks[name]


# The score cells of the bench scripts that re-score saved masks (faint_filter, merged_masks).
SCORE_COLUMNS = "F1 | precision | recall | found / reference | MIoU"


def score_cells(r: dict) -> str:
    miou = "" if r["miou"] is None else f"{r['miou']:.3f}"
    return (
        f"{r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['found']} / {r['reference']} | {miou}"
    )


def synthetic_stack(out: Path, n: int = 10, size: int = 256) -> Stack:
    from tgan_ray.data.synthetic import make_stack

    folder = out / "synthetic-source"
    if not (folder / "images").is_dir():
        make_stack(folder, n=n, modality="haadf", size=size, snr=2.5, seed=7, hard=True)
    frames = sorted((folder / "images").glob("*.png"))
    return Stack(
        "synthetic-hard",
        "masks",
        frames,
        {f.stem: folder / "masks" / f.name for f in frames},
        "HAADF (synth)",
    )


# ---------------------------------------------------------------------------------------------- scoring


def yolo_boxes(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """YOLO ``class cx cy w h`` (normalised) -> (n, 4) pixel boxes (x0, y0, x1, y1)."""
    h, w = shape
    rows = [list(map(float, line.split()[1:])) for line in path.read_text().splitlines() if line.strip()]
    b = np.array(rows, dtype=float).reshape(-1, 4)
    return np.stack(
        [
            (b[:, 0] - b[:, 2] / 2) * w,
            (b[:, 1] - b[:, 3] / 2) * h,
            (b[:, 0] + b[:, 2] / 2) * w,
            (b[:, 1] + b[:, 3] / 2) * h,
        ],
        1,
    )


def _diameters(mask: np.ndarray, boxes: bool) -> np.ndarray:
    from skimage.measure import label, regionprops

    props = regionprops(mask if mask.dtype != bool else label(mask))
    if boxes:
        return np.array([np.sqrt((p.bbox[2] - p.bbox[0]) * (p.bbox[3] - p.bbox[1])) for p in props])
    return np.array([p.equivalent_diameter_area for p in props])


def score_stack(stack: Stack, masks: dict[str, np.ndarray], box_iou: float) -> dict[str, float]:
    """Scores of one segmenter's masks (stem -> bool mask at the frame's resolution) over the whole stack."""
    from tgan_ray.io import read_mask_png
    from tgan_ray.metrics.segmentation import aggregate, box_detection_scores, segmentation_scores

    found, reference, pred_d, ref_d, rows = 0, 0, [], [], []
    totals = np.zeros(3)
    for stem, truth in stack.truth.items():
        mask = masks[stem]
        if stack.reference == "masks":
            gt = read_mask_png(truth)
            rows.append(segmentation_scores(mask, gt))
            ref_d.append(_diameters(gt, boxes=False))
            reference += int(rows[-1]["tp"] + rows[-1]["fn"])
            found += int(rows[-1]["tp"] + rows[-1]["fp"])
        else:
            boxes = yolo_boxes(truth, mask.shape)
            s = box_detection_scores(mask, boxes, box_iou)
            totals += [s["tp"], s["fp"], s["fn"]]
            ref_d.append(np.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
            reference += len(boxes)
            found += s["tp"] + s["fp"]
        pred_d.append(_diameters(mask, boxes=stack.reference == "boxes"))
    if rows:
        agg = aggregate(rows)
        out = {k: float(agg[k]) for k in ("miou", "precision", "recall", "f1")}
    else:
        tp, fp, fn = totals
        p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        out = {"miou": None, "precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-9)}
    pred_d, ref_d = np.concatenate(pred_d), np.concatenate(ref_d)
    median_pred = float(np.median(pred_d)) if len(pred_d) else float("nan")
    return {
        **out,
        "found": found,
        "reference": reference,
        "count_error": found / max(reference, 1) - 1,
        "median_diameter_px": median_pred,
        "median_diameter_error": median_pred / float(np.median(ref_d)) - 1,
    }


# ---------------------------------------------------------------------------------------------- running


def _read_masks(folder: Path, stems) -> dict[str, np.ndarray]:
    """Particles as the particle table counts them: each mask split with ``split_touching`` (for either segmenter)."""
    from tgan_ray.analysis import split_touching
    from tgan_ray.io import read_mask_png

    return {s: split_touching(read_mask_png(folder / f"{s}.png")) for s in stems}


def _link_frames(stack: Stack, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in stack.frames:
        target = folder / f.name
        if not target.exists():
            target.symlink_to(f.resolve())
    return folder


def run_stack(stack: Stack, out: Path, cfg, rough_only: bool, box_iou: float, log) -> dict:
    from tgan_ray.segment import segment_stack

    work = out / stack.name
    images = _link_frames(stack, work / "images")
    result = {
        "stack": stack.name,
        "modality": stack.modality,
        "frames": len(stack.frames),
        "reference": stack.reference,
    }
    t = time.time()
    rough = segment_stack(None, images, work / "rough", cfg, rough=True)
    result["rough_seconds"] = round(time.time() - t, 1)
    result["rough"] = score_stack(stack, _read_masks(Path(rough.masks), stack.truth), box_iou)
    if not rough_only:
        from tgan_ray.pipeline import run_pipeline

        t = time.time()
        run = run_pipeline(str(images), work / "run", cfg, log=log)
        result["label_free_seconds"] = round(time.time() - t, 1)
        result["label_free"] = score_stack(stack, _read_masks(run.run_dir / "masks", stack.truth), box_iou)
        check = run.summary.get("self_check") if isinstance(run.summary, dict) else None
        if check:
            result["self_check"] = check.get("verdict")
    return result


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    return f"{v:+.0%}" if pct else f"{v:.3f}"


def print_tables(results: list[dict], box_iou: float) -> None:
    for r in results:
        print(f"\n### {r['stack']} ({r['frames']} {r['modality']} frames, reference: {r['reference']})\n")
        print(
            "| segmenter | MIoU | precision | recall | F1 | found / reference | count error | median-diameter error |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for key, label in (("rough", "rough (classical)"), ("label_free", "label-free NPsSegNet")):
            if key in r:
                s = r[key]
                print(
                    f"| {label} | {_fmt(s['miou'])} | {_fmt(s['precision'])} | {_fmt(s['recall'])} | "
                    f"{_fmt(s['f1'])} | {s['found']} / {s['reference']} | {_fmt(s['count_error'], True)} | "
                    f"{_fmt(s['median_diameter_error'], True)} |"
                )
    print(f"\n### Summary (F1: objects at IoU 0.5 for masks, boxes at IoU {box_iou:g})\n")
    print(
        "| stack | frames | rough MIoU | label-free MIoU | rough F1 | label-free F1 | ΔF1 | label-free wall time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        lf = r.get("label_free")
        delta = lf["f1"] - r["rough"]["f1"] if lf else None
        minutes = f"{r['label_free_seconds'] / 60:.1f} min" if lf else "–"
        print(
            f"| {r['stack']} | {r['frames']} | {_fmt(r['rough']['miou'])} | {_fmt(lf and lf['miou'])} | "
            f"{_fmt(r['rough']['f1'])} | {_fmt(lf and lf['f1'])} | {'–' if delta is None else f'{delta:+.3f}'} | "
            f"{minutes} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, default=SHARED, help="Folder holding tem-sintering/ and stem-catalysts/."
    )
    ap.add_argument(
        "--out", type=Path, default=Path("/tmp/tgan-real-quality"), help="Working folder (runs resume)."
    )
    ap.add_argument("--preset", default="cpu", help="Config preset of the label-free runs.")
    ap.add_argument("--set", action="append", default=[], help="Config override key=value (repeatable).")
    ap.add_argument("--stacks", default="", help="Comma-separated stack names (default: all).")
    ap.add_argument(
        "--rough-only", action="store_true", help="Only the rough segmenter's column (no training)."
    )
    ap.add_argument("--box-iou", type=float, default=0.3, help="Box IoU that counts as a detection.")
    ap.add_argument("--quiet", action="store_true", help="Hide the pipeline's step lines.")
    ap.add_argument(
        "--smoke-test", action="store_true", help="A tiny synthetic stack and training: checks the script."
    )
    args = ap.parse_args()

    import yaml

    from tgan_ray.config import load_config

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    stacks = [synthetic_stack(args.out)] if args.smoke_test else []
    if args.smoke_test:
        stacks = [synthetic_stack(args.out, n=6, size=128)]
        args.preset = "quick"
        overrides = {
            "pix2pix.epochs": 2, "pix2pix.epochs_decay": 0, "cyclegan.epochs": 1, "cyclegan.epochs_decay": 0,
            "segmenter.epochs": 2, "prior.n_masks": 24, **overrides,
        }  # fmt: skip
    else:
        if (args.data / "tem-sintering").is_dir():
            stacks.append(tem_sintering_stack(args.data / "tem-sintering"))
        if (args.data / "stem-catalysts").is_dir():
            stacks += stem_catalyst_stacks(args.data / "stem-catalysts")
        stacks.append(synthetic_stack(args.out))
    wanted = [s for s in args.stacks.split(",") if s]
    unknown = set(wanted) - {s.name for s in stacks}
    if unknown:
        ap.error(f"unknown stack(s) {sorted(unknown)}; choose from {[s.name for s in stacks]}")
    stacks = [s for s in stacks if not wanted or s.name in wanted]
    cfg = load_config(args.preset, overrides=overrides)
    log = (lambda m: None) if args.quiet else print

    results, t0 = [], time.time()
    for stack in stacks:
        print(f"== {stack.name}: {len(stack.frames)} frames", flush=True)
        results.append(run_stack(stack, args.out, cfg, args.rough_only, args.box_iou, log))
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    print(f"\npreset {args.preset}; {machine}; {(time.time() - t0) / 60:.1f} min in all")
    print_tables(results, args.box_iou)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"preset": args.preset, "overrides": overrides, "machine": machine, "stacks": results}
    (args.out / "real_quality.json").write_text(json.dumps(payload, indent=2, default=float))


if __name__ == "__main__":
    main()
