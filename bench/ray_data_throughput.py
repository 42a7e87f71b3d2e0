"""Throughput (images/s) of generation and segmentation through Ray Data vs the plain PyTorch loop, same models,
same inputs, same run.

    python bench/ray_data_throughput.py --smoke-test                 # seconds, on CPU
    python bench/ray_data_throughput.py --device cpu --n-generate 256 --n-segment 32
    python bench/ray_data_throughput.py --device cuda --encoder resnet34 --image-size 512 --frame-size 2048 \\
        --n-generate 2048 --n-segment 64 --batch-size 32 --actors 1

Models are untrained (speed does not depend on the weights) and built from the config's generator and
segmenter architectures. Rows:

- ``plain, model only``: ``run_generator`` (pix2pix then CycleGAN) / ``Segmenter.segment`` on inputs already
  in memory: the ceiling of one process.
- ``plain, end to end``: the same loop doing all the job does: sample masks, generate, write PNGs / decode,
  normalise, segment, write the mask, measure particles.
- ``Ray Data``: :func:`tgan_ray.generate.generate_dataset` / :func:`tgan_ray.segment.segment_stack`, from the
  call to the committed manifest; actor start-up included.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke-test", action="store_true", help="Tiny sizes: checks that everything runs.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--encoder", default="resnet18", help="smp encoder of the generators and the segmenter.")
    p.add_argument("--image-size", type=int, default=128, help="Generated image / segmenter tile side, px.")
    p.add_argument("--frame-size", type=int, default=512, help="Side of the frames segmented, px.")
    p.add_argument("--n-generate", type=int, default=64, help="Pairs generated.")
    p.add_argument("--n-segment", type=int, default=16, help="Frames segmented.")
    p.add_argument("--batch-size", type=int, default=16, help="scale_out.batch_size (images per model call).")
    p.add_argument(
        "--actors", type=int, default=None, help="scale_out.actors (default: 1 on cuda, else 1 a CPU)."
    )
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        default=None,
        help="Default: the CPUs but one, shared by the actors.",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of the plain loop (default: torch's)."
    )
    p.add_argument("--out", default=None, help="Work folder (default: a temporary one).")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.image_size, args.frame_size, args.n_generate, args.n_segment = 64, 128, 8, 3
        args.batch_size = 4
    return args


def build_config(args, work: Path):
    from tgan_ray.config import load_config

    cpus = os.cpu_count() or 1
    # A Ray actor runs torch with int(num_cpus) threads (1 for fractions): on CPU, one actor per core uses
    # the cores the way the plain loop's threads do; one CPU stays free for range/read/write tasks.
    actors = args.actors or (1 if args.device == "cuda" else cpus)
    cpus_per_actor = args.cpus_per_actor or max(0.25, (cpus - 1) / actors)
    gan = {"generator_encoder": args.encoder, "generator_decoder_channels": [64, 32, 16, 16, 8]}
    return load_config(
        "quick",
        overrides={
            "data.image_size": args.image_size,
            "data.resize_mode": "tile",
            "segmenter.merge_rough": False,  # the network's path, as the plain loops it is compared with
            "pix2pix.generator_encoder": gan["generator_encoder"],
            "pix2pix.generator_decoder_channels": gan["generator_decoder_channels"],
            "segmenter.encoder": args.encoder,
            "segmenter.inference_batch_size": args.batch_size,
            "scale_out.batch_size": args.batch_size,
            "scale_out.actors": actors,
            "scale_out.cpus_per_actor": cpus_per_actor,
            "scale_out.masks_per_task": max(4, args.batch_size),
            "ray.use_gpu": "yes" if args.device == "cuda" else "no",
            "scale_out.gpus_per_actor": 1.0,
        },
    )


def build_artefacts(cfg, args, work: Path) -> dict[str, str]:
    """Untrained generators, segmenter, a morphology prior and a synthetic stack, all in ``work``."""
    import torch

    from tgan_ray.data.synthetic import make_image, make_stack, synth_config
    from tgan_ray.masks.prior import MorphologyPrior
    from tgan_ray.models.networks import define_generator
    from tgan_ray.models.npssegnet import create_segmenter, save_segmenter

    torch.manual_seed(0)
    paths = {}
    for name in ("pix2pix", "cyclegan"):
        net = define_generator(cfg.pix2pix.generator_encoder, cfg.pix2pix.generator_decoder_channels)
        paths[name] = str(work / f"{name}.pt")
        torch.save(
            {"kind": name, "config": cfg.pix2pix.model_dump(mode="json"), "generator": net.state_dict()},
            paths[name],
        )
    seg = create_segmenter(cfg.segmenter.arch, cfg.segmenter.encoder)
    paths["segmenter"] = str(save_segmenter(seg, work / "npssegnet.pt", meta={"data": cfg.data.model_dump()}))
    masks = [make_image(synth_config(size=args.image_size * 2, seed=s))[1] for s in range(3)]
    MorphologyPrior.from_masks(masks).save(work / "prior.json")
    paths["prior"] = str(work / "prior.json")
    paths["stack"] = str(
        make_stack(work / "stack", n=args.n_segment, size=args.frame_size, seed=1) / "images"
    )
    return paths


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_generation(cfg, paths, args, work: Path) -> list[tuple[str, str, int, float]]:
    import numpy as np

    from tgan_ray.generate import generate_dataset
    from tgan_ray.inference import load_generator, run_generator
    from tgan_ray.io import write_mask_png, write_png
    from tgan_ray.masks.prior import MorphologyPrior
    from tgan_ray.masks.sampling import sample_mask_at

    n, size, seed, bs = args.n_generate, cfg.data.image_size, cfg.data.seed, cfg.scale_out.batch_size
    prior = MorphologyPrior.load(paths["prior"])
    g1, g2 = load_generator(paths["pix2pix"], args.device), load_generator(paths["cyclegan"], args.device)
    masks = np.stack([sample_mask_at(prior, size, seed, i)[0] for i in range(n)]).astype(np.float32)
    run_generator(g2, run_generator(g1, masks[:bs], bs), bs)  # warm-up (cuDNN autotune, allocator)
    model_only = timed(lambda: run_generator(g2, run_generator(g1, masks, bs), bs))

    def end_to_end() -> None:
        out = work / "plain-gen"
        for start in range(0, n, bs):
            idx = range(start, min(n, start + bs))
            m = np.stack([sample_mask_at(prior, size, seed, i)[0] for i in idx])
            images = run_generator(g2, run_generator(g1, m.astype(np.float32), bs), bs)
            for k, i in enumerate(idx):
                write_mask_png(out / "masks" / f"{i:07d}.png", m[k])
                write_png(out / "images" / f"{i:07d}.png", images[k])

    plain = timed(end_to_end)
    ray_s = timed(
        lambda: generate_dataset(
            paths["prior"], paths["pix2pix"], paths["cyclegan"], n, work / "ray-gen", cfg
        )
    )
    label = "generate: pix2pix + CycleGAN"
    return [
        (label, "plain, model only", n, model_only),
        (label, "plain, end to end", n, plain),
        (label, "Ray Data (generate_dataset)", n, ray_s),
    ]


def bench_segmentation(cfg, paths, args, work: Path) -> list[tuple[str, str, int, float]]:
    from tgan_ray.analysis import measure_particles
    from tgan_ray.inference import Segmenter
    from tgan_ray.io import list_stack, read_image, write_mask_png
    from tgan_ray.segment import segment_stack

    uris = list_stack(paths["stack"])
    seg = Segmenter(paths["segmenter"], cfg.data, cfg.segmenter, args.device)
    d = cfg.data
    frames = [d.normalize(read_image(u).data) for u in uris]
    seg.segment(frames[0])  # warm-up
    model_only = timed(lambda: [seg.segment(f) for f in frames])

    def end_to_end() -> None:
        for u in uris:
            em = read_image(u)
            mask = seg.segment(d.normalize(em.data))
            write_mask_png(work / "plain-seg" / "masks" / f"{Path(u).stem}.png", mask)
            measure_particles(mask, Path(u).stem, em.pixel_size_nm)

    plain = timed(end_to_end)
    ray_s = timed(lambda: segment_stack(paths["segmenter"], paths["stack"], work / "ray-seg", cfg))
    label = f"segment: {args.frame_size}px frames, {cfg.data.image_size}px tiles"
    n = len(uris)
    return [
        (label, "plain, model only", n, model_only),
        (label, "plain, end to end", n, plain),
        (label, "Ray Data (segment_stack)", n, ray_s),
    ]


def print_table(rows, args, cfg, ray_cpus: float) -> None:
    import torch

    print(
        f"\ndevice {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor() or 'cpu'}), "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"encoder {args.encoder}, batch {cfg.scale_out.batch_size}, actors {cfg.scale_out.actors} x "
        f"{cfg.scale_out.cpus_per_actor:g} CPU, Ray CPUs {ray_cpus:g}"
    )
    print("| work | path | images | seconds | images/s |\n|---|---|---:|---:|---:|")
    for work, path, n, seconds in rows:
        print(f"| {work} | {path} | {n} | {seconds:.2f} | {n / seconds:.2f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from ray.data import DataContext

    from tgan_ray.runtime import init_ray

    with tempfile.TemporaryDirectory(prefix="tgan-bench-") as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        cfg = build_config(args, work)
        paths = build_artefacts(cfg, args, work)
        ray = init_ray(cfg.ray)
        DataContext.get_current().enable_progress_bars = False
        rows = bench_generation(cfg, paths, args, work) + bench_segmentation(cfg, paths, args, work)
        print_table(rows, args, cfg, ray.cluster_resources().get("CPU", 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
