"""Load test of the segmentation endpoint, loopback only, bounded in requests and in time.

Starts the Serve app on local Ray (unless --endpoint names one already running on this machine), sends synthetic
frames from 32 concurrent clients, and reports p50/p99 latency, throughput and errors as JSON.

    python bench/serve_load.py --smoke-test                        # tiny: 40 requests, seconds
    python bench/serve_load.py --model runs/r1/round1/npssegnet.pt # a trained NPsSegNet, 1024 px frames
    python bench/serve_load.py --arch paper --gpus-per-replica 1   # paper net (random weights) on a GPU replica
    python bench/serve_load.py --endpoint http://127.0.0.1:8000    # a service started with `tgan serve`

Models without --model: ``tiny`` trains a 64 px toy NPsSegNet for a few seconds (real masks and particle tables,
CPU-friendly); ``paper`` is UNet++/ResNet34 on 512 px tiles with random weights (the paper's compute, but its
particle tables are not meaningful: use --model for that).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

SYNTH = {"pixel_size_nm": 0.5, "mean_diameter_nm": 5.0, "density": 40, "snr": 10.0}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.round(image * 65535).astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_frames(n: int, size: int) -> list[bytes]:
    """``n`` synthetic HAADF frames of ``size`` px as 16-bit PNGs."""
    from tgan_ray.data.synthetic import SynthConfig, make_image

    return [_png(make_image(SynthConfig(size=size, **SYNTH), rng=1000 + i)[0]) for i in range(n)]


def build_model(arch: str, folder: Path) -> Path:
    """A checkpoint to serve: the tiny trained toy net, or the paper architecture with random weights."""
    import torch

    from tgan_ray.config import DataConfig
    from tgan_ray.data.synthetic import SynthConfig, make_image
    from tgan_ray.io import normalize_intensity
    from tgan_ray.models.npssegnet import create_segmenter, save_segmenter

    torch.manual_seed(0)
    if arch == "paper":
        net = create_segmenter("unetplusplus", "resnet34")
        data = DataConfig(image_size=512, resize_mode="resize")
    else:
        net = create_segmenter("unetplusplus", "resnet18", encoder_depth=3, decoder_channels=(16, 8, 8))
        data = DataConfig(image_size=64, resize_mode="tile")
        torch.set_num_threads(1)  # a 64 px net: more threads only spin
        pairs = [make_image(SynthConfig(size=64, **SYNTH), rng=i)[:2] for i in range(32)]
        x = torch.tensor(np.stack([normalize_intensity(im) for im, _ in pairs]))[:, None]
        y = torch.tensor(np.stack([m for _, m in pairs])).long()
        opt = torch.optim.Adam(net.parameters(), 3e-3)
        for _ in range(50):
            idx = torch.randint(0, len(x), (8,))
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save_segmenter(
        net.eval(), folder / f"{arch}-npssegnet.pt", meta={"data": data.model_dump(mode="json")}
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_config(
    replicas: int, cpus: float, gpus: float, max_batch_size: int, batch_wait_s: float, concurrency: int
):
    """The config of a local endpoint on a free loopback port, with fixed replicas (no autoscaling)."""
    from tgan_ray.config import Config

    return Config.model_validate(
        {
            "serve": {
                "port": _free_port(),
                "min_replicas": replicas,
                "max_replicas": replicas,
                "cpus_per_replica": cpus,
                "gpus_per_replica": gpus,
                "max_batch_size": max_batch_size,
                "batch_wait_timeout_s": batch_wait_s,
                "max_ongoing_requests": max(concurrency, max_batch_size),
            }
        }
    )


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"error: --endpoint {url}: this load test only targets loopback (127.0.0.1 / localhost)")


async def run_load(
    url: str, frames: list[bytes], requests: int, concurrency: int, time_limit_s: float
) -> dict:
    """Send ``requests`` frames from ``concurrency`` clients; stop starting new ones after ``time_limit_s``."""
    import httpx

    results: list[dict] = []
    next_index = 0
    deadline = time.perf_counter() + time_limit_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    f"{url}/v1/segment", files={"file": (f"f{i}.png", frames[i % len(frames)])}
                )
                ok = r.status_code == 200
                body = r.json() if ok else {"detail": r.text[:200]}
            except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the test
                ok, body = False, {"detail": f"{type(exc).__name__}: {exc}"}
            results.append({"latency": time.perf_counter() - t0, "ok": ok, "body": body})

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=max(60.0, time_limit_s), limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    lat = np.array([r["latency"] for r in good]) * 1e3

    def mean(values: list) -> float | None:
        return round(float(np.mean(values)), 2) if values else None

    def med(key: str) -> float | None:
        vals = [r["body"]["timing_ms"][key] for r in good]
        return round(float(np.median(vals)), 2) if vals else None

    return {
        "requests_sent": len(results),
        "ok": len(good),
        "errors": len(results) - len(good),
        "first_errors": [r["body"].get("detail") for r in results if not r["ok"]][:3],
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(good) / wall, 2) if wall > 0 else None,
        "latency_ms": {
            "p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p90": round(float(np.percentile(lat, 90)), 1) if len(lat) else None,
            "p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "mean": round(float(lat.mean()), 1) if len(lat) else None,
        },
        "server_median_ms": {k: med(k) for k in ("decode", "inference", "analysis", "total")},
        "mean_batch_size": mean([r["body"]["batch_size"] for r in good]),
        "particles_per_frame": mean([len(r["body"]["particles"]) for r in good]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=500, help="requests to send (at most)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    p.add_argument("--size", type=int, default=1024, help="frame side, px")
    p.add_argument("--frames", type=int, default=8, help="distinct synthetic frames, sent in turn")
    p.add_argument("--time-limit", type=float, default=540.0, help="stop starting requests after this many s")
    p.add_argument("--endpoint", help="an already running service on this machine (default: start one)")
    p.add_argument("--model", help="checkpoint path / s3:// / models:/ to serve (default: see --arch)")
    p.add_argument(
        "--arch", choices=["tiny", "paper"], default="tiny", help="model built when --model is absent"
    )
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-s", type=float, default=0.01)
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument(
        "--gpus-per-replica", type=float, default=None, help="default: 1 if CUDA is available, else 0"
    )
    p.add_argument("--out", help="also write the report to this JSON file")
    p.add_argument("--smoke-test", action="store_true", help="40 requests, 8 concurrent, 128 px frames")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.requests, args.concurrency, args.size, args.frames = 40, 8, 128, 4
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    frames = make_frames(args.frames, args.size)
    started = None
    tmp = tempfile.TemporaryDirectory(prefix="tgan-bench-")
    if args.endpoint:
        _check_loopback(args.endpoint)
        url, model = args.endpoint.rstrip("/"), None
    else:
        import torch

        from tgan_ray.serve import serve_model

        gpus = (
            args.gpus_per_replica if args.gpus_per_replica is not None else float(torch.cuda.is_available())
        )
        model = args.model or str(build_model(args.arch, Path(tmp.name)))
        cfg = service_config(
            args.replicas,
            args.cpus_per_replica,
            gpus,
            args.max_batch_size,
            args.batch_wait_s,
            args.concurrency,
        )
        import ray

        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        url = serve_model(model, cfg, blocking=False, name="bench")
        started = cfg
    try:
        import httpx

        info = httpx.get(f"{url}/v1/model", timeout=60).json()
        for frame in frames[:2]:  # warm-up: first calls pay for lazy initialisation
            r = httpx.post(f"{url}/v1/segment", files={"file": ("warm.png", frame)}, timeout=300)
            r.raise_for_status()
        report = asyncio.run(run_load(url, frames, args.requests, args.concurrency, args.time_limit))
    finally:
        if started is not None:
            from ray import serve

            serve.shutdown()
        tmp.cleanup()
    report = {
        "setup": {
            "frame_px": args.size,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "model": {k: info.get(k) for k in ("name", "arch", "tile_size", "resize_mode", "device")},
            "replicas": args.replicas,
            "max_batch_size": args.max_batch_size,
            "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        },
        **report,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["errors"] == 0 and report["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
