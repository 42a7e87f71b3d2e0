"""Step 8's faint-particle bar applied to the saved masks of finished real-quality runs (no Ray, no retraining).

    python bench/faint_filter.py --run /tmp/tgan-real-quality/PtW/run --stack PtW --bars 0,0.3,0.4

A label-free particle is dropped when its contrast to a ring of support is under ``bar`` x the real particles'
median contrast (step 2's masks of the run): the stack's bar of ``Segmenter.drop_faint`` (``segmenter.
min_drawn_contrast``), which Serve and step 8 without the rough merge use. Since ``e1c5f8b`` step 8 with the merge
measures the median on each frame's own rough particles instead; to compare that, redo step 8 with
``bench/rerun_from.py --from segment``. The masks read are those the run wrote; a run from before ``drop_faint``
gives the "bar 0" row and what the bar would have changed. Scores as ``bench/real_quality.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from real_quality import SCORE_COLUMNS, SHARED, score_cells, score_stack, shared_stack

from tgan_ray.analysis import split_touching
from tgan_ray.config import load_config
from tgan_ray.io import read_image, read_mask_png
from tgan_ray.manifest import Manifest
from tgan_ray.masks.consistency import RING_PX, median_contrast, undrawn_particles


def real_contrast(run: Path, rounds: int) -> float:
    """What the pipeline writes into the checkpoint (``real_particle_contrast`` of the last round)."""
    import numpy as np

    rough = Manifest(run).outputs(f"round{rounds}/rough")
    stems = list(rough["particles"])
    return median_contrast(
        [np.load(run / "work" / f"{s}.npy").astype(np.float32) for s in stems],
        [read_mask_png(Path(rough["folder"]) / f"{s}.png") > 0 for s in stems],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", type=Path, required=True, help="A finished run folder (<real_quality --out>/<stack>/run)."
    )
    p.add_argument(
        "--stack", required=True, help="Which shared stack the run segmented (PtW, Pd, tem-sintering...)."
    )
    p.add_argument(
        "--bars", default="0,0.3,0.4", help="Comma-separated bars, x the median contrast (0: none)."
    )
    p.add_argument("--data", type=Path, default=SHARED, help="Folder holding the shared stacks.")
    args = p.parse_args()

    stack = shared_stack(args.stack, args.data)
    cfg = load_config("cpu", path=args.run / "config.yaml")
    reference = real_contrast(args.run, cfg.run.rounds)
    scale = {f["stem"]: f["scale"] for f in json.loads((args.run / "stack.json").read_text())["frames"]}
    frames = {f.stem: f for f in stack.frames}
    saved = {
        s: (
            cfg.data.normalize(read_image(frames[s]).data),
            read_mask_png(args.run / "masks" / f"{s}.png") > 0,
        )
        for s in stack.truth
    }
    print(f"{stack.name}: real particles' median contrast {reference:.4f} ({args.run})")
    print(f"| bar | {SCORE_COLUMNS} |\n|---|---|---|---|---|---|")
    for bar in (float(b) for b in args.bars.split(",")):
        masks = {
            s: split_touching(
                mask & ~undrawn_particles(image, mask, reference, bar, max(1, round(RING_PX / scale[s])))
            )
            for s, (image, mask) in saved.items()
        }
        print(f"| {bar:g} | {score_cells(score_stack(stack, masks, 0.3))} |")


if __name__ == "__main__":
    main()
