"""How long a run's training will take on this machine, from a short timed warm-up (printed before step 3).

Each trainable stage's networks take a few optimiser steps on random tiles, in this process, at the threads one
Train worker gets. The probe tiles are small (:data:`PROBES`), because a single step of the paper's 512² networks
takes minutes on a CPU. A step's time is a fixed cost plus a cost per pixel (what a convolution's cost follows):
the two probe sizes give both, and the line through them gives the time at ``data.image_size``.

    estimate = estimate_training(cfg)     # {"pix2pix": {"steps", "s_per_step", "seconds"}, ..., "seconds"}
    print(estimate_line(estimate))        # "training ~25 min on this machine (pix2pix 3 min, ...)"

Only the training stages are timed: generation, segmentation and Ray's start-up add a few minutes more.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from tgan_ray.config import Config
from tgan_ray.runtime import worker_cpus

PROBES = (64, 96)  # the warm-up's tile sides (multiples of 32, as the networks need)
LONG_ON_CPU_S = 3 * 3600  # above this, the estimate line says how to go faster
_STAGES = ("pix2pix", "cyclegan", "segmenter")


def training_steps(cfg: Config, stage: str) -> int:
    """Optimiser steps one worker takes in ``stage`` (epochs x steps per epoch, as ``build_loader`` sizes them)."""
    section = getattr(cfg, stage)
    epochs = section.epochs + getattr(section, "epochs_decay", 0)
    if section.steps_per_epoch:
        return epochs * section.steps_per_epoch
    items = {
        "pix2pix": cfg.data.real_crops,  # subset 1's crops with their rough masks
        "cyclegan": max(cfg.prior.n_masks, cfg.data.real_crops),  # 1st generation vs real crops, unpaired
        # the virtual pairs, plus real crops making up segmenter.real_fraction of the set
        "segmenter": round(cfg.prior.n_masks / (1 - cfg.segmenter.real_fraction)),
    }[stage]
    return epochs * max(1, math.ceil(items / (section.batch_size * max(1, cfg.ray.num_workers))))


def _step_fn(cfg: Config, stage: str, size: int):
    """One optimiser step of ``stage``'s networks on a random batch of ``size``² tiles."""
    section = getattr(cfg, stage)
    n = section.batch_size
    if stage == "segmenter":
        from tgan_ray.models.losses import SegmentationLoss
        from tgan_ray.models.npssegnet import create_segmenter

        extra = {"decoder_channels": section.decoder_channels} if section.decoder_channels else {}
        net = create_segmenter(section.arch, section.encoder, None, **extra).train()
        loss_fn, opt = SegmentationLoss(section.focal_alpha), torch.optim.AdamW(net.parameters())
        image, label = torch.rand(n, 1, size, size), torch.randint(0, 2, (n, size, size))

        def step() -> None:
            loss = loss_fn(net(image), label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step
    from tgan_ray.models import create_gan

    model = create_gan(stage, section.model_copy(update={"generator_encoder_weights": None}))
    for net in model.nets.values():
        net.train()
    batch = {"A": torch.rand(n, 1, size, size) * 2 - 1, "B": torch.rand(n, 1, size, size) * 2 - 1}
    return lambda: model.train_step(batch)


def _timed(cfg: Config, stage: str, size: int, steps: int) -> float:
    step = _step_fn(cfg, stage, size)
    step()  # the first step allocates; it is not timed
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def seconds_per_step(cfg: Config, stage: str, steps: int = 2) -> float:
    """Wall seconds of one of ``stage``'s optimiser steps at ``data.image_size``, from the probe tiles."""
    size = cfg.data.image_size
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(worker_cpus(cfg.ray))))  # as many threads as the Train worker
    try:
        if size <= PROBES[0]:
            return _timed(cfg, stage, size, steps)
        small, large = (_timed(cfg, stage, p, steps) for p in PROBES)
    finally:
        torch.set_num_threads(threads)
    per_px = max(large - small, 0.0) / (PROBES[1] ** 2 - PROBES[0] ** 2)
    fixed = max(small - per_px * PROBES[0] ** 2, 0.0)
    if per_px == 0:  # timing noise swamped the difference: scale the larger probe by the pixel count
        return large * (size / PROBES[1]) ** 2
    return fixed + per_px * size**2


def estimate_training(cfg: Config) -> dict[str, Any]:
    """Per stage: steps (all rounds), seconds per step and seconds; ``seconds`` in all and ``warmup_s``.

    The probe networks' initialisation and random tiles draw from a forked torch generator: a fresh run (which
    times) and a resumed one (which does not) leave the driver's random stream in the same state.
    """
    start = time.perf_counter()
    out: dict[str, Any] = {}
    with torch.random.fork_rng():
        for stage in _STAGES:
            steps = training_steps(cfg, stage) * cfg.run.rounds
            per_step = seconds_per_step(cfg, stage)
            out[stage] = {"steps": steps, "s_per_step": per_step, "seconds": steps * per_step}
    out["seconds"] = sum(out[s]["seconds"] for s in _STAGES)
    out["warmup_s"] = time.perf_counter() - start
    return out


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"25 min"``, ``"3.2 h"`` or ``"2.5 days"``: a person's scale for a rough figure."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def estimate_line(estimate: dict[str, Any]) -> str:
    """One line for the terminal (a CPU's estimate); past :data:`LONG_ON_CPU_S` it says how to go faster."""
    stages = ", ".join(f"{s} {format_duration(estimate[s]['seconds'])}" for s in _STAGES)
    line = (
        f"training ~{format_duration(estimate['seconds'])} on this machine's CPU ({stages}; "
        f"timed in a {estimate['warmup_s']:.0f} s warm-up)"
    )
    if estimate["seconds"] > LONG_ON_CPU_S:
        line += (
            ". That is long for a CPU: `--preset cpu` is about half an hour for ten frames, and a CUDA GPU runs "
            "the paper preset in hours"
        )
    return line
