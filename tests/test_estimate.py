"""The training estimate printed before a CPU run's first training step (train/estimate.py)."""

import math

import pytest
import torch

from tgan_ray.config import load_config
from tgan_ray.train import estimate as est


def test_steps_follow_the_loaders_sizes():
    quick = load_config("quick")
    assert est.training_steps(quick, "pix2pix") == (30 + 10) * 10  # steps_per_epoch caps every epoch
    paper = load_config("paper")  # full passes: items / (batch x workers) per epoch
    items = round(paper.prior.n_masks / (1 - paper.segmenter.real_fraction))
    per_epoch = math.ceil(items / (paper.segmenter.batch_size * max(1, paper.ray.num_workers)))
    assert est.training_steps(paper, "segmenter") == paper.segmenter.epochs * per_epoch
    two = load_config("paper", overrides={"ray.num_workers": 2})
    assert est.training_steps(two, "segmenter") < est.training_steps(paper, "segmenter")


def test_a_larger_tile_is_timed_at_two_probes_and_extrapolated(monkeypatch):
    """A step costs a fixed part plus a part per pixel: the two probes give both, the tile's size the rest."""
    fixed, per_px = 0.05, 1e-5
    timed = []

    def fake_timed(cfg, stage, size, steps):
        timed.append(size)
        return fixed + per_px * size**2

    monkeypatch.setattr(est, "_timed", fake_timed)
    cfg = load_config("quick", overrides={"data.image_size": 512})
    assert est.seconds_per_step(cfg, "segmenter") == pytest.approx(fixed + per_px * 512**2)
    assert timed == list(est.PROBES)
    timed.clear()
    small = load_config("quick")  # 64 px tiles: timed as they are
    assert est.seconds_per_step(small, "segmenter") == pytest.approx(fixed + per_px * 64**2)
    assert timed == [64]


@pytest.mark.integration  # times real optimiser steps
def test_estimate_times_every_stage_and_says_when_a_cpu_run_is_long():
    # Batches of one: what is tested is the arithmetic and the line, and the probes' cost grows with the batch
    # (the quick preset's batches of 4 and 8 took up to 106 s on 2 crowded cores).
    one = {f"{stage}.batch_size": 1 for stage in est._STAGES}
    cfg = load_config("quick", overrides={**one, "segmenter.steps_per_epoch": 1, "run.rounds": 2})
    estimate = est.estimate_training(cfg)
    for stage in ("pix2pix", "cyclegan", "segmenter"):
        row = estimate[stage]
        assert row["s_per_step"] > 0 and row["steps"] == 2 * est.training_steps(cfg, stage)
        assert row["seconds"] == pytest.approx(row["steps"] * row["s_per_step"])
    assert estimate["seconds"] == pytest.approx(sum(estimate[s]["seconds"] for s in est._STAGES))
    # Timing leaves the caller's torch random stream where it was (a resumed run skips it).
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    est.estimate_training(load_config("quick", overrides={**one, "pix2pix.steps_per_epoch": 1}))
    assert torch.equal(torch.rand(3), expected)
    line = est.estimate_line(estimate)
    assert line.startswith("training ~") and "faster" not in line
    days = {**estimate, "seconds": 3 * 86400.0}
    assert "days" in est.estimate_line(days) and "--preset cpu" in est.estimate_line(days)


@pytest.mark.parametrize(
    "seconds, shown", [(40, "40 s"), (25 * 60, "25 min"), (3.2 * 3600, "3.2 h"), (5 * 86400, "5.0 days")]
)
def test_durations_read_at_a_persons_scale(seconds, shown):
    assert est.format_duration(seconds) == shown
