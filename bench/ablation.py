"""The paper's ablation (Figure 3) on a synthetic stack: pix2pix on growing subsets vs pix2pix(5) + CycleGAN.

    python bench/ablation.py --smoke-test                  # 8 tiny images, one-step training: checks that it runs
    python bench/ablation.py --subsets 5,all               # 30 synthetic images, quick preset: ~9 min on 2 CPUs
    python bench/ablation.py                               # subsets 5,10,20,all: ~13 min on 2 (busy) CPUs
    python bench/ablation.py --n-images 80 --frame-size 512 --image-size 256 --preset paper --subsets 5,10,20,40,all
    python bench/ablation.py --images my_stack/ --out runs/ablation   # a real stack instead of a synthetic one

Prints the table (markdown) with the wall time and machine. Scores use the offline random-ResNet-18 extractor
unless ``--extractor`` says otherwise; lower FID/KID and higher IS/SSIM/PSNR are better.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke-test", action="store_true", help="Tiny stack and one-step training: checks it runs."
    )
    p.add_argument(
        "--images", default=None, help="A real stack (folder, glob, s3://); default: a synthetic one."
    )
    p.add_argument("--n-images", type=int, default=30, help="Synthetic stack size.")
    p.add_argument("--frame-size", type=int, default=128, help="Synthetic frame side, px.")
    p.add_argument("--modality", choices=["haadf", "bf-tem"], default="haadf")
    p.add_argument("--preset", choices=["quick", "paper"], default="quick")
    p.add_argument("--image-size", type=int, default=None, help="data.image_size (default: the preset's).")
    p.add_argument(
        "--subsets", default="5,10,20,all", help="Comma-separated subset sizes; 'all' = every image."
    )
    p.add_argument("--pix2pix-epochs", type=int, default=None, help="pix2pix.epochs (default: the preset's).")
    p.add_argument(
        "--cyclegan-epochs", type=int, default=None, help="cyclegan.epochs (default: the preset's)."
    )
    p.add_argument("--steps-per-epoch", type=int, default=None, help="Cap on GAN steps per epoch.")
    p.add_argument(
        "--extractor", default="random-resnet18", help="random-resnet18 | inception | npssegnet:<file>"
    )
    p.add_argument("--workers", type=int, default=1, help="ray.num_workers per stage.")
    p.add_argument(
        "--out", default=None, help="Run folder (default: a temporary one). The same folder resumes."
    )
    args = p.parse_args(argv)
    if args.smoke_test:
        args.n_images, args.frame_size, args.subsets = 8, 96, "3,6"
        args.pix2pix_epochs = args.cyclegan_epochs = 1
        args.steps_per_epoch = 2
    return args


def subset_sizes(text: str) -> tuple[int | None, ...]:
    return tuple(None if s.strip().lower() == "all" else int(s) for s in text.split(",") if s.strip())


def build_config(args, work: Path):
    from tgan_ray.config import load_config

    overrides = {
        "ray.num_workers": args.workers,
        "ray.cpus_per_worker": 1.0 if args.workers > 1 else max(0.5, (os.cpu_count() or 2) - 1.0),
        "tracking.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "data.test_fraction": 0.2,
        # The pipeline's subset 1 is the ablation's smallest subset (paper: 5 images).
        "data.subset1_size": min((n for n in subset_sizes(args.subsets) if n is not None), default=5),
    }
    if args.image_size:
        overrides["data.image_size"] = args.image_size
    if args.smoke_test:
        overrides |= {"data.real_crops": 12, "prior.n_masks": 16}
    for stage, epochs in (("pix2pix", args.pix2pix_epochs), ("cyclegan", args.cyclegan_epochs)):
        if epochs is not None:
            overrides |= {
                f"{stage}.epochs": epochs,
                f"{stage}.epochs_decay": 0 if args.smoke_test else 1,
                f"{stage}.eval_every": 1 if args.smoke_test else max(1, epochs // 2),
            }
        if args.steps_per_epoch:
            overrides[f"{stage}.steps_per_epoch"] = args.steps_per_epoch
        if args.smoke_test:
            overrides |= {f"{stage}.batch_size": 2, f"{stage}.eval_images": 8}
    return load_config(args.preset, overrides=overrides)


def markdown(table) -> str:
    shown = table.drop(columns=["checkpoint"])
    head = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    rows = [
        "| " + " | ".join(f"{v:.5g}" if isinstance(v, float) else str(v) for v in row) + " |"
        for row in shown.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows])


def main(argv=None) -> None:
    args = parse_args(argv)
    from tgan_ray.ablation import run_ablation
    from tgan_ray.data.synthetic import make_stack
    from tgan_ray.runtime import init_ray

    work = Path(args.out or tempfile.mkdtemp(prefix="tgan-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    images = args.images
    if images is None:
        stack = make_stack(
            work / "stack", n=args.n_images, modality=args.modality, size=args.frame_size, seed=0
        )
        images = str(stack / "images")
    cfg = build_config(args, work)
    init_ray(cfg.ray)
    t0 = time.time()
    table = run_ablation(
        images,
        work / "run",
        cfg,
        subset_sizes(args.subsets),
        log=lambda m: print(f"[{time.time() - t0:7.1f}s] {m}", flush=True),
        extractor=args.extractor,
    )
    wall = time.time() - t0
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU x{os.cpu_count()}"
    print(
        f"\nAblation on {images} ({'synthetic ' + args.modality if args.images is None else 'given stack'}, "
        f"preset {args.preset}, image_size {cfg.data.image_size}); {wall / 60:.1f} min on {device}, "
        f"{platform.python_implementation()} {platform.python_version()}; results in {work / 'run'}\n"
    )
    print(markdown(table))


if __name__ == "__main__":
    main()
