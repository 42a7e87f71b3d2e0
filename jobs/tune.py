"""Job: a Ray Tune campaign over one GAN stage's hyperparameters, its checkpoints ranked by FID/KID.

The same work as ``tgan tune``. Submit it (overnight campaigns: add ``--no-wait`` and follow with
``ray job logs --follow <id>``)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/tune.py --stage pix2pix --images s3://lab/stacks/run42/ --out /data/tune/p2p \\
        --num-samples 32 --scheduler asha

One MLflow parent run per campaign with a child per trial; the best checkpoint is registered as a model version.
"""

from __future__ import annotations

import argparse

import _common


def build_parser() -> argparse.ArgumentParser:
    parser = _common.job_parser(__doc__)
    parser.add_argument("--stage", required=True, choices=["pix2pix", "cyclegan"], help="GAN stage to tune.")
    parser.add_argument("--images", required=True, help="Stack: a folder, a glob or s3://bucket/prefix.")
    parser.add_argument("--out", required=True, help="Campaign folder (on the job's node or s3://).")
    parser.add_argument(
        "--num-samples", type=int, default=8, help="Trials to run (default: 8; 2 with --smoke-test)."
    )
    parser.add_argument(
        "--scheduler", default="asha", help="Trial scheduler: asha (stops bad trials early) | fifo."
    )
    parser.add_argument("--space", help="YAML search space: field: {choice|loguniform|uniform: [...]}.")
    parser.add_argument(
        "--max-concurrent", type=int, default=1, help="Trials at once (each takes its workers' CPUs/GPUs)."
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.num_samples < 1:
        _common.fail(f"--num-samples must be >= 1, got {args.num_samples}")
    cfg = _common.load_job_config(args)
    num_samples = min(args.num_samples, 2) if args.smoke_test else args.num_samples

    from tgan_ray.tune import load_space, run_campaign

    space = load_space(args.space, args.stage)
    result = run_campaign(
        args.stage, args.images, cfg, args.out, num_samples, args.scheduler, space, args.max_concurrent
    )
    print(f"done: best {result.metric} {result.best_score:.4g} with {result.best_overrides}")
    print(f"use it: python jobs/pipeline.py --images {args.images} --out <run> --tuned {args.out}")


if __name__ == "__main__":
    main()
