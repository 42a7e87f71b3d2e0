"""Training throughput of each stage through Ray Train vs a plain PyTorch loop of the same model, batch, precision.

    python bench/train_throughput.py                       # 512 px, paper models, on whatever device there is
    python bench/train_throughput.py --size 128 --steps 10 --smoke-test

Both sides train the same network on the same in-memory data for the same number of steps; the Ray side is
timed per epoch inside the worker (``train/images_per_s``), after a warm-up epoch, so start-up is not counted.
``bench/gpu_suite.py`` reuses ``plain_loop`` and ``ray_loop``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def random_data(n: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random images and masks: enough for a timed epoch of ``n / batch`` steps on the Ray side."""
    rng = np.random.default_rng(seed)
    return {
        "images": rng.random((n, size, size), dtype=np.float32),
        "masks": (rng.random((n, size, size)) > 0.8).astype(np.uint8),
    }


def plain_loop(
    stage: str, cfg, data: dict, steps: int, device: torch.device, bf16: bool, compile: bool = False
) -> float:
    """images/s of the bare PyTorch training step, no Ray (``compile``: the networks through torch.compile)."""
    from tgan_ray.models import SegmentationLoss, create_gan, create_segmenter

    batch = getattr(cfg, stage).batch_size
    cl = device.type == "cuda"
    amp = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if bf16
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    x = torch.from_numpy(data["images"][:batch])[:, None].to(device)
    m = torch.from_numpy(data["masks"][:batch]).to(device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if stage == "segmenter":
        s = cfg.segmenter
        extra = {"decoder_channels": s.decoder_channels} if s.decoder_channels else {}  # the Ray stage's net
        net = create_segmenter(s.arch, s.encoder, **extra).to(device)
        net = net.to(memory_format=torch.channels_last) if cl else net
        opt_net = torch.compile(net) if compile else net
        opt = torch.optim.AdamW(net.parameters(), lr=s.lr)
        loss_fn = SegmentationLoss()

        def step():
            with amp():
                logits = opt_net(x)
            loss = loss_fn(logits.float(), m.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model = create_gan(stage, getattr(cfg, stage))
        for k in list(model.nets.keys()):
            net = model.nets[k].to(device)
            net = net.to(memory_format=torch.channels_last) if cl else net
            model.nets[k] = torch.compile(net) if compile else net
        model.autocast = amp
        a = (m[:, None].float() * 2 - 1) if stage == "pix2pix" else x * 2 - 1
        batch_dict = {"A": a, "B": x * 2 - 1}

        def step():
            model.train_step(batch_dict)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def ray_loop(stage: str, cfg, data: dict, steps: int, tmp: str) -> float:
    """images/s inside a Ray Train worker: the second of two epochs (the first warms up), as the worker
    reports it with the stage's checkpoint. No MLflow needed."""
    from tgan_ray.train import train_stage

    n_val = 4
    if stage == "cyclegan":
        arrays = {
            "train_a": data["images"],
            "train_b": data["images"][::-1].copy(),
            "val_a": data["images"][:n_val],
            "val_b": data["images"][:n_val],
        }
    elif stage == "pix2pix":
        arrays = {
            "train_images": data["images"],
            "train_masks": data["masks"],
            "val_masks": data["masks"][:n_val].astype(np.float32),
            "val_images": data["images"][:n_val],
        }
    else:
        arrays = {
            "train_images": data["images"],
            "train_masks": data["masks"],
            "val_images": data["images"][:n_val],
            "val_masks": data["masks"][:n_val],
        }
    sc = getattr(cfg, stage)
    epochs = {"epochs": 2, "val_every": 2} if stage == "segmenter" else {"epochs": 2, "epochs_decay": 0}
    if stage != "segmenter":
        epochs.update(eval_every=2, eval_images=min(sc.eval_images, n_val))
    sc = sc.model_copy(update={"steps_per_epoch": steps, **epochs})
    result = train_stage(stage, sc, arrays, cfg, tmp, None, name=f"bench-{stage}-{time.time_ns()}")
    return float(result.metrics["train/images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="segmenter,pix2pix,cyclegan", help="Comma-separated stages.")
    ap.add_argument("--size", type=int, default=512, help="Image side, px.")
    ap.add_argument("--steps", type=int, default=20, help="Steps per timed epoch.")
    ap.add_argument("--preset", default="paper", help="Config preset for models and batch sizes.")
    ap.add_argument("--batch", type=int, default=None, help="Batch size override for every stage.")
    ap.add_argument(
        "--smoke-test", action="store_true", help="Tiny models and images: checks the script runs."
    )
    args = ap.parse_args()

    import tempfile

    from tgan_ray.config import load_config
    from tgan_ray.runtime import init_ray, worker_cpus

    overrides = {"data.image_size": args.size, "tracking.enabled": False, "ray.num_workers": 1}
    if args.smoke_test:
        args.preset, args.size, args.steps = "quick", 64, 3
        overrides["data.image_size"] = 64
    if args.batch:
        for s in args.stages.split(","):
            overrides[f"{s}.batch_size"] = args.batch
    cfg = load_config(args.preset, overrides=overrides)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    init_ray(cfg.ray)
    if not cuda:  # the plain loop runs as many threads as a Train worker
        torch.set_num_threads(max(1, int(worker_cpus(cfg.ray))))
    batches = [getattr(cfg, s).batch_size for s in args.stages.split(",")]
    data = random_data(max(64, max(batches) * args.steps), args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            plain = plain_loop(stage, cfg, data, args.steps, device, bf16=cuda)
            ray_ips = ray_loop(stage, cfg, data, args.steps, tmp)
            rows.append((stage, getattr(cfg, stage).batch_size, plain, ray_ips))
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    print(
        f"\ndevice: {name}; {args.size}x{args.size}; precision: {'bf16 + channels_last' if cuda else 'fp32'}"
    )
    print("| stage | batch | plain PyTorch (img/s) | Ray Train, 1 worker (img/s) | Ray / plain |")
    print("|---|---|---|---|---|")
    for stage, batch, plain, ray_ips in rows:
        print(f"| {stage} | {batch} | {plain:.2f} | {ray_ips:.2f} | {ray_ips / plain:.2f} |")


if __name__ == "__main__":
    main()
