"""Step 8's speed: `tgan segment` against a plain PyTorch loop over the same frames, and the network's floor.

Rows, for each frame size (synthetic HAADF frames written as 16-bit PNGs, the CPU preset's segmenter with random
weights unless --model names a trained one):

- ``tgan segment (Ray Data)``: :func:`tgan_ray.segment.segment_stack` end to end (read, normalise, tile, network,
  mask, particle table, PNG/TIFF masks), timed on a second run so Ray's own start-up is left out; the network's
  path alone (``segmenter.merge_rough`` off), as the plain loops below run it;
- ``tgan segment, merged with the rough masks``: the same with ``segmenter.merge_rough`` on, the default of
  ``tgan segment --model`` and of a run's step 8: each frame also goes through the classical segmenter;
- ``plain loop, training tiles``: a plain PyTorch loop with the tiling used before inference tiles were decoupled
  from training tiles (``data.image_size`` tiles, 25% overlap, fp32), same pre- and post-processing;
- ``plain loop, inference tiles``: the same loop through :class:`tgan_ray.inference.Segmenter` (what the Ray
  actors run): the Ray overhead is the gap between this row and the first;
- ``one whole-frame pass``: one forward pass over the padded working frame, nothing else: the floor for this
  network on this machine.

``s/frame`` is a job's time over its frames, its fixed cost included (the actors' start, the stack's rough
settings). ``s/extra frame``, for the two ``tgan segment`` rows: what each frame adds to a job (a job of twice the
frames, less the first, over the frames), the time per frame of a long stack.

    python bench/segment_throughput.py                     # 512 and 2048 px frames, CPU preset net
    python bench/segment_throughput.py --model runs/r1/round1/npssegnet.pt --sizes 2048
    python bench/segment_throughput.py --smoke-test        # seconds: tiny frames and net
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(cfg, folder: Path) -> Path:
    """The config's NPsSegNet with random weights, saved with its data settings as a run would save it."""
    import torch

    from tgan_ray.models.npssegnet import create_segmenter, save_segmenter

    torch.manual_seed(0)
    s = cfg.segmenter
    net = create_segmenter(s.arch, s.encoder, None, decoder_channels=s.decoder_channels)
    return save_segmenter(net, folder / "npssegnet.pt", meta={"data": cfg.data.model_dump(mode="json")})


