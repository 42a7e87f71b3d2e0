"""Ray Train's fixed cost per stage: a TorchTrainer whose loop only reports, timed under each health-check interval.

    python bench/train_overhead.py --intervals 2.0,0.5 --fits 3

Every stage of a run is one ``TorchTrainer.fit``: a controller actor, a placement group, worker processes that
import torch, and a controller that polls the workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (Ray's default
2 s; ``tgan_ray.runtime`` sets 0.5 s unless the environment says otherwise). Each interval runs in its own
process, since the controller reads the variable when it starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

FITS = """
import sys, time
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

def report_once(config):
    import ray.train
    ray.train.report({{"score": 1.0}})

ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False)
for i in range({fits}):
    t = time.perf_counter()
    TorchTrainer(
        report_once,
        scaling_config=ScalingConfig(num_workers={workers}, resources_per_worker={{"CPU": 0.5}}),
        run_config=RunConfig(name=f"fit{{i}}", storage_path={storage!r}),
    ).fit()
    print(f"{{time.perf_counter() - t:.2f}}", flush=True)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--intervals", default="2.0,0.5", help="Comma-separated health-check intervals, s.")
    p.add_argument("--fits", type=int, default=3, help="Fits per interval (the first one also warms Ray up).")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers per fit.")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance.")
    p.add_argument("--storage", default="/tmp/tgan-train-overhead", help="Ray Train storage path.")
    args = p.parse_args()

    code = FITS.format(cpus=args.cpus, fits=args.fits, workers=args.workers, storage=args.storage)
    print(
        "| health-check interval | seconds per fit (sorted) | median | wall time, Ray start included |\n|---|---|---|---|"
    )
    for interval in args.intervals.split(","):
        env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": interval, "RAY_USAGE_STATS_ENABLED": "0"}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"fits at interval {interval} failed:\n{done.stderr[-2000:]}")
        seconds = sorted(float(s) for s in done.stdout.split())
        each = ", ".join(f"{s:.1f}" for s in seconds)
        print(
            f"| {interval} s | {each} | {seconds[len(seconds) // 2]:.1f} | ({time.perf_counter() - start:.0f} s in all)"
        )


if __name__ == "__main__":
    main()
