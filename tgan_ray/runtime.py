"""Connecting to Ray: the embedded local instance by default, or a cluster by address."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

from tgan_ray.config import RayConfig

# Quiet defaults for a local run; a user's environment wins.
_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    # Train V2's controller polls its workers every 2 s, and a stage waits for a poll at each change of state:
    # at 0.5 s a one-worker fit that only reports takes 15 s instead of 19 on 2 cores (bench/train_overhead.py), and
    # a tiny pipeline stage 20-25 s instead of 27-34.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}

# Python loggers whose records go to the run's log file instead of the terminal ("ray.data": its own config).
_LIBRARY_LOGGERS = ("ray", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic")
_HANDLER_NAME = "tgan-run-log"
# While library_logs_to is active: its file handler and the loggers' handlers before it.
_RUN_LOG: dict | None = None


def cluster_address(cfg: RayConfig | None = None) -> str | None:
    """The Ray cluster this process joins (``ray.address``, or ``RAY_ADDRESS`` inside a Ray job); None: local."""
    return (cfg.address if cfg else None) or os.environ.get("RAY_ADDRESS")


def worker_cpus(cfg: RayConfig, reserved: float = 0.0) -> float:
    """CPUs each Ray Train worker asks for: ``cfg.cpus_per_worker``, or (None) the local instance's CPUs less
    ``reserved`` (a Tune trial's own CPUs), shared among the workers; 1 on a cluster."""
    if cfg.cpus_per_worker is not None:
        return float(cfg.cpus_per_worker)
    if cluster_address(cfg):
        return 1.0
    import ray

    total = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else float(os.cpu_count() or 1)
    return max(0.25, (total - reserved) / cfg.num_workers)


def set_env_defaults() -> None:
    """Our Ray settings (``_ENV_DEFAULTS``) where the environment sets none: before a local instance starts, because
    its workers inherit this process's environment then."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def init_ray(cfg: RayConfig | None = None, num_cpus: int | None = None, log_to_driver: bool = True):
    """Start (or join) Ray once per process.

    ``cfg.address`` None starts a local instance; otherwise it joins that cluster ("auto" inside a Ray job).
    ``log_to_driver=False``: workers' and actors' output stays in Ray's session logs (``tgan run`` without -v).
    """
    set_env_defaults()
    import ray

    if ray.is_initialized():
        return ray
    address = cluster_address(cfg)
    # ray.init resets the "ray" logger (and warns through Python's last-resort handler meanwhile): inside
    # library_logs_to, what it says goes to the run log, and the loggers are routed there again after it.
    quiet = contextlib.redirect_stderr(_RUN_LOG["handler"].stream) if _RUN_LOG else contextlib.nullcontext()
    with quiet:
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            ray.init(
                address="local",  # a new instance: never a `ray start` cluster that happens to run here
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=log_to_driver,
                configure_logging=False,
            )
    _route_library_loggers()
    return ray


def _route_library_loggers() -> None:
    """Inside library_logs_to: the library loggers write to the run log only (their console handlers off)."""
    if _RUN_LOG is None:
        return
    handler, saved = _RUN_LOG["handler"], _RUN_LOG["saved"]
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.setdefault(name, (list(logger.handlers), logger.propagate))
        for h in list(logger.handlers):
            if type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler):
                logger.removeHandler(h)  # console handlers; Ray's own session-file handlers stay
        if handler not in logger.handlers:
            logger.addHandler(handler)
        logger.propagate = False


def _ray_data_logging_config(path: Path) -> Path:
    """A Ray Data logging config (``RAY_DATA_LOGGING_CONFIG``) that writes to ``path`` only: Ray Data
    re-applies its config at every execution, so removing its console handler once does not last."""
    import yaml

    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"ray": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "formatter": "ray", "filename": str(path)}},
        "loggers": {"ray.data": {"level": "INFO", "handlers": ["file"], "propagate": False}},
    }
    target = path.with_name("ray-data-logging.yaml")
    target.write_text(yaml.safe_dump(config))
    return target


@contextlib.contextmanager
def library_logs_to(path: str | os.PathLike):
    """Within the block, Ray, Ray Data, Train and MLflow log records and Python warnings go to ``path``.

    Our own warnings for the user (:class:`~tgan_ray.io.SkippedImagesWarning`: unreadable files) stay on the
    terminal as one ``   warning:`` line each.
    """
    global _RUN_LOG
    import mlflow  # noqa: F401 - its console handler exists from import on: made now, so it can be moved

    from tgan_ray.io import SkippedImagesWarning

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.name = _HANDLER_NAME
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved_env = os.environ.get("RAY_DATA_LOGGING_CONFIG")
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(_ray_data_logging_config(path))
    try:
        from ray.data._internal.logging import configure_logging

        configure_logging()
    except ImportError:  # Ray Data is optional for callers that never touch it
        pass
    saved: dict = {}
    _RUN_LOG = {"handler": handler, "saved": saved}
    _route_library_loggers()
    show_before = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, SkippedImagesWarning):
            print(f"   warning: {message}", file=sys.stderr)
        else:
            handler.stream.write(warnings.formatwarning(message, category, filename, lineno, line))
            handler.flush()

    warnings.showwarning = showwarning
    restore_stderr = _stderr_fd_to(path)
    try:
        yield path
    finally:
        restore_stderr()
        _RUN_LOG = None
        warnings.showwarning = show_before
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        if saved_env is None:
            os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
        else:
            os.environ["RAY_DATA_LOGGING_CONFIG"] = saved_env
        handler.close()


def _stderr_fd_to(path: Path):
    """Point file descriptor 2 at ``path``, and ``sys.stderr`` at a copy of the terminal's descriptor.

    Ray's core worker logs from C++ straight to fd 2 ("core_worker.cc ... constructor arguments"), and
    handlers made at import hold the old ``sys.stderr``: both then land in the log file, while our own lines,
    bars and tracebacks (written to ``sys.stderr`` at call time) still reach the terminal. Where ``sys.stderr``
    is not fd 2 (a test's capture, a notebook), nothing is moved. Returns the function that undoes it.
    """
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        real = False
    if not real:
        return lambda: None
    sys.stderr.flush()
    before, terminal_fd = sys.stderr, os.dup(2)
    log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    sys.stderr = os.fdopen(terminal_fd, "w", buffering=1, encoding=before.encoding, errors="backslashreplace")

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(terminal_fd, 2)
        sys.stderr.close()  # closes terminal_fd; fd 2 is the terminal again
        sys.stderr = before

    return restore


def use_actor_cpus() -> int:
    """Give torch in this Ray actor one thread per CPU Ray assigned it (rounded); returns the thread count.

    Ray sets OMP_NUM_THREADS=1 for any fractional share, so an actor given 1.75 of 2 CPUs would run on one core.
    """
    import ray
    import torch

    if not ray.is_initialized():  # outside Ray (a test, a notebook): torch keeps its own default
        return torch.get_num_threads()
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except AssertionError:  # Ray raises this in the driver, which is no worker: same as outside Ray
        return torch.get_num_threads()
    threads = max(1, round(cpus))
    torch.set_num_threads(threads)
    return threads


def use_gpu(cfg: RayConfig) -> bool:
    """``auto``: GPUs if the Ray cluster has any."""
    if cfg.use_gpu == "auto":
        import ray

        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return cfg.use_gpu == "yes"
