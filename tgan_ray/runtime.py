"""Connecting to Ray: the embedded local instance by default, or a cluster by address."""

from __future__ import annotations

import os

from tgan_ray.config import RayConfig

# Quiet defaults for a local run; a user's environment wins.
_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}


def init_ray(cfg: RayConfig | None = None, num_cpus: int | None = None):
    """Start (or join) Ray once per process.

    ``cfg.address`` None starts a local instance; otherwise it joins that cluster ("auto" inside a Ray job).
    """
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray
    address = (cfg.address if cfg else None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, configure_logging=False)
    return ray


def use_gpu(cfg: RayConfig) -> bool:
    """``auto``: GPUs if the Ray cluster has any."""
    if cfg.use_gpu == "auto":
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return cfg.use_gpu == "yes"
