"""Job: batch segmentation of a whole stack with a trained NPsSegNet, sharded over the cluster with Ray Data.

The same work as ``tgan segment``: masks written back beside the stack's name under ``--out``, the particle table as
Parquet and the PSD summary, for the whole stack and per image::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/segment.py --model models:/npssegnet/3 --images s3://lab/stacks/insitu-07/ \\
        --out s3://lab/segmented/insitu-07
"""

from __future__ import annotations

import argparse

import _common


def build_parser() -> argparse.ArgumentParser:
    parser = _common.job_parser(__doc__)
    parser.add_argument(
        "--model", required=True, help="NPsSegNet checkpoint: a path, s3:// or models:/<name>/<version>."
    )
    parser.add_argument("--images", required=True, help="Stack: a folder, a glob or s3://bucket/prefix.")
    parser.add_argument("--out", required=True, help="Output folder or s3://bucket/prefix.")
    parser.add_argument("--recursive", action="store_true", help="Also segment images in subfolders.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = _common.load_job_config(args)

    from tgan_ray.segment import segment_stack

    print(f"done: {segment_stack(args.model, args.images, args.out, cfg, recursive=args.recursive)}")


if __name__ == "__main__":
    main()
