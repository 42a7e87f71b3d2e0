"""Job: the whole label-free pipeline (steps 1-8) on a stack, as one MLflow parent run with a child per stage.

The same work as ``tgan run``. Submit it to a cluster from the repository root::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pipeline.py --images s3://lab/stacks/run42/ --out s3://lab/runs/run42 --preset quick

    # wiring check on a tiny stack (a minute or two on CPU):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pipeline.py --images /data/stack/images --out /data/runs/smoke --smoke-test

The run folder (``--out``) is best an S3 prefix on a real cluster: Train checkpoints, generated pairs and masks go
there from every node, and the driver keeps a local working copy (``tgan_ray/run_folder.py``). A local folder must
be on storage every node mounts at the same path. Running the same command again resumes the run, from S3 on any
node. MLflow goes to MLFLOW_TRACKING_URI and S3 to AWS_ENDPOINT_URL when the config does not name them.
"""

from __future__ import annotations

import argparse

import _common


def build_parser() -> argparse.ArgumentParser:
    parser = _common.job_parser(__doc__)
    parser.add_argument("--images", required=True, help="Stack: a folder, a glob or s3://bucket/prefix.")
    parser.add_argument(
        "--out",
        required=True,
        help="Run folder: s3://bucket/prefix, or a folder every node mounts; running again resumes it.",
    )
    parser.add_argument(
        "--seed-model", help="NPsSegNet checkpoint (path, s3:// or models:/) as the step-2 segmenter."
    )
    parser.add_argument("--pixel-size-nm", type=float, help="Pixel size in nm (overrides file metadata).")
    parser.add_argument(
        "--tuned", help="A Tune campaign folder (jobs/tune.py --out) whose best settings to use."
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    overrides = {"data.pixel_size_nm": args.pixel_size_nm} if args.pixel_size_nm else {}
    tuned = {}
    if args.tuned:
        from tgan_ray.config import ConfigError
        from tgan_ray.tune import tuned_overrides

        try:
            tuned = tuned_overrides(args.tuned)
        except ConfigError as exc:
            _common.fail(str(exc))
    cfg = _common.load_job_config(args, overrides, base=tuned)

    from tgan_ray.pipeline import run_pipeline

    result = run_pipeline(args.images, args.out, cfg, seed_model=args.seed_model)
    print(
        f"done: {result.summary.get('count')} particles; report {result.report}; segmenter {result.segmenter}"
    )


if __name__ == "__main__":
    main()
