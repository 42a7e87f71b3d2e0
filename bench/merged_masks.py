"""NPsSegNet's saved masks merged with the rough segmenter's, as ``segmenter.merge_rough`` merges them (no Ray).

    python bench/merged_masks.py --run <real_quality out>/PtW/run --rough <real_quality out>/PtW/rough --stack PtW

``--run`` is a finished run folder; ``--rough`` the ``tgan segment --rough`` output beside it (``bench/
real_quality.py`` writes both). A run made before ``merge_rough`` holds NPsSegNet's masks alone: the table shows
them, the rough masks, and what merging adds (each rough particle that touches no NPsSegNet particle), scored as
``bench/real_quality.py`` scores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from real_quality import SHARED, Stack, score_stack, stem_catalyst_stacks, tem_sintering_stack

from tgan_ray.analysis import split_touching
from tgan_ray.io import read_mask_png
from tgan_ray.masks.consistency import unmasked_particles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", type=Path, required=True, help="A finished run folder (its masks/ are NPsSegNet's)."
    )
    p.add_argument(
        "--rough", type=Path, required=True, help="The `tgan segment --rough` output of the same frames."
    )
    p.add_argument(
        "--stack", required=True, help="Which shared stack (PtW, Pd, Cu, Ru, Pt-HAADF, Pt-BF, tem-sintering)."
    )
    p.add_argument("--data", type=Path, default=SHARED, help="Folder holding the shared stacks.")
    args = p.parse_args()

    stacks: dict[str, Stack] = {s.name: s for s in stem_catalyst_stacks(args.data / "stem-catalysts")}
    stacks["tem-sintering"] = tem_sintering_stack(args.data / "tem-sintering")
    if args.stack not in stacks:
        raise SystemExit(f"unknown stack {args.stack!r}; choose one of: {', '.join(stacks)}")
    stack = stacks[args.stack]
    network = {s: read_mask_png(args.run / "masks" / f"{s}.png") > 0 for s in stack.truth}
    rough = {s: read_mask_png(args.rough / "masks" / f"{s}.png") > 0 for s in stack.truth}
    merged = {s: network[s] | unmasked_particles(rough[s], network[s]) for s in stack.truth}
    print(f"{stack.name} ({args.run})")
    print("| masks | F1 | precision | recall | found / reference | MIoU |\n|---|---|---|---|---|---|")
    for name, masks in (("rough", rough), ("NPsSegNet", network), ("merged", merged)):
        r = score_stack(stack, {s: split_touching(m) for s, m in masks.items()}, 0.3)
        miou = "" if r["miou"] is None else f"{r['miou']:.3f}"
        print(
            f"| {name} | {r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{r['found']} / {r['reference']} | {miou} |"
        )


if __name__ == "__main__":
    main()
