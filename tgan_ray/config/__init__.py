"""One typed config tree for every stage, command, job and test.

The defaults are the paper's hyperparameters (arXiv 2407.19544, see DESIGN.md): that is the ``paper`` preset.
The ``quick`` preset shrinks images, networks and epochs so the whole pipeline runs on 2 CPU cores in minutes.

    cfg = load_config(preset="quick", path="my.yaml", overrides={"segmenter.epochs": 5})
    save_config(cfg, "run/config.yaml")

A wrong key or a wrong type raises :class:`ConfigError` with a one-line message naming the field.

The sections live in ``schema.py`` and the presets in ``presets.py``; this module layers them (preset, YAML file,
dotted overrides), validates the result and saves it, and re-exports every name callers use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tgan_ray.config.presets import PRESETS, auto_preset, deep_merge
from tgan_ray.config.schema import (
    Config,
    CycleGANConfig,
    DataConfig,
    GANConfig,
    Pix2PixConfig,
    PriorConfig,
    RayConfig,
    RoughMaskConfig,
    RunConfig,
    ScaleOutConfig,
    SegmenterConfig,
    ServeConfig,
    StorageConfig,
    TrackingConfig,
)

__all__ = [
    "PRESETS",
    "Config",
    "ConfigError",
    "CycleGANConfig",
    "DataConfig",
    "GANConfig",
    "Pix2PixConfig",
    "PriorConfig",
    "RayConfig",
    "RoughMaskConfig",
    "RunConfig",
    "ScaleOutConfig",
    "SegmenterConfig",
    "ServeConfig",
    "StorageConfig",
    "TrackingConfig",
    "auto_preset",
    "build_config",
    "config_to_dict",
    "flatten_config",
    "load_config",
    "parse_overrides",
    "save_config",
    "with_overrides",
]


class ConfigError(ValueError):
    """A config file, preset or override that does not fit the schema."""


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["segmenter.epochs=20"]`` (``--set`` values) -> ``{"segmenter.epochs": 20}``; values are YAML scalars."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _dotted_to_nested(overrides: dict[str, Any]) -> dict:
    nested: dict = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _one_line(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{field}: {msg}")
    return f"invalid config ({source}): " + "; ".join(parts)


def build_config(data: dict[str, Any] | None = None, source: str = "dict") -> Config:
    """Validate a nested dict into a :class:`Config`; errors name the field."""
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None


def load_config(
    preset: str = "paper", path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Paper defaults, then a preset, then a YAML file, then dotted overrides (``{"segmenter.lr": 1e-3}``).

    ``preset="auto"`` is :func:`auto_preset`: the paper's on a GPU, ``cpu`` otherwise.
    """
    preset = auto_preset() if preset == "auto" else preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    merged = dict(PRESETS[preset])
    source = f"preset {preset}"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            from_file = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(
                f"config file {p} must hold a mapping of sections, got {type(from_file).__name__}"
            )
        merged = deep_merge(merged, from_file)
        source = str(p)
    if overrides:
        merged = deep_merge(merged, _dotted_to_nested(overrides))
    return build_config(merged, source)


def with_overrides(cfg: Config, overrides: dict[str, Any], source: str = "--set") -> Config:
    """``cfg`` with dotted overrides applied (``{"segmenter.epochs": 5}``), validated as a whole."""
    return build_config(deep_merge(config_to_dict(cfg), _dotted_to_nested(overrides)), source)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the full config as YAML (atomically: a temporary name, then rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(p)


def flatten_config(cfg: Config) -> dict[str, Any]:
    """Dotted keys -> values, for MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = node

    walk("", config_to_dict(cfg))
    return flat
