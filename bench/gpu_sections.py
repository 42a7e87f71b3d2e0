"""Sections 1-3 of ``bench/gpu_suite.py`` (4 and 5: ``gpu_checks.py``), and the context they all share. Each is a
function ``(ctx, rec)`` that fills its record as it goes.

A section appends its measured rows to ``rec["rows"]`` one at a time, so rows measured before a deadline stop it
are kept. Every section reuses another bench script's functions: ``train_throughput`` (section 1),
``ray_data_throughput`` (2), ``real_quality`` (3, the paper preset), ``serve_load`` (4); section 5 runs pytest.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The goals each GPU figure is held against (README "Performance"), one H100-class GPU.
TRAIN_GOALS = {"segmenter": 500, "pix2pix": 300, "cyclegan": 60}  # images/s
RAY_OVER_PLAIN_GOAL = 0.95
SEGMENT_GOAL_512 = 1700  # frames/s through Ray Data at 512 px
SERVE_P50_GOAL_MS = 30  # one 1024 px frame
STAGE_LABELS = {
    "segmenter": "NPsSegNet (UNet++/ResNet34)",
    "pix2pix": "pix2pix (UNet++ G + PatchGAN D)",
    "cyclegan": "CycleGAN (2 G + 2 D)",
}
# Paper-preset epochs are cut to fit the section: training images/s at the paper's batch 4 on an H100 (fp32
# figures of ../shared/notes/ray-2.60.md, a conservative floor for bf16), and each stage's share of the time.
PAPER_RATES = {"pix2pix": 80.0, "cyclegan": 21.0, "segmenter": 98.0}
PAPER_SHARES = {"pix2pix": 0.2, "cyclegan": 0.5, "segmenter": 0.3}
# The pipeline at toy sizes (as tests/test_pipeline.py runs it): the smoke test of section 3.
SMOKE_PIPELINE = {
    "data.image_size": 64,
    "data.real_crops": 8,
    "data.subset1_size": 3,
    "prior.n_masks": 12,
    "pix2pix.epochs": 1,
    "pix2pix.epochs_decay": 0,
    "pix2pix.steps_per_epoch": 2,
    "pix2pix.eval_images": 4,
    "cyclegan.epochs": 1,
    "cyclegan.epochs_decay": 0,
    "cyclegan.steps_per_epoch": 2,
    "cyclegan.eval_images": 4,
    "segmenter.epochs": 1,
    "segmenter.steps_per_epoch": 2,
    "ray.cpus_per_worker": 0.5,
}


@dataclass
class Context:
    """What every section sees: the options, the device, folders, and what earlier sections left."""

    args: argparse.Namespace
    smoke: bool
    cuda: bool
    work: Path  # scratch folder (pipeline runs, stacks, checkpoints)
    out: Path  # the report folder
    data: Path | None  # prepared real frames (None: synthetic, smoke test only)
    section_deadline: float = 0.0  # time.monotonic() at which the running section is stopped
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    def seconds_left(self) -> float:
        return max(0.0, self.section_deadline - time.monotonic())


def _free_gpu() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _quiet_ray(ctx: Context):
    from ray.data import DataContext

    from tgan_ray.runtime import init_ray

    for attempt in range(3):  # Ray gives a raylet 30 s to start: on a crowded CPU, try again
        try:
            ray = init_ray(None, num_cpus=2 if ctx.smoke else None)
            break
        except Exception as exc:  # noqa: BLE001
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            import ray

            ray.shutdown()
    DataContext.get_current().enable_progress_bars = False
    return ray


# ---------------------------------------------------------------------------------- 1. training throughput


def section_train(ctx: Context, rec: dict) -> None:
    import torch
    import train_throughput as tt

    from tgan_ray.config import load_config

    a = ctx.args
    size, steps = (64, 2) if ctx.smoke else (a.size, a.train_steps)
    batches = {s: int(b) for s, b in (kv.split("=") for kv in a.train_batch.split(","))}
    if ctx.smoke:
        batches = dict.fromkeys(batches, 2)
        torch.set_num_threads(1)
    overrides = {"data.image_size": size, "tracking.enabled": False, "ray.num_workers": 1}
    overrides.update({f"{s}.batch_size": b for s, b in batches.items()})
    if ctx.smoke:
        overrides["ray.cpus_per_worker"] = 0.5
    cfg = load_config("quick" if ctx.smoke else "paper", overrides=overrides)
    device = torch.device(ctx.device)
    _quiet_ray(ctx)
    data = tt.random_data(max(batches.values()) * steps, size)
    rec["setup"] = {
        "size_px": size,
        "steps_timed": steps,
        "precision": "bf16 + channels_last" if ctx.cuda else "fp32",
        "preset": "quick (smoke test)" if ctx.smoke else "paper",
    }
    rec["columns"] = [
        ("stage", "stage"),
        ("batch", "batch"),
        ("plain_img_s", "plain PyTorch (img/s)"),
        ("ray_img_s", "Ray Train, 1 worker (img/s)"),
        ("ray_over_plain", "Ray / plain"),
        ("goal", "goal"),
    ]
    rec["notes"].append(
        "plain: one batch kept on the device, no data loading; Ray Train: the stage's own DataLoader with its "
        "augmentation, in the worker process"
    )
    for stage in batches:
        row = {
            "stage": STAGE_LABELS[stage] + (" [quick-preset nets]" if ctx.smoke else ""),
            "batch": batches[stage],
        }
        row["goal"] = f"≥ {TRAIN_GOALS[stage]} img/s, Ray ≥ {RAY_OVER_PLAIN_GOAL}x plain"
        rec["rows"].append(row)
        row["plain_img_s"] = tt.plain_loop(stage, cfg, data, steps, device, bf16=ctx.cuda)
        _free_gpu()
        if ctx.smoke and stage != "segmenter":
            continue  # section 3 runs these stages through Ray Train too: the smoke test skips the repeat
        row["ray_img_s"] = tt.ray_loop(stage, cfg, data, steps, str(ctx.work / "train"))
        row["ray_over_plain"] = row["ray_img_s"] / row["plain_img_s"]
    if ctx.smoke:
        rec["notes"].append(
            "--smoke-test: Ray Train row for NPsSegNet only (section 3 trains the GANs on Ray)"
        )
    compiled = [s for s in a.compile_stages.split(",") if s]
    if ctx.smoke and compiled:
        rec["notes"].append("torch.compile rows: not run in --smoke-test (compiling takes minutes on a CPU)")
        compiled = []
    for stage in compiled:
        row = {"stage": f"{STAGE_LABELS[stage]} + torch.compile", "batch": batches[stage], "ray_img_s": None}
        row["goal"] = f"≥ {TRAIN_GOALS[stage]} img/s"
        rec["rows"].append(row)
        row["plain_img_s"] = tt.plain_loop(stage, cfg, data, steps, device, bf16=ctx.cuda, compile=True)
        _free_gpu()


# ---------------------------------------------------------------------------------- 2. Ray Data segmentation


def _replicate_stack(images: Path, n: int) -> None:
    """Grow a stack of a few distinct synthetic frames to ``n`` files (copies): Ray Data reads each one."""
    frames = sorted(images.glob("*.png"))
    for i in range(len(frames), n):
        src = frames[i % len(frames)]
        shutil.copyfile(src, images / f"{src.stem}_copy{i:05d}.png")


def section_data(ctx: Context, rec: dict) -> None:
    import ray_data_throughput as rdt

    a = ctx.args
    sizes = [(128, 2)] if ctx.smoke else [tuple(map(int, s.split(":"))) for s in a.seg_frames.split(",")]
    tile = 64 if ctx.smoke else a.size
    rec["columns"] = [
        ("frames", "frames"),
        ("path", "path"),
        ("n", "count"),
        ("seconds", "seconds"),
        ("frames_per_s", "frames/s"),
        ("goal", "goal"),
    ]
    rec["setup"] = {"tile_px": tile, "encoder": "resnet18" if ctx.smoke else "resnet34"}
    _quiet_ray(ctx)
    for frame, n in sizes:
        args = argparse.Namespace(
            device=ctx.device,
            encoder=rec["setup"]["encoder"],
            image_size=tile,
            frame_size=frame,
            n_segment=min(n, 8),
            batch_size=4 if ctx.smoke else a.seg_batch,
            actors=None,
            cpus_per_actor=None,
        )
        work = ctx.work / f"segment-{frame}"
        work.mkdir(parents=True, exist_ok=True)
        cfg = rdt.build_config(args, work)
        paths = rdt.build_artefacts(cfg, args, work)
        _replicate_stack(Path(paths["stack"]), n)
        for label, path, count, seconds in rdt.bench_segmentation(cfg, paths, args, work):
            goal = f"≥ {SEGMENT_GOAL_512} frames/s" if frame == 512 and "Ray" in path else ""
            rec["rows"].append(
                {
                    "frames": f"{frame} px ({label.split(', ')[-1]})",
                    "path": path,
                    "n": count,
                    "seconds": seconds,
                    "frames_per_s": count / seconds,
                    "goal": goal,
                }
            )
        _free_gpu()


# ---------------------------------------------------------------------------------- 3. the paper preset, end to end


def pick_stack(ctx: Context):
    """The real stack to run (``--stack`` in ``--data``), or a tiny synthetic one (smoke test without data)."""
    import real_quality as rq

    if ctx.data is None:
        return rq.synthetic_stack(ctx.work / "paper", n=6, size=128)
    if ctx.args.stack == "tem-sintering":
        stack = rq.tem_sintering_stack(ctx.data / "tem-sintering")
    else:
        stack = next(
            s for s in rq.stem_catalyst_stacks(ctx.data / "stem-catalysts") if s.name == ctx.args.stack
        )
    missing = [str(f) for f in stack.frames if not f.exists()]
    if missing or not stack.frames:
        raise FileNotFoundError(
            f"{stack.name}: frames missing in {ctx.data} ({missing[:2]}); see --prep-data"
        )
    if ctx.smoke:  # a few frames are enough to check the path
        stack.frames = stack.frames[:4]
        stack.truth = {f.stem: stack.truth[f.stem] for f in stack.frames}
    return stack


def paper_epochs(cfg, seconds: float) -> dict[str, dict[str, int]]:
    """Epochs per trainable stage that fit ``seconds`` of training (never more than the paper's)."""
    per_epoch = {
        "pix2pix": cfg.data.real_crops,
        "cyclegan": cfg.prior.n_masks,
        "segmenter": cfg.prior.n_masks,
    }
    out = {}
    for stage, share in PAPER_SHARES.items():
        sc = getattr(cfg, stage)
        paper = sc.epochs + getattr(sc, "epochs_decay", 0)
        fit = int(share * seconds * PAPER_RATES[stage] / per_epoch[stage])
        out[stage] = {"paper": paper, "run": max(1, min(paper, fit))}
    return out


def paper_config(ctx: Context):
    from tgan_ray.config import load_config

    if ctx.smoke:
        return load_config("quick", overrides={**SMOKE_PIPELINE, "tracking.enabled": False}), None
    base = load_config(ctx.args.paper_preset, overrides={"tracking.enabled": False})
    epochs = paper_epochs(base, ctx.args.paper_train_seconds)
    overrides: dict[str, Any] = {"tracking.enabled": False}
    for stage, e in epochs.items():
        if stage == "segmenter":
            overrides["segmenter.epochs"] = e["run"]
        else:  # keep the paper's 2:1 split between constant and decaying learning rate
            decay = e["run"] // 3
            overrides[f"{stage}.epochs"], overrides[f"{stage}.epochs_decay"] = e["run"] - decay, decay
            overrides[f"{stage}.eval_every"] = min(getattr(base, stage).eval_every, e["run"])
    import yaml

    overrides.update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in ctx.args.paper_set)})
    return load_config(ctx.args.paper_preset, overrides=overrides), epochs


