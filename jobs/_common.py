"""What every job entrypoint shares: the config flags, and the cluster, MLflow and S3 URIs from the environment.

Not a job itself. ``python jobs/<job>.py`` puts ``jobs/`` first on ``sys.path``, so the jobs import it as ``_common``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

# --smoke-test: the quick preset cut to a few optimiser steps per stage. It checks the wiring (cluster, storage,
# MLflow, registry) in a minute or two on CPU. The models it makes are useless.
SMOKE_OVERRIDES: dict[str, Any] = {
    "data.real_crops": 16,
    "prior.n_masks": 16,
    **{
        f"{gan}.{key}": value
        for gan in ("pix2pix", "cyclegan")
        for key, value in {
            "epochs": 1,
            "epochs_decay": 0,
            "steps_per_epoch": 2,
            "eval_every": 1,
            "eval_images": 8,
        }.items()
    },
    "segmenter.epochs": 1,
    "segmenter.steps_per_epoch": 2,
    "run.report_overlays": 1,
}


def job_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every job takes; ``doc`` (the job's docstring) is its description."""
    from tgan_ray.config import PRESETS

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", help="YAML file overriding preset values (paths are on the node running the job)."
    )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="Defaults: paper (the paper's hyperparameters) | quick (CPU-sized). Default: paper, quick with --smoke-test.",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one config field, e.g. --set segmenter.epochs=20 (repeatable).",
    )
    parser.add_argument(
        "--address",
        help="Ray cluster address. Default: ray.address from the config, else RAY_ADDRESS (Ray sets it in a job).",
    )
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="Tiny settings (quick preset, a few steps per stage): checks the cluster wiring in minutes.",
    )
    return parser


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """``["segmenter.epochs=20"]`` -> ``{"segmenter.epochs": 20}`` (the CLI's parser), or a one-line error."""
    from tgan_ray.config import ConfigError, parse_overrides

    try:
        return parse_overrides(sets)
    except ConfigError as exc:
        fail(str(exc))


def load_job_config(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None, base: dict[str, Any] | None = None
):
    """The job's :class:`~tgan_ray.config.Config`, and a log line saying which cluster, MLflow and S3 it will use.

    Later wins: preset, ``--config``, smoke settings, ``base`` (e.g. a Tune campaign's winner), ``--set``, then
    ``overrides`` (the job's own flags).

    What the config leaves open, the library takes from the environment the cluster gives every job (the KubeRay
    manifests, the ``ray up`` config and ``cluster/local/up.sh`` set these): ``RAY_ADDRESS`` (Ray sets it inside a
    job), ``MLFLOW_TRACKING_URI`` and ``AWS_ENDPOINT_URL``. They are not copied into the config: a resumed run must
    not count as changed because the cluster came back on another port.
    """
    from tgan_ray.config import ConfigError, load_config

    merged = dict(SMOKE_OVERRIDES) if args.smoke_test else {}
    merged.update(base or {})
    merged.update(parse_sets(args.sets))
    merged.update(overrides or {})
    if args.address:
        merged["ray.address"] = args.address
    preset = args.preset or ("quick" if args.smoke_test else "paper")
    try:
        cfg = load_config(preset, args.config, merged)
    except ConfigError as exc:
        fail(str(exc))
    where = {
        "ray": cfg.ray.address or os.environ.get("RAY_ADDRESS") or "a new local instance",
        "mlflow": cfg.tracking.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or "sqlite in the run folder",
        "s3": cfg.storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS default",
    }
    if not cfg.tracking.enabled:
        where["mlflow"] = "off"
    print(f"preset {preset}; " + "; ".join(f"{k}: {v}" for k, v in where.items()), flush=True)
    return cfg


def fail(message: str) -> None:
    """End the job with a one-line error (exit status 2); the job's log and status show it."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
