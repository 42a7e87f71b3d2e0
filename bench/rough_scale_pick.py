"""How each frame of a real stack picks its particle scale, and what other rules would have given (no Ray).

    python bench/rough_scale_pick.py --stacks Pd,PtW

For each stack: the candidate radii ``tgan segment --rough`` derives (``ClassicalSegmenter.stack_radii`` on up to 8
frames), then per frame its own blob-scan radius and, at every candidate, the plausible particles of about that
size and the frame's box / mask F1 (``bench/real_quality.py`` scoring). Then the whole stack's F1 under four rules:
``pick_radius`` as it is, the most particles (the rule before ``9dcb10c``), the candidate nearest the frame's own
scan, and the best candidate per frame (an oracle that reads the reference).
"""

from __future__ import annotations

import argparse

import numpy as np
from real_quality import SHARED, Stack, score_stack, stem_catalyst_stacks, tem_sintering_stack

from tgan_ray.config import load_config
from tgan_ray.io import read_image
from tgan_ray.masks import ClassicalSegmenter
from tgan_ray.masks.classical import sized_count
from tgan_ray.masks.particle_labels import cut_touching
from tgan_ray.segment import ROUGH_SAMPLE_FRAMES


def one_frame(stack: Stack, stem: str, mask: np.ndarray) -> float:
    single = Stack(stack.name, stack.reference, [], {stem: stack.truth[stem]}, stack.modality)
    return score_stack(single, {stem: mask}, 0.3)["f1"]


def probe(stack: Stack, seg: ClassicalSegmenter, cfg) -> None:
    frames = {f.stem: cfg.data.normalize(read_image(f).data) for f in stack.frames}
    stems = list(frames)
    picks = sorted({round(i) for i in np.linspace(0, len(stems) - 1, min(len(stems), ROUGH_SAMPLE_FRAMES))})
    contrast, radii = seg.stack_radii([frames[stems[i]] for i in picks])
    print(f"\n### {stack.name}: {contrast}, candidate radii {[round(r, 2) for r in radii]}\n")
    print("| frame | own scan r | " + " | ".join(f"r = {r:.1f}: found, F1" for r in radii) + " | picked |")
    print("|---" * (len(radii) + 3) + "|")
    rules: dict[str, dict[str, np.ndarray]] = {k: {} for k in ("pick_radius", "most", "nearest", "oracle")}
    for stem, x in frames.items():
        own = seg.estimate_scale(x, contrast)
        found = []
        for r in radii:
            labels = seg.label(x, r, contrast)
            mask = cut_touching(labels)
            found.append((sized_count(labels, r), mask, one_frame(stack, stem, mask)))
        picked, labels = seg.pick_radius(x, radii, contrast)
        rules["pick_radius"][stem] = cut_touching(labels)
        rules["most"][stem] = max(found, key=lambda f: f[0])[1]
        rules["nearest"][stem] = found[int(np.argmin([abs(np.log(r / own)) for r in radii]))][1]
        rules["oracle"][stem] = max(found, key=lambda f: f[2])[1]
        cells = " | ".join(f"{n}, {f1:.2f}" for n, _, f1 in found)
        print(f"| {stem} | {own:.2f} | {cells} | {picked:.1f} |")
    print("\n| rule | precision | recall | F1 |\n|---|---|---|---|")
    for name, masks in rules.items():
        s = score_stack(stack, masks, 0.3)
        print(f"| {name} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stacks", default="Pd,PtW", help="Comma-separated stack names (default Pd,PtW).")
    p.add_argument(
        "--preset", default="cpu", help="Config preset whose rough settings are used (default cpu)."
    )
    args = p.parse_args()
    cfg = load_config(args.preset)
    stacks = {s.name: s for s in stem_catalyst_stacks(SHARED / "stem-catalysts")}
    stacks["tem-sintering"] = tem_sintering_stack(SHARED / "tem-sintering")
    unknown = sorted(set(args.stacks.split(",")) - set(stacks))
    if unknown:
        p.error(f"unknown stack(s) {unknown}; choose from {sorted(stacks)}")
    r = cfg.rough
    seg = ClassicalSegmenter(r.particle_contrast, r.min_particle_px, r.confidence)
    for name in args.stacks.split(","):
        probe(stacks[name], seg, cfg)


if __name__ == "__main__":
    main()