def section_paper(ctx: Context, rec: dict) -> None:
    import real_quality as rq

    stack = pick_stack(ctx)
    cfg, epochs = paper_config(ctx)
    rec["setup"] = {
        "stack": stack.name,
        "frames": len(stack.frames),
        "reference": stack.reference,
        "preset": "quick, toy epochs (smoke test)" if ctx.smoke else ctx.args.paper_preset,
        "epochs": epochs,
        "overrides": ", ".join(ctx.args.paper_set) or "none",
    }
    if epochs and any(e["run"] < e["paper"] for e in epochs.values()):
        rec["notes"].append(
            "epochs cut to fit the budget (--paper-train-seconds "
            f"{ctx.args.paper_train_seconds:g}): "
            + ", ".join(f"{s} {e['run']} of {e['paper']}" for s, e in epochs.items())
        )
    rec["columns"] = [
        ("what", "step / segmenter"),
        ("seconds", "wall time (s)"),
        ("miou", "MIoU"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("f1", "F1"),
        ("count_error", "count error"),
    ]
    _quiet_ray(ctx)
    work = ctx.work / "paper"
    log = (lambda m: None) if ctx.smoke else print
    result = rq.run_stack(stack, work, cfg, rough_only=False, box_iou=ctx.args.box_iou, log=log)
    rec["result"] = result
    manifest = json.loads((work / stack.name / "run" / "manifest.json").read_text())
    for step, info in manifest["steps"].items():
        rec["rows"].append({"what": f"step {step}", "seconds": info.get("seconds")})
    for key, label in (("rough", "rough segmenter alone"), ("label_free", "label-free NPsSegNet")):
        seconds = result.get("rough_seconds" if key == "rough" else "label_free_seconds")
        rec["rows"].append({"what": label, "seconds": seconds, **result[key]})
    model = work / stack.name / "run" / "round1" / "npssegnet.pt"
    found = (
        model
        if model.exists()
        else next(iter(sorted((work / stack.name / "run").rglob("npssegnet.pt"))), None)
    )
    if found:
        ctx.shared["paper_model"] = str(found)
