"""Which of the rough segmenter's loosest blobs to add to step 8's merged masks (``segmenter.merge_candidates``).

    python bench/merge_candidates.py --run <real_quality out>/PtW/run --stack PtW

``--run`` is a finished run folder. Step 8's merged masks are rebuilt in-process from its NPsSegNet and its
``segment.json`` (as the Ray Data actors build them, without Ray), with each frame's confidence-0 blobs at the
radius it picked. The table scores, as ``bench/real_quality.py`` scores, the merged masks with the blobs that
touch none of their particles added under each rule: all of them, those over step 8's faint bar, and those where
NPsSegNet's probability passes a level somewhere in the blob (the rule step 8 uses, at 0.2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from real_quality import SCORE_COLUMNS, SHARED, score_cells, score_stack, shared_stack
from scipy import ndimage as ndi
from skimage.measure import label

from tgan_ray.analysis import split_touching
from tgan_ray.analysis.selfcheck import add_agreed_candidates, tandem_mask
from tgan_ray.config import Config
from tgan_ray.data.working import working_scale
from tgan_ray.inference import Segmenter
from tgan_ray.io import decode_image
from tgan_ray.masks.consistency import unmasked_particles
from tgan_ray.segment_actor import rough_segment_fn


def rebuilt_frames(run: Path, stack) -> dict[str, dict]:
    """Per frame: NPsSegNet's probability, the rough mask, the merged mask, the rough segmenter's confidence-0
    blobs, the free ones (touching no merged particle) and those of them over step 8's faint bar."""
    cfg = Config.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    settings = json.loads((run / "segment" / "segment.json").read_text())
    data = cfg.data.model_copy(update={k: settings[k] for k in ("scale", "image_size", "resize_mode")})
    segmenter = Segmenter(Path(settings["sources"]["model"]), data, cfg.segmenter, "cpu")
    folder = Path(settings["sources"]["images"])
    files = {p.stem: p for p in folder.iterdir() if p.stem in stack.truth}
    stems = sorted(files)
    images = [cfg.data.normalize(decode_image(files[s].read_bytes(), str(files[s])).data) for s in stems]
    scales = [(settings.get("frame_scales") or {}).get(s) for s in stems]
    probabilities = segmenter.probabilities(images, scales)
    rough = rough_segment_fn(settings["merge_rough"], candidates=True)(images)
    out = {}
    for stem, image, probability, scale, (rough_mask, candidates) in zip(
        stems, images, probabilities, scales, rough, strict=True
    ):
        scale = scale or working_scale(image.shape, data)
        merged = tandem_mask(segmenter, probability, image, scale, rough_mask)[0]  # step 8 without candidates
        free = unmasked_particles(candidates, merged)
        over_bar = segmenter.drop_faint(free, image, scale, rough_mask)
        out[stem] = {"p": probability, "rough": rough_mask, "merged": merged, "candidates": candidates}
        out[stem].update(free=free, over_bar=over_bar)
    return out


def with_blobs(frame: dict, keep) -> np.ndarray:
    """The merged mask plus the free blobs for which ``keep(probability, blobs, index)`` is true."""
    blobs = label(frame["free"])
    n = int(blobs.max())
    if n == 0:
        return frame["merged"]
    chosen = np.zeros(n + 1, bool)
    chosen[1:] = keep(frame["p"], blobs, np.arange(1, n + 1))
    return frame["merged"] | chosen[blobs]


def peak_over(level: float):
    return lambda p, blobs, index: ndi.maximum(p, blobs, index) > level


RULES = {
    "rough": lambda f: f["rough"],
    "merged (step 8 without candidates)": lambda f: f["merged"],
    "+ every free blob": lambda f: f["merged"] | f["free"],
    "+ every free blob over the faint bar": lambda f: f["merged"] | f["over_bar"],
    "+ blobs where p > 0.1 somewhere": lambda f: with_blobs(f, peak_over(0.1)),
    # step 8's own function, so that this row is what a run returns
    "+ blobs where p > 0.2 somewhere (step 8)": lambda f: add_agreed_candidates(
        f["merged"], f["candidates"], f["p"]
    ),
    "+ blobs where p > 0.5 somewhere": lambda f: with_blobs(f, peak_over(0.5)),
    "+ blobs whose mean p > 0.1": lambda f: with_blobs(f, lambda p, b, i: ndi.mean(p, b, i) > 0.1),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", type=Path, required=True, help="A finished run folder (with segment/segment.json)."
    )
    p.add_argument(
        "--stack", required=True, help="Which shared stack (PtW, Pd, Cu, Ru, Pt-HAADF, Pt-BF, tem-sintering)."
    )
    p.add_argument("--data", type=Path, default=SHARED, help="Folder holding the shared stacks.")
    p.add_argument("--box-iou", type=float, default=0.3, help="Box IoU at which a particle finds a box.")
    args = p.parse_args()

    stack = shared_stack(args.stack, args.data)
    frames = rebuilt_frames(args.run, stack)
    print(f"{stack.name} ({args.run})\n| masks | {SCORE_COLUMNS} |\n|---|---|---|---|---|---|")
    for name, rule in RULES.items():
        masks = {s: split_touching(rule(f)) for s, f in frames.items()}
        print(f"| {name} | {score_cells(score_stack(stack, masks, args.box_iou))} |", flush=True)


if __name__ == "__main__":
    main()
