"""What the ``tgan`` commands share: their common options, how options become a Config, and how a command fails.

``Preset``, ``ConfigFile``, ``Sets``, ``AsJson`` and ``Verbose`` are the option types several commands take;
:func:`config_from_options` layers --preset, --config and --set, and :func:`serve_config` adds ``tgan serve``'s own
options on top. A user error ends a command in one red line and exit status 2 (:func:`fail`); a result ends it as
a short summary or JSON (:func:`finish`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Preset = Annotated[
    str,
    typer.Option(
        "--preset",
        help="Defaults: paper (the paper's hyperparameters) | cpu (a first run on a CPU) | quick (minutes) | "
        "auto (paper on a GPU, else cpu).",
    ),
]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="YAML file overriding preset values.")]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one field, e.g. --set segmenter.epochs=20 (repeatable)."),
]
AsJson = Annotated[
    bool, typer.Option("--json", help="End with the result as JSON on stdout (progress goes to stderr).")
]
Verbose = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Show Ray's, Train's and MLflow's logs too (else in <out>/logs/tgan.log)."
    ),
]


def fail(message: str) -> None:
    """End the command with a user error: one red line on stderr (addresses masked), exit status 2."""
    from tgan_ray.messages import without_addresses

    typer.secho(f"error: {without_addresses(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def finish(lines: list[str], payload: dict, as_json: bool) -> None:
    """End a command: its result as JSON, or a short summary whose first line is green."""
    from tgan_ray.cli_summary import to_json

    if as_json:
        typer.echo(to_json(payload))
        return
    typer.secho(lines[0], fg=typer.colors.GREEN)
    for line in lines[1:]:
        typer.echo(line)


def parse_sets(sets: list[str] | None) -> dict:
    """``--set`` values as dotted overrides; a malformed one ends the command."""
    from tgan_ray.config import ConfigError, parse_overrides

    try:
        return parse_overrides(sets)
    except ConfigError as exc:
        fail(str(exc))


def config_from_options(preset: str, config: Path | None, overrides: dict):
    """The config from --preset, --config and the overrides; an invalid one ends the command."""
    from tgan_ray.config import ConfigError, load_config

    try:
        return load_config(preset, config, overrides)
    except ConfigError as exc:
        fail(str(exc))


def user_errors():
    """The exceptions a command reports in one line (bad input, config or storage), not as a traceback."""
    from tgan_ray.config import ConfigError
    from tgan_ray.io import ImageReadError, StackError, StorageError
    from tgan_ray.masks import NoParticlesError
    from tgan_ray.pipeline import PipelineError

    return (
        ConfigError,
        ImageReadError,
        StackError,
        StorageError,
        NoParticlesError,
        PipelineError,
        FileNotFoundError,
    )


def serve_config(
    preset: str = "paper",
    config: Path | None = None,
    set_: list[str] | None = None,
    host: str | None = None,
    port: int | None = None,
    replicas: int | None = None,
    max_replicas: int | None = None,
    gpus_per_replica: float | None = None,
    cpus_per_replica: float | None = None,
    max_batch_size: int | None = None,
):
    """The config ``tgan serve`` runs with: preset, file, --set, then its own options (those given)."""
    overrides = parse_sets(set_)
    fields = {
        "host": host,
        "port": port,
        "min_replicas": replicas,
        "max_replicas": max_replicas if max_replicas is not None else replicas,
        "gpus_per_replica": gpus_per_replica,
        "cpus_per_replica": cpus_per_replica,
        "max_batch_size": max_batch_size,
    }
    overrides.update({f"serve.{k}": v for k, v in fields.items() if v is not None})
    cfg = config_from_options(preset, config, overrides)
    if cfg.serve.min_replicas > cfg.serve.max_replicas:
        fail(f"--replicas {cfg.serve.min_replicas} is more than --max-replicas {cfg.serve.max_replicas}")
    return cfg
