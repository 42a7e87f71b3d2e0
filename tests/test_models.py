"""Models on CPU with 64x64 inputs and tiny widths: shapes, losses, training signal, checkpoints, DDP safety."""

from __future__ import annotations

import functools
import math

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from tgan_ray.config import CycleGANConfig, Pix2PixConfig
from tgan_ray.models import (
    CycleGANModel,
    GANLoss,
    ImagePool,
    Pix2PixModel,
    SegmentationLoss,
    count_batchnorm,
    create_gan,
    create_segmenter,
    define_discriminator,
    define_generator,
    linear_decay_factor,
    load_segmenter,
    predict_proba,
    save_segmenter,
)

# A 0.4M-parameter timm encoder keeps multi-step training tests to about a second of CPU each.
TINY_ENCODER = "tu-mobilenetv3_small_050"
TINY = {
    "encoder": TINY_ENCODER,
    "decoder_channels": (16, 8, 8, 8, 8),
    "discriminator_width": 8,
    "discriminator_encoder": TINY_ENCODER,
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each test on one intra-op thread: on 2 shared cores, OpenMP threads that wait on each other spin and
    make these tiny models up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def disk_pair(size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic particle mask and a matching 'image' (bright blurred disks on a gradient), both in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = torch.zeros(size, size)
    for _ in range(6):
        cy, cx = torch.randint(8, size - 8, (2,), generator=g).tolist()
        r = int(torch.randint(3, 7, (1,), generator=g))
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1.0
    blurred = torch.nn.functional.avg_pool2d(mask[None, None], 5, stride=1, padding=2)[0, 0]
    image = 0.3 * xx / size - 0.6 + 1.2 * blurred
    return (mask * 2 - 1)[None, None], image.clamp(-1, 1)[None, None]


# --- networks ----------------------------------------------------------------------------------------------


def test_generator_shape_and_tanh_range():
    gen = define_generator("resnet18", (16, 8, 8, 8, 8))
    out = gen(torch.randn(2, 1, 64, 64) * 3)
    assert out.shape == (2, 1, 64, 64)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0


@pytest.mark.parametrize(
    ("kind", "encoder", "expected_hw"),
    [
        ("patchgan", "resnet18", (6, 6)),
        ("unetplusplus", "resnet18", (64, 64)),
        ("unetplusplus", TINY_ENCODER, (64, 64)),
    ],
)
def test_discriminator_shapes_and_no_batchnorm(kind, encoder, expected_hw):
    disc = define_discriminator(kind, in_channels=2, width=8, n_layers=3, encoder=encoder)
    assert count_batchnorm(disc) == 0
    assert disc(torch.randn(2, 2, 64, 64)).shape == (2, 1, *expected_hw)


def test_patchgan_is_70x70_at_256():
    disc = define_discriminator("patchgan", in_channels=1, width=4)
    assert disc(torch.randn(1, 1, 256, 256)).shape == (1, 1, 30, 30)


def test_unknown_discriminator_lists_choices():
    with pytest.raises(KeyError, match="patchgan, unetplusplus"):
        define_discriminator("resnet", in_channels=2)


def test_init_weights_is_reference_normal():
    disc = define_discriminator("patchgan", in_channels=2, width=32)
    weights = torch.cat([m.weight.flatten() for m in disc.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(weights.std().item() - 0.02) < 0.002


def test_no_download_with_encoder_weights_none(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(smp.encoders, "hf_hub_download", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    define_generator("resnet18", (16, 8, 8, 8, 8), encoder_weights=None)
    create_segmenter("unet", "resnet18", encoder_weights=None)


def test_imagenet_offline_fails_in_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")

    monkeypatch.setattr(smp.encoders, "hf_hub_download", offline)
    with pytest.raises(RuntimeError, match="local .pth") as info:
        define_generator("resnet18", (16, 8, 8, 8, 8), encoder_weights="imagenet")
    assert "\n" not in str(info.value)


def test_local_rgb_encoder_weights_load_into_one_channel_generator(tmp_path):
    rgb = smp.encoders.get_encoder("resnet18", in_channels=3, weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(rgb.state_dict(), path)
    gen = define_generator("resnet18", (16, 8, 8, 8, 8), encoder_weights=str(path))
    assert torch.equal(gen.encoder.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)
    # smp folds the RGB stem into one channel by summing over colours.
    assert torch.allclose(gen.encoder.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        define_generator("resnet18", (16, 8, 8, 8, 8), encoder_weights=str(tmp_path / "missing.pth"))


def test_image_pool_mixes_history():
    pool = ImagePool(3, seed=0)
    first = pool.query(torch.arange(3.0).view(3, 1, 1, 1))
    assert first.flatten().tolist() == [0.0, 1.0, 2.0] and len(pool) == 3
    seen = set()
    for step in range(1, 8):
        batch = torch.full((3, 1, 1, 1), 10.0 * step)
        out = pool.query(batch)
        assert out.shape == batch.shape and len(pool) == 3
        seen |= {v for v in out.flatten().tolist() if v != 10.0 * step}
    assert seen, "a full pool should sometimes return a stored image"
    assert torch.equal(ImagePool(0).query(batch), batch)


# --- losses ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lsgan", "vanilla"])
def test_gan_loss_prefers_right_targets(mode):
    loss = GANLoss(mode)
    high, low = torch.full((2, 1, 6, 6), 0.9), torch.full((2, 1, 6, 6), 0.1)
    assert loss(high, True) < loss(low, True)
    assert loss(low, False) < loss(high, False)
    if mode == "lsgan":
        assert loss(torch.ones(4), True).item() == 0.0
    with pytest.raises(KeyError, match="lsgan, vanilla"):
        GANLoss("wgan")


def test_segmentation_loss_lower_for_good_prediction():
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:10, 4:10] = 1
    good = torch.stack([(1 - target) * 4.0 - 2.0, target * 4.0 - 2.0], 1)
    loss = SegmentationLoss(focal_alpha=0.25)
    assert loss(good, target) < loss(-good, target)
    assert loss(good, target[:, None]).item() == pytest.approx(loss(good, target).item())


# --- GAN models --------------------------------------------------------------------------------------------


def test_pix2pix_fits_one_pair():
    torch.manual_seed(0)
    model = Pix2PixModel(**TINY, lr_g=2e-3)
    mask, image = disk_pair()
    history = [model.train_step({"A": mask, "B": image}) for _ in range(40)]
    assert set(history[0]) == set(Pix2PixModel.loss_names)
    assert all(math.isfinite(v) for h in history for v in h.values())
    first = history[0]["loss_G_L1"]
    last = sum(h["loss_G_L1"] for h in history[-5:]) / 5
    assert last < 0.3 * first, (first, last)
    out = model.generate(mask)
    assert out.shape == image.shape and out.dtype == torch.float32 and out.abs().max() <= 1


def test_pix2pix_noise_input_makes_many_images_from_one_mask(tmp_path):
    from tgan_ray.inference import load_generator

    torch.manual_seed(0)
    model = Pix2PixModel(**TINY, noise_channels=1)
    mask, image = disk_pair()
    # D judges (mask, image) pairs only: the noise maps never reach it.
    assert next(model.nets["D"].parameters()).shape[1] == 2
    losses = model.train_step({"A": mask.repeat(2, 1, 1, 1), "B": image.repeat(2, 1, 1, 1)})
    assert all(math.isfinite(v) for v in losses.values())
    model.nets["G"].eval()
    with torch.no_grad():
        first, second = model.nets["G"](mask), model.nets["G"](mask)
    assert first.shape == image.shape and not torch.equal(first, second)

    # The exported generator is rebuilt with its noise input from the config it carries.
    cfg = {"generator_encoder": TINY["encoder"], "generator_decoder_channels": [16, 8, 8, 8, 8]}
    torch.save(
        {
            "kind": "pix2pix",
            "config": {**cfg, "noise_channels": 1},
            "generator": model.nets["G"].state_dict(),
        },
        tmp_path / "g.pt",
    )
    loaded = load_generator(tmp_path / "g.pt", device="cpu")
    torch.manual_seed(5)
    a = loaded(mask)
    torch.manual_seed(5)
    assert torch.allclose(a, model.nets["G"](mask), atol=1e-6)


def test_run_generator_output_does_not_depend_on_batching():
    """A pair regenerated alone (tgan generate completing lost pairs) is bit-identical to the first run."""
    import numpy as np

    from tgan_ray.inference import run_generator
    from tgan_ray.models.networks import define_generator

    torch.manual_seed(0)
    net = define_generator(TINY["encoder"], (16, 8, 8, 8, 8), noise_channels=1).eval()
    masks = (np.random.default_rng(0).random((7, 64, 64)) > 0.8).astype(np.float32)
    seeds = np.arange(100, 107)
    together = run_generator(net, masks, 4, seeds)
    for k in (0, 3, 6):  # alone, at the end of a batch, in the padded last batch
        alone = run_generator(net, masks[k : k + 1], 4, seeds[k : k + 1])
        np.testing.assert_array_equal(alone[0], together[k])


def test_pix2pix_bf16_autocast_step():
    torch.manual_seed(0)
    model = Pix2PixModel(**TINY, discriminator="unetplusplus")
    model.autocast = functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    mask, image = disk_pair()
    losses = model.train_step({"A": mask.repeat(2, 1, 1, 1), "B": image.repeat(2, 1, 1, 1)})
    assert all(math.isfinite(v) for v in losses.values())
    with pytest.raises(KeyError, match="'B'"):
        model.train_step({"A": mask})


def test_cyclegan_step_runs_and_fills_pools():
    torch.manual_seed(0)
    model = CycleGANModel(**TINY, pool_size=4, seed=0)
    params_before = [p.detach().clone() for p in model.nets["D_B"].parameters()]
    for seed in range(3):
        (a, _), (_, b) = disk_pair(seed=seed), disk_pair(seed=seed + 10)
        losses = model.train_step({"A": a.repeat(2, 1, 1, 1), "B": b.repeat(2, 1, 1, 1)})
        assert set(losses) == set(CycleGANModel.loss_names)
        assert all(math.isfinite(v) for v in losses.values())
    assert len(model.pool_A) == len(model.pool_B) == 4
    assert any(
        not torch.equal(p0, p) for p0, p in zip(params_before, model.nets["D_B"].parameters(), strict=True)
    )
    assert model.generate(a).shape == a.shape


def test_lr_schedule_constant_then_linear_to_zero():
    assert [round(linear_decay_factor(e, 3, 2), 4) for e in range(7)] == [1, 1, 1, 0.6667, 0.3333, 0, 0]
    model = Pix2PixModel(**TINY, lr_g=1e-3, lr_d=2e-3)
    opt_g, opt_d = model.optimizers()
    sched_g, sched_d = model.schedulers(epochs=3, epochs_decay=2)
    lrs = []
    for _ in range(6):
        lrs.append((opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]))
        opt_g.step(), opt_d.step()
        sched_g.step(), sched_d.step()
    assert [g for g, _ in lrs] == pytest.approx([1e-3, 1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3, 0.0])
    assert [d for _, d in lrs] == pytest.approx([2e-3, 2e-3, 2e-3, 4e-3 / 3, 2e-3 / 3, 0.0])
    assert model.optimizers() == (opt_g, opt_d)


def test_create_gan_registry():
    cfg = Pix2PixConfig(generator_encoder="resnet18", generator_decoder_channels=[16, 8, 8, 8, 8])
    model = create_gan("pix2pix", cfg, discriminator_width=8)
    assert isinstance(model, Pix2PixModel) and model.lambda_l1 == cfg.lambda_l1
    with pytest.raises(KeyError, match="pix2pix, cyclegan"):
        create_gan("stylegan", cfg)
    with pytest.raises(TypeError, match="cyclegan config section"):
        create_gan("cyclegan", cfg)
    cyc = create_gan("cyclegan", CycleGANConfig(generator_encoder="resnet18", pool_size=7), **TINY)
    assert cyc.pool_A.pool_size == 7


# --- segmenter ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["unetplusplus", "unet", "deeplabv3plus"])
def test_create_segmenter_shapes(arch):
    model = create_segmenter(arch, "resnet18")
    logits = model(torch.randn(2, 1, 64, 64))
    assert logits.shape == (2, 2, 64, 64)
    proba = predict_proba(model.eval(), torch.randn(2, 1, 64, 64))
    assert proba.shape == (2, 64, 64) and proba.min() >= 0 and proba.max() <= 1


def test_unknown_segmenter_lists_choices():
    with pytest.raises(KeyError, match="unetplusplus, unet, deeplabv3plus"):
        create_segmenter("segformer")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_segmenter_checkpoint_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    model = create_segmenter("unetplusplus", "resnet18", decoder_channels=(32, 16, 16, 8, 8)).eval()
    meta = {
        "threshold": 0.5,
        "pixel_size_nm": None,
        "classes": ["background", "particle"],
        "cfg": {"lr": 3e-4},
    }
    path = save_segmenter(model, tmp_path / "sub" / f"npssegnet{suffix}", meta)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
    loaded, loaded_meta = load_segmenter(path)
    assert loaded_meta == meta and not loaded.training
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    if suffix == ".pt":
        ckpt = torch.load(path, weights_only=True)  # plain data only: no pickled objects
        assert ckpt["arch"] == "unetplusplus" and ckpt["encoder"] == "resnet18" and ckpt["classes"] == 2


def test_segmenter_checkpoint_errors(tmp_path):
    model = create_segmenter("unet", "resnet18")
    with pytest.raises(TypeError, match=r"meta\['where'\]"):
        save_segmenter(model, tmp_path / "m.pt", {"where": tmp_path})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_segmenter(tmp_path / "nope.pt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_segmenter(junk)


# --- DDP safety --------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world_size: int, init_file: str) -> None:
    """Train each GAN for 2 steps with every net wrapped in DDP separately, as the Ray Train loop does."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        for build in (
            lambda: Pix2PixModel(**TINY),
            lambda: Pix2PixModel(**TINY, discriminator="unetplusplus"),
            lambda: CycleGANModel(**TINY, pool_size=2, seed=rank),
        ):
            torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
            model = build()
            for name in list(model.nets):
                model.nets[name] = DistributedDataParallel(model.nets[name])
            for step in range(2):
                mask, image = disk_pair(seed=10 * rank + step)  # different data on each rank
                model.train_step({"A": mask.repeat(2, 1, 1, 1), "B": image.repeat(2, 1, 1, 1)})
            # Averaged gradients keep every rank's weights identical.
            for name, net in model.nets.items():
                checksum = torch.stack([p.detach().double().sum() for p in net.parameters()])
                gathered = [torch.empty_like(checksum) for _ in range(world_size)]
                dist.all_gather(gathered, checksum)
                assert torch.equal(gathered[0], gathered[1]), f"{type(model).__name__}.{name} diverged"
            fresh = build()
            fresh.load_unwrapped_state_dict(model.unwrapped_state_dict())
    finally:
        dist.destroy_process_group()


@pytest.mark.integration  # a gloo process group
def test_gans_train_under_ddp_with_each_net_wrapped(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "dist_init")), nprocs=2, join=True)
