"""NPsSegNet's saved masks merged with the rough segmenter's, as ``segmenter.merge_rough`` merges them (no Ray).

    python bench/merged_masks.py --run <real_quality out>/PtW/run --rough <real_quality out>/PtW/rough --stack PtW

``--run`` is a finished run folder; ``--rough`` the ``tgan segment --rough`` output beside it (``bench/
real_quality.py`` writes both). A run made before ``merge_rough`` holds NPsSegNet's masks alone: the table shows
them, the rough masks, what merging adds with NPsSegNet always leading (each rough particle that touches no
NPsSegNet particle), and the merge as step 8 makes it now (:func:`~tgan_ray.analysis.selfcheck.merge_with_rough`:
per frame, the rough masks lead where NPsSegNet misses most of their particles), scored as
``bench/real_quality.py`` scores. The frames the rough masks lead are listed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from real_quality import SCORE_COLUMNS, SHARED, score_cells, score_stack, shared_stack

from tgan_ray.analysis import split_touching
from tgan_ray.analysis.selfcheck import LEAD_ROUGH, merge_with_rough
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

    stack = shared_stack(args.stack, args.data)
    network = {s: read_mask_png(args.run / "masks" / f"{s}.png") > 0 for s in stack.truth}
    rough = {s: read_mask_png(args.rough / "masks" / f"{s}.png") > 0 for s in stack.truth}
    network_leads = {s: network[s] | unmasked_particles(rough[s], network[s]) for s in stack.truth}
    both = {s: merge_with_rough(network[s], rough[s]) for s in stack.truth}
    merged = {s: mask for s, (mask, _) in both.items()}
    rough_led = [s for s, (_, lead) in both.items() if lead == LEAD_ROUGH]
    print(
        f"{stack.name} ({args.run}): the rough masks lead on {len(rough_led)} of {len(both)} frames {rough_led}"
    )
    print(f"| masks | {SCORE_COLUMNS} |\n|---|---|---|---|---|---|")
    rows = (
        ("rough", rough),
        ("NPsSegNet", network),
        ("merged, NPsSegNet leads", network_leads),
        ("merged", merged),
    )
    for name, masks in rows:
        r = score_stack(stack, {s: split_touching(m) for s, m in masks.items()}, 0.3)
        print(f"| {name} | {score_cells(r)} |")


if __name__ == "__main__":
    main()
