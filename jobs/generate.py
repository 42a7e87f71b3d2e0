"""Job: a virtual labelled dataset from a finished run, sharded over the cluster with Ray Data.

The same work as ``tgan generate``: N random masks from the run's morphology prior, then pix2pix and CycleGAN in an
actor pool (one GPU each when there are GPUs), written as (image, mask) PNG pairs plus a Parquet manifest::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/generate.py --run /data/runs/run42 --n 100000 --out s3://lab/virtual/run42

Re-running with the same ``--out`` completes what is missing.
"""

from __future__ import annotations

import argparse

import _common


def build_parser() -> argparse.ArgumentParser:
    parser = _common.job_parser(__doc__)
    parser.add_argument(
        "--run", required=True, help="A finished pipeline run folder (its prior and GAN checkpoints)."
    )
    parser.add_argument("--n", type=int, default=1000, help="Image/mask pairs to generate (default: 1000).")
    parser.add_argument("--out", required=True, help="Output folder or s3://bucket/prefix.")
    parser.add_argument("--seed", type=int, help="Sampling seed (default: data.seed); a re-run must keep it.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    n = min(args.n, 16) if args.smoke_test else args.n
    if n < 1:
        _common.fail(f"--n must be >= 1, got {args.n}")
    cfg = _common.load_job_config(args)

    from tgan_ray.generate import generate_from_run

    print(f"done: {generate_from_run(args.run, n, args.out, cfg, seed=args.seed)}")


if __name__ == "__main__":
    main()
