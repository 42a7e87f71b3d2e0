"""The GPU paths: bf16 autocast and channels_last training steps, a Ray Train stage on a GPU worker, and a GPU Ray
Data actor pool. Marked ``gpu``: skipped without CUDA (conftest), run by ``bench/gpu_suite.py`` section 5."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_stage_loops import discs as _discs  # bright noisy discs and their masks

from tgan_ray.config import load_config

pytestmark = pytest.mark.gpu

SIZE = 64


def _segmenter_step(channels_last: bool) -> tuple[torch.nn.Module, list[float]]:
    from tgan_ray.models import SegmentationLoss, create_segmenter

    torch.manual_seed(0)
    net = create_segmenter("unetplusplus", "resnet18", decoder_channels=[32, 16, 16, 8, 8]).cuda()
    images, masks = _discs(8)
    x = torch.from_numpy(images)[:, None].cuda()
    y = torch.from_numpy(masks).long().cuda()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn, losses = SegmentationLoss(), []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = net(x)
        assert logits.dtype == torch.bfloat16
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, losses


def test_bf16_autocast_segmenter_step_learns():
    net, losses = _segmenter_step(channels_last=False)
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in net.parameters())  # bf16 compute, fp32 master weights


def test_channels_last_segmenter_step_keeps_its_layout():
    net, losses = _segmenter_step(channels_last=True)
    assert all(np.isfinite(losses))
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("stage", ["pix2pix", "cyclegan"])
def test_bf16_channels_last_gan_step(stage):
    from tgan_ray.models import create_gan

    cfg = load_config("quick")
    model = create_gan(stage, getattr(cfg, stage))
    for key in list(model.nets):
        model.nets[key] = model.nets[key].cuda().to(memory_format=torch.channels_last)
    model.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    images, masks = _discs(4)
    b = torch.from_numpy(images)[:, None].cuda().contiguous(memory_format=torch.channels_last) * 2 - 1
    a = torch.from_numpy(masks)[:, None].float().cuda() * 2 - 1 if stage == "pix2pix" else b.flip(0)
    for _ in range(2):
        losses = model.train_step({"A": a, "B": b})
    assert losses and all(np.isfinite(v) for v in losses.values())


def test_train_stage_on_a_gpu_worker(ray_local, tmp_path):
    from tgan_ray.train import train_stage

    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("Ray sees no GPU")
    cfg = load_config(
        "quick",
        overrides={
            "ray.use_gpu": "yes",
            "ray.cpus_per_worker": 0.5,
            "tracking.enabled": False,
            "segmenter.epochs": 2,
            "segmenter.steps_per_epoch": 3,
            "segmenter.batch_size": 4,
        },
    )
    images, masks = _discs(16)
    data = {"train_images": images, "train_masks": masks, "val_images": images[:4], "val_masks": masks[:4]}
    result = train_stage("segmenter", cfg.segmenter, data, cfg, tmp_path / "run", name="gpu-seg")
    assert Path(result.model_path).is_file()
    assert np.isfinite(result.metrics["val/miou"])
    assert result.metrics["train/images_per_s"] > 0


def test_segment_stack_on_a_gpu_actor(ray_local, tmp_path):
    from tgan_ray.config import DataConfig
    from tgan_ray.data.synthetic import make_stack
    from tgan_ray.models.npssegnet import create_segmenter, save_segmenter
    from tgan_ray.segment import segment_stack

    if ray_local.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("Ray sees no GPU")
    net = create_segmenter("unetplusplus", "resnet18", decoder_channels=[16, 16, 8, 8, 8])
    model = save_segmenter(
        net,
        tmp_path / "npssegnet.pt",
        meta={"data": DataConfig(image_size=64, resize_mode="tile").model_dump()},
    )
    stack = make_stack(tmp_path / "stack", n=4, size=128, seed=2) / "images"
    cfg = load_config(
        "quick",
        overrides={
            "ray.use_gpu": "yes",
            "scale_out.gpus_per_actor": 1.0,
            "scale_out.cpus_per_actor": 0.5,
            "scale_out.batch_size": 2,
        },
    )
    result = segment_stack(model, stack, tmp_path / "out", cfg)
    assert result.errors == []
    assert result.segmented == 4
    assert len(list(Path(result.masks).glob("*.png"))) == 4
