"""Load test of the segmentation endpoint, loopback only, bounded in requests and in time.

Starts the Serve app on local Ray (unless --endpoint names one already running on this machine), sends synthetic
frames from 32 concurrent clients, and reports p50/p99 latency, throughput and errors as JSON.

    python bench/serve_load.py --smoke-test                        # tiny: 40 requests, seconds
    python bench/serve_load.py --model runs/r1/round1/npssegnet.pt # a trained NPsSegNet, 1024 px frames
    python bench/serve_load.py --arch paper --gpus-per-replica 1   # paper net (random weights) on a GPU replica
    python bench/serve_load.py --endpoint http://127.0.0.1:8000    # a service started with `tgan serve`
    python bench/serve_load.py --overload --sizes 512,2048         # load shedding at twice the capacity

``--overload``: for each frame size, measure the capacity (closed loop, one full batch in flight), then send an
open-loop stream at twice that rate. It passes when every request gets 200 or 503 (with Retry-After) within
``--request-timeout``, none times out at the client, and the replica answers /v1/healthz and one last frame.
The server runs with ``max_ongoing_requests = --max-batch-size`` and ``max_queued_requests = --max-queued``.

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
    replicas: int,
    cpus: float,
    gpus: float,
    max_batch_size: int,
    batch_wait_s: float,
    concurrency: int,
    shed: dict | None = None,
):
    """The config of a local endpoint on a free loopback port, with fixed replicas (no autoscaling).

    ``shed`` (``max_queued_requests``, ``request_timeout_s``) is the overload test's: each replica then holds one
    batch, and the proxy's bounded queue refuses the rest with 503.
    """
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
                "max_ongoing_requests": max_batch_size if shed else max(concurrency, max_batch_size),
                **(shed or {}),
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
            done = time.perf_counter()
            results.append({"latency": done - t0, "done": done, "ok": ok, "body": body})

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
        "steady_rps": _steady_rate([r["done"] for r in good], skip=min(concurrency, len(good) // 2)),
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


def _steady_rate(done: list[float], skip: int) -> float | None:
    """Completions per second after the first ``skip`` (the pipeline filling), from completion times."""
    done = sorted(done)[max(skip - 1, 0) :]
    return round((len(done) - 1) / (done[-1] - done[0]), 3) if len(done) > 1 and done[-1] > done[0] else None


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1e3, q)), 1) if values else None


async def run_overload(url: str, frames: list[bytes], rate: float, count: int, client_timeout: float) -> list:
    """Open loop: ``count`` requests at ``rate`` per second, whatever the answers; one dict per request."""
    import httpx

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    results: list[dict] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        t0 = time.perf_counter()
        try:
            r = await client.post(f"{url}/v1/segment", files={"file": (f"f{i}.png", frames[i % len(frames)])})
            item = {"status": r.status_code, "retry_after": r.headers.get("retry-after")}
            if r.status_code != 200:
                item["detail"] = r.text[:160]
        except httpx.TimeoutException:
            item = {"status": "client timeout"}
        except Exception as exc:  # noqa: BLE001 - every failure is counted
            item = {"status": f"{type(exc).__name__}: {exc}"[:160]}
        results.append({**item, "latency": time.perf_counter() - t0})

    async with httpx.AsyncClient(timeout=client_timeout, limits=limits) as client:
        start, tasks = time.perf_counter(), []
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, i)))
        await asyncio.gather(*tasks)
    return results


def overload_report(url: str, frames: list[bytes], args) -> dict:
    """Capacity, then twice the capacity, then the replica's health, for one frame size."""
    import httpx

    # Closed loop with the whole bound in flight (replica + queue): batches stay full, and nothing is refused.
    backlog = args.max_batch_size + args.max_queued
    closed = asyncio.run(run_load(url, frames, args.capacity_requests, backlog, args.time_limit))
    capacity = closed["steady_rps"] or closed["throughput_rps"] or 0.0
    if not capacity:
        return {"capacity": closed, "passed": False, "why": "no request succeeded while measuring capacity"}
    # Twice the capacity for overload_s, and long enough that the excess (capacity x time) overflows the bound
    # even if the capacity was underestimated twofold on a shared machine.
    count = args.overload_requests or max(round(2 * capacity * args.overload_s), 6 * backlog)
    deadline = args.request_timeout
    results = asyncio.run(run_overload(url, frames, 2 * capacity, count, deadline * 1.1 + 30))
    codes: dict[str, int] = {}
    for r in results:
        codes[str(r["status"])] = codes.get(str(r["status"]), 0) + 1
    ok = [r["latency"] for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 503]
    health = httpx.get(f"{url}/v1/healthz", timeout=60).status_code
    final = httpx.post(f"{url}/v1/segment", files={"file": ("last.png", frames[0])}, timeout=deadline + 30)
    report = {
        "capacity_rps": capacity,
        "at_capacity_latency_ms": closed["latency_ms"],
        "offered_rps": round(2 * capacity, 3),
        "requests": len(results),
        "status_counts": codes,
        "share_503": round(len(refused) / len(results), 3),
        "client_timeouts": codes.get("client timeout", 0),
        "over_deadline": sum(r["latency"] > deadline for r in results),
        "latency_200_ms": {"p50": _pct(ok, 50), "p99": _pct(ok, 99), "max": _pct(ok, 100)},
        "latency_503_ms": {
            "p50": _pct([r["latency"] for r in refused], 50),
            "p99": _pct([r["latency"] for r in refused], 99),
        },
        "all_503_have_retry_after": all(r["retry_after"] for r in refused),
        "other_answers": [r.get("detail", r["status"]) for r in results if r["status"] not in (200, 503)][:3],
        "healthz_after": health,
        "final_request": final.status_code,
    }
    report["passed"] = bool(
        set(codes) <= {"200", "503"}
        and report["over_deadline"] == 0
        and report["all_503_have_retry_after"]
        and health == 200
        and final.status_code == 200
    )
    return report


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
    p.add_argument("--overload", action="store_true", help="load shedding at twice the measured capacity")
    p.add_argument("--sizes", default="512,2048", help="--overload: frame sides, px, comma-separated")
    p.add_argument("--max-queued", type=int, default=None, help="--overload: max_queued_requests (2 batches)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="--overload: serve.request_timeout_s")
    p.add_argument("--capacity-requests", type=int, default=None, help="--overload: requests (3 batches)")
    p.add_argument("--overload-s", type=float, default=60.0, help="--overload: seconds at twice the capacity")
    p.add_argument(
        "--overload-requests", type=int, default=None, help="--overload: requests (default: from -s)"
    )
    args = p.parse_args(argv)
    if args.smoke_test:
        args.requests, args.concurrency, args.size, args.frames = 40, 8, 128, 4
    args.max_queued = args.max_queued or 2 * args.max_batch_size
    args.capacity_requests = args.capacity_requests or 3 * args.max_batch_size
    sizes = [int(v) for v in args.sizes.split(",")] if args.overload else [args.size]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    frames = {size: make_frames(args.frames, size) for size in sizes}
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
            {"max_queued_requests": args.max_queued, "request_timeout_s": args.request_timeout}
            if args.overload
            else None,
        )
        import ray

        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        url = serve_model(model, cfg, blocking=False, name="bench")
        started = cfg
    try:
        import httpx

        info = httpx.get(f"{url}/v1/model", timeout=60).json()
        for frame in frames[sizes[0]][:2]:  # warm-up: first calls pay for lazy initialisation
            r = httpx.post(f"{url}/v1/segment", files={"file": ("warm.png", frame)}, timeout=300)
            r.raise_for_status()
        if args.overload:
            per_size = {f"{n}px": overload_report(url, frames[n], args) for n in sizes}
            report = {"overload": per_size, "passed": all(r["passed"] for r in per_size.values())}
        else:
            report = asyncio.run(
                run_load(url, frames[args.size], args.requests, args.concurrency, args.time_limit)
            )
    finally:
        if started is not None:
            from ray import serve

            serve.shutdown()
        tmp.cleanup()
    report = {
        "setup": {
            "frame_px": sizes if args.overload else args.size,
            **(
                {"max_queued_requests": args.max_queued, "request_timeout_s": args.request_timeout}
                if args.overload
                else {"concurrency": args.concurrency, "requests": args.requests}
            ),
            "model": {k: info.get(k) for k in ("name", "arch", "tile_size", "resize_mode", "device")},
            "replicas": args.replicas,
            "max_batch_size": args.max_batch_size,
            "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "date": time.strftime("%Y-%m-%d"),
        },
        **report,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.overload:
        return 0 if report["passed"] else 1
    return 0 if report["errors"] == 0 and report["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
