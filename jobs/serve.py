"""Job: the segmentation endpoint on Ray Serve (``POST /v1/segment``), kept up for as long as the job runs.

The same work as ``tgan serve``. Submit without waiting, and stop it with ``ray job stop <id>``::

    ray job submit --address http://127.0.0.1:8265 --working-dir . --no-wait -- \\
        python jobs/serve.py --model models:/npssegnet/3 --host 0.0.0.0

Replicas, GPUs per replica and batching come from the config's ``serve`` section.
"""

from __future__ import annotations

import argparse

import _common


def build_parser() -> argparse.ArgumentParser:
    parser = _common.job_parser(__doc__)
    parser.add_argument(
        "--model", required=True, help="NPsSegNet checkpoint: a path, s3:// or models:/<name>/<version>."
    )
    parser.add_argument(
        "--host", help="HTTP host to bind (default: serve.host; 0.0.0.0 to reach it from other hosts)."
    )
    parser.add_argument("--port", type=int, help="HTTP port (default: serve.port, 8000).")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    overrides = {f"serve.{k}": v for k, v in {"host": args.host, "port": args.port}.items() if v is not None}
    cfg = _common.load_job_config(args, overrides)

    from tgan_ray.serve import serve_model

    serve_model(args.model, cfg, blocking=True)


if __name__ == "__main__":
    main()
