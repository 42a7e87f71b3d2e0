"""The ``tgan`` command line: serve options mapped onto cfg.serve, human endings and --json."""

from __future__ import annotations

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from tgan_ray.cli import app, serve_config
from tgan_ray.serve import deployment_options


def _serve_params(args: list[str]) -> dict:
    """Parse ``tgan serve ARGS`` as the shell would, without running the command (no Serve, no Ray)."""
    command = get_command(app).commands["serve"]
    params = command.make_context("serve", ["--model", "m.pt", *args]).params
    params.pop("model")
    return params


def test_serve_options_map_onto_cfg_serve_without_starting_serve():
    cfg = serve_config(
        **_serve_params(
            ["--host", "0.0.0.0", "--port", "9123", "--replicas", "3", "--gpus-per-replica", "0.5"]
            + ["--cpus-per-replica", "2", "--max-batch-size", "16", "--preset", "quick"]
        )
    )
    s = cfg.serve
    assert (s.host, s.port, s.min_replicas, s.max_replicas) == ("0.0.0.0", 9123, 3, 3)
    assert (s.gpus_per_replica, s.cpus_per_replica, s.max_batch_size) == (0.5, 2.0, 16)
    options = deployment_options(cfg, gpus_available=1)
    assert options["num_replicas"] == 3 and options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.5}

    # Autoscaling between --replicas and --max-replicas; options win over --set; the rest keeps the config.
    auto = serve_config(
        **_serve_params(["--replicas", "1", "--max-replicas", "4", "--set", "serve.port=7000"])
    )
    assert deployment_options(auto)["autoscaling_config"]["max_replicas"] == 4
    assert auto.serve.port == 7000 and auto.serve.host == "127.0.0.1"
    assert serve_config(**_serve_params(["--port", "7001", "--set", "serve.port=7000"])).serve.port == 7001


def test_serve_options_are_checked_before_anything_starts(capsys):
    with pytest.raises(typer.Exit):
        serve_config(**_serve_params(["--replicas", "4", "--max-replicas", "2"]))
    assert "--replicas 4 is more than --max-replicas 2" in capsys.readouterr().err
    result = CliRunner().invoke(app, ["serve", "--model", "m.pt", "--port", "70000"])
    assert result.exit_code == 2 and "65535" in result.output


def test_serve_help_names_the_common_options():
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--host",
        "--port",
        "--replicas",
        "--max-replicas",
        "--gpus-per-replica",
        "--max-batch-size",
    ):
        assert option in result.output