def write_frames(folder: Path, n: int, size: int, sources: list[Path]) -> list[Path]:
    """``n`` frames of ``size`` px as 16-bit PNGs: centre crops of ``sources`` (cycled), or synthetic HAADF."""
    from PIL import Image

    from tgan_ray.data.synthetic import SynthConfig, make_image
    from tgan_ray.io import read_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        if sources:
            image = read_image(sources[i % len(sources)]).data.astype(np.float32)
            top, left = max(0, (image.shape[0] - size) // 2), max(0, (image.shape[1] - size) // 2)
            image = image[top : top + size, left : left + size]
            image = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
        else:
            image = make_image(SynthConfig(size=size, pixel_size_nm=0.5, mean_diameter_nm=5.0), rng=i)[0]
        paths.append(folder / f"frame{i:03d}.png")
        Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(paths[-1])
    return paths


def _normalised(seg, path: Path) -> np.ndarray:
    from tgan_ray.io import read_image

    d = seg.data_cfg
    return d.normalize(read_image(path).data)


def _post(mask: np.ndarray, stem: str):
    """The particle table, as the Ray actor makes it."""
    from tgan_ray.analysis import measure_particles, split_touching

    return measure_particles(split_touching(mask), stem, None)


def plain_loop_training_tiles(seg, model_path: Path, frames: list[Path]) -> float:
    """Seconds for the frames: training-size tiles, 25% overlap, fp32, contiguous memory (the old path)."""
    import torch

    from tgan_ray.data.tiling import tile_image, untile
    from tgan_ray.data.working import to_original, to_working, working_scale
    from tgan_ray.models.npssegnet import load_segmenter

    model = load_segmenter(str(model_path), map_location="cpu")[0].eval()
    d, batch = seg.data_cfg, seg.seg_cfg.inference_batch_size
    start = time.perf_counter()
    for path in frames:
        image = _normalised(seg, path)
        work = to_working(image, working_scale(image.shape, d))
        tiles, tilemap = tile_image(work, d.image_size, seg.seg_cfg.tile_overlap)
        probs = []
        with torch.inference_mode():
            for i in range(0, len(tiles), batch):
                logits = model(torch.from_numpy(tiles[i : i + batch, None]))
                probs.append(torch.softmax(logits, dim=1)[:, 1].numpy())
        probability = to_original(untile(np.concatenate(probs), tilemap), image.shape)
        _post(seg.to_mask(probability, image=image), path.stem)
    return time.perf_counter() - start


def plain_loop_segmenter(seg, frames: list[Path]) -> float:
    """Seconds for the frames through :class:`Segmenter` (inference tiles, channels_last, the chosen dtype)."""
    start = time.perf_counter()
    for path in frames:
        image = _normalised(seg, path)
        _post(seg.segment(image), path.stem)
    return time.perf_counter() - start


def whole_frame_pass(seg, frames: list[Path]) -> float:
    """Seconds for one forward pass per working frame (padded to a multiple of 32), in the Segmenter's dtype."""
    import torch

    from tgan_ray.data.working import working_scale
    from tgan_ray.inference import _autocast
    from tgan_ray.io import read_image

    shape = read_image(frames[0]).data.shape
    side = [32 * int(np.ceil(n * working_scale(shape, seg.data_cfg) / 32)) for n in shape]
    x = torch.rand(1, 1, *side).contiguous(memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode(), _autocast(seg.device, seg.dtype):
        for _ in frames:
            seg.model(x)
    return time.perf_counter() - start


def tgan_segment(model: Path, folder: Path, out: Path, cfg, warm_up: bool = True) -> float:
    """Seconds of the second of two `tgan segment` runs (the first starts Ray and warms its workers); of the
    only run with ``warm_up=False`` (Ray already warm)."""
    import shutil

    from tgan_ray.segment import segment_stack

    if warm_up:
        segment_stack(model, folder, out, cfg)
        shutil.rmtree(out)
    start = time.perf_counter()
    result = segment_stack(model, folder, out, cfg)
    seconds = time.perf_counter() - start
    if result.errors:
        raise RuntimeError(f"tgan segment failed on {len(result.errors)} frame(s): {result.errors[:2]}")
    return seconds


def run(args) -> dict:

    from tgan_ray.config import load_config

    # The network's path: the plain loops it is compared with run no classical pass (the merged row turns it on).
    overrides = {"data.resize_mode": "tile", "data.scale": args.scale, "segmenter.merge_rough": False}
    if args.smoke_test:
        overrides.update({"segmenter.encoder": "resnet18", "segmenter.decoder_channels": [16, 8, 8, 8, 8]})
    cfg = load_config(args.preset, overrides=overrides)
    with tempfile.TemporaryDirectory(prefix="segment-throughput-") as tmp:
        return _measure(args, cfg, Path(tmp))


def _measure(args, cfg, work: Path) -> dict:
    import torch

    from tgan_ray.inference import Segmenter

    model = Path(args.model) if args.model else build_model(cfg, work)
    merged = cfg.model_copy(update={"segmenter": cfg.segmenter.model_copy(update={"merge_rough": True})})
    seg = Segmenter(model, None if args.model else cfg.data, cfg.segmenter)
    torch.set_num_threads(os.cpu_count() or 1)
    sources = sorted(Path(p) for p in glob.glob(args.images)) if args.images else []
    if args.images and not sources:
        raise SystemExit(f"--images {args.images}: no files match")
    rows = []
    for size in args.sizes:
        frames = write_frames(work / f"frames{size}", args.frames, size, sources)
        write_frames(work / f"twice{size}", 2 * args.frames, size, sources)
        plain_loop_segmenter(seg, frames[:1])  # warm-up: allocator, oneDNN kernels
        jobs = {
            "tgan segment (Ray Data)": ("out", cfg),
            "tgan segment, merged with the rough masks (default)": ("merged", merged),
        }
        timings, extra = {}, {}
        for path, (name, job_cfg) in jobs.items():
            timings[path] = tgan_segment(model, work / f"frames{size}", work / f"{name}{size}", job_cfg)
            # A job's fixed cost (actors' start, the stack's rough settings) is paid once: twice the frames
            # cost the time of one frame more, each, as a long stack would.
            out = work / f"{name}{size}_twice"
            twice = tgan_segment(model, work / f"twice{size}", out, job_cfg, warm_up=False)
            extra[path] = (twice - timings[path]) / len(frames)
        timings |= {
            "plain loop, training tiles": plain_loop_training_tiles(seg, model, frames),
            "plain loop, inference tiles": plain_loop_segmenter(seg, frames),
            "one whole-frame pass": whole_frame_pass(seg, frames),
        }
        for path, seconds in timings.items():
            rows.append(
                {
                    "size": size,
                    "path": path,
                    "frames": len(frames),
                    "s_per_frame": seconds / len(frames),
                    "s_per_extra_frame": extra.get(path),
                }
            )
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "date": time.strftime("%Y-%m-%d"),
        "preset": args.preset,
        "model": args.model or "random weights",
        "frames": args.images or "synthetic HAADF",
        "image_size": seg.data_cfg.image_size,
        "inference_tile": seg.max_tile,
        "dtype": str(seg.dtype).replace("torch.", ""),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"{result['machine']}, {result['date']}; preset {result['preset']}, model {result['model']}, frames "
        f"{result['frames']} (centre crops), training tile "
        f"{result['image_size']} px, inference tiles up to {result['inference_tile']} px, {result['dtype']}",
        "",
        "| frame | path | frames | s/frame | frames/s | s/extra frame |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        s, extra = r["s_per_frame"], r.get("s_per_extra_frame")
        extra = "" if extra is None else f"{extra:.2f}"
        lines.append(f"| {r['size']}² | {r['path']} | {r['frames']} | {s:.2f} | {1 / s:.2f} | {extra} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", help="A trained NPsSegNet checkpoint (default: the preset's net, random weights)."
    )
    ap.add_argument(
        "--images",
        help="Glob of real frames to crop the test frames from (default: synthetic HAADF frames). A random-weight "
        "net marks noise, so its particle tables cost more than a trained one's: give --model with real frames.",
    )
    ap.add_argument("--preset", default="cpu", help="Config preset whose segmenter and settings are used.")
    ap.add_argument("--sizes", default="512,2048", help="Comma-separated frame sides, px.")
    ap.add_argument("--frames", type=int, default=4, help="Frames per size.")
    ap.add_argument(
        "--scale", type=float, default=1.0, help="Working scale (data.scale) of a random-weight net."
    )
    ap.add_argument("--out", help="Write the result here as JSON (and .md beside it).")
    ap.add_argument("--smoke-test", action="store_true", help="Tiny net and frames: checks the script runs.")
    args = ap.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.smoke_test:
        args.sizes, args.frames = [96], 2
    result = run(args)
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        Path(args.out).with_suffix(".md").write_text(markdown(result) + "\n")


if __name__ == "__main__":
    main()
