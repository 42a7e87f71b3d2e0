"""The ``tgan`` command line: serve options mapped onto cfg.serve, human endings and --json."""

from __future__ import annotations

import json

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from tgan_ray.cli import app
from tgan_ray.cli_common import serve_config
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


@pytest.fixture(scope="module")
def stack_with_junk(tmp_path_factory):
    """Three synthetic HAADF frames and one file of random bytes named like a PNG."""
    import numpy as np

    from tgan_ray.data.synthetic import make_stack

    images = make_stack(tmp_path_factory.mktemp("stack"), n=3, size=96, seed=3) / "images"
    (images / "junk.png").write_bytes(np.random.default_rng(0).bytes(800))
    return images


def test_segment_ends_with_a_short_summary_and_json_on_request(ray_local, stack_with_junk, tmp_path):
    args = ["segment", "--rough", "--images", str(stack_with_junk), "--out", str(tmp_path / "seg")]
    args += ["--preset", "quick", "--set", "scale_out.cpus_per_actor=0.5", "--set", "scale_out.batch_size=2"]
    junk = str(stack_with_junk / "junk.png")

    human = CliRunner().invoke(app, args)
    assert human.exit_code == 0, human.output
    lines = human.stdout.strip().splitlines()
    assert "Result(" not in human.stdout and " object at 0x" not in human.stdout
    assert lines[0].startswith("done: 3 images segmented, 0 reused, 1 unreadable in ")
    assert "particles, mean diameter" in lines[1] and "95% CI" in lines[1]
    assert f"masks:     {tmp_path / 'seg' / 'masks'}" in lines[2]
    [error] = [line for line in lines if line.startswith(f"  {junk}: ")]  # errors listed by file
    assert "PNG" in error and len(lines) <= 10

    machine = CliRunner().invoke(app, [*args, "--json"])  # the same out again: every mask is reused
    assert machine.exit_code == 0, machine.output
    result = json.loads(machine.stdout)
    assert (result["segmented"], result["reused"]) == (0, 3)
    assert [source for source, _ in result["errors"]] == [junk]
    assert result["summary"]["count"] > 0 and result["summary"]["intervals"]["mean"]["low"] > 0
    assert result["summary_json"] == str(tmp_path / "seg" / "summary.json")


def test_generate_and_run_endings_are_lines_and_json_not_reprs(tmp_path):
    from tgan_ray.cli_summary import generate_lines, run_dict, run_lines, to_json
    from tgan_ray.generate import GenerateResult
    from tgan_ray.pipeline import PipelineResult

    gen = GenerateResult(out="s3://b/virtual", manifest="s3://b/virtual/manifest.parquet", count=100,
                         generated=60, reused=40, seconds=12.0)  # fmt: skip
    lines = generate_lines(gen)
    assert lines[0] == "done: 100 (image, mask) pairs: 60 generated, 40 reused, in 12 s (5.0 pairs/s)"
    assert "manifest: s3://b/virtual/manifest.parquet" in lines and "GenerateResult(" not in "\n".join(lines)
    assert json.loads(to_json(gen.to_dict()))["generated"] == 60

    summary = {"count": 42, "unit": "nm", "mean": 5.04, "sd": float("nan"), "d10": 4.0, "d50": 5.0, "d90": 6.1,
               "intervals": {"level": 0.95, "mean": {"low": 4.8, "high": 5.3}}}  # fmt: skip
    run = PipelineResult(tmp_path, summary, tmp_path / "report.html", tmp_path / "round1" / "npssegnet.pt")
    lines = run_lines(run)
    assert lines[0] == "done: 42 particles, mean diameter 5.04 nm (95% CI 4.8-5.3), d10/d50/d90 4/5/6.1 nm"
    assert f"report:    {tmp_path / 'report.html'}" in lines and "PosixPath(" not in "\n".join(lines)
    payload = json.loads(to_json(run_dict(run)))  # NaN becomes null: strict JSON
    assert payload["summary"]["sd"] is None and payload["particles_parquet"] == str(
        tmp_path / "particles.parquet"
    )
    assert payload["remote"] is None and not any(line.startswith("run:") for line in lines)
    run.remote = "s3://b/runs/r1"  # an S3 run folder: the ending names it, and the working copy
    assert f"run:       s3://b/runs/r1 (working copy: {tmp_path})" in run_lines(run)
    assert json.loads(to_json(run_dict(run)))["remote"] == "s3://b/runs/r1"


def test_a_run_that_fails_its_checks_prints_one_line_and_leaves_no_folder(tmp_path):
    """Checked before Ray and MLflow start: no Ray notice, no run folder, no mlflow.db."""
    out = tmp_path / "runs" / "r1"
    missing = CliRunner().invoke(
        app, ["run", "--images", str(tmp_path / "nope"), "--out", str(out), "--preset", "quick"]
    )
    assert missing.exit_code != 0
    assert missing.output.strip().splitlines() == [f"error: no such folder or file: {tmp_path / 'nope'}"]
    assert not (tmp_path / "runs").exists()

    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "notes.txt").write_text("not an image")
    empty = CliRunner().invoke(
        app, ["run", "--images", str(tmp_path / "stack"), "--out", str(out), "--preset", "quick"]
    )
    assert empty.exit_code != 0 and len(empty.output.strip().splitlines()) == 1
    assert "no EM images" in empty.output and ".txt" in empty.output and not (tmp_path / "runs").exists()

    from PIL import Image

    Image.new("L", (32, 32)).save(tmp_path / "stack" / "a.png")
    args = ["run", "--images", str(tmp_path / "stack"), "--out", str(out), "--preset", "quick"]
    seed = CliRunner().invoke(app, [*args, "--seed-model", str(tmp_path / "seg.pt")])
    assert seed.output.strip().splitlines() == [f"error: seed model not found: {tmp_path / 'seg.pt'}"]
    (tmp_path / "runs").write_text("a file")
    not_a_folder = CliRunner().invoke(app, [*args[:3], "--out", str(tmp_path / "runs"), "--preset", "quick"])
    assert "is a file" in not_a_folder.output and len(not_a_folder.output.strip().splitlines()) == 1


@pytest.mark.integration  # `tgan demo` in a subprocess
def test_the_demo_terminal_shows_our_steps_not_rays_logs(tmp_path):
    """`tgan demo` as a user starts it, in its own process and Ray: each step's lines and the training
    progress, each once; Ray's, Train's and MLflow's logs go to the run's log file, which the last line names."""
    import re
    import subprocess
    import sys

    from test_pipeline import TINY

    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    args = ["demo", "--out", str(tmp_path / "demo"), "--n", "5", "--size", "128", "--preset", "quick", *sets]
    done = subprocess.run(
        [sys.executable, "-c", "from tgan_ray.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    ray_internal = re.compile(
        r"core_worker|PlacementGroup|RayTrainWorker|pid=\d|logging\.cc|Token authentication|"
        r"mlflow\.store|INFO|Checkpoint successfully|\x1b\["
    )
    assert [line for line in lines if ray_internal.search(line)] == []
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    for step in ("stack", "round1/pix2pix", "round1/segmenter", "segment", "report"):
        assert f"== {step} ..." in lines
    assert any(line.startswith("[segmenter] epoch 2/2 loss=") for line in lines)  # progress, off a TTY
    log = tmp_path / "demo" / "run" / "logs" / "tgan.log"
    assert done.stdout.strip().splitlines()[-1].startswith(f"log:       {log}")
    assert "ray.data" in log.read_text()  # Ray Data's execution lines, beside Ray's own C++ warnings
