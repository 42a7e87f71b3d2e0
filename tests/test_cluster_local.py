"""Integration: the local cluster scripts, a pipeline job sent with `ray job submit`, and the lab's MLflow record.

``cluster/local/up.sh`` starts a real Ray head (dashboard, job submission, token auth on), an MLflow server and a moto
S3 endpoint on free ports of 127.0.0.1. The quick pipeline runs on a tiny synthetic stack as a submitted job. The
test then finds the parent run, its stage runs and the registered NPsSegNet on the MLflow server over HTTP, and
``down.sh`` stops everything. Nothing is mocked; it takes a few minutes on 2 CPUs.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UP = REPO / "cluster" / "local" / "up.sh"
DOWN = REPO / "cluster" / "local" / "down.sh"
PORT_VARS = (
    "TGAN_DASHBOARD_PORT",
    "TGAN_RAY_PORT",
    "TGAN_RAY_CLIENT_PORT",
    "TGAN_RAY_AGENT_PORT",
    "TGAN_MLFLOW_PORT",
    "TGAN_S3_PORT",
)
JOB_TIMEOUT_S = 480


@dataclass
class LocalCluster:
    state: Path
    ports: dict[str, int]
    env: dict[str, str]  # what a client needs: the test's environment plus the cluster's env.sh

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['TGAN_DASHBOARD_PORT']}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['TGAN_MLFLOW_PORT']}"

    def api(self, path: str, token: bool = True, method: str = "GET") -> dict:
        """The job REST API of the dashboard, with the cluster's bearer token."""
        request = urllib.request.Request(self.dashboard + path, method=method)
        if token:
            request.add_header(
                "Authorization", f"Bearer {Path(self.env['RAY_AUTH_TOKEN_PATH']).read_text().strip()}"
            )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")


def _free_ports(n: int) -> list[int]:
    """n free ports below the kernel's ephemeral range and above Ray's worker ports (10002-19999).

    A port the kernel hands out for port 0 is in the ephemeral range, which every outgoing connection and every Ray
    worker of a test running beside this one also draws from: between picking and `ray start` one of them took the
    GCS port once in CI. Ports from 20000 up to the ephemeral range are only ever bound on purpose.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default; macOS starts at 49152
    candidates = random.Random().sample(range(20000, max(ephemeral_low, 20000 + 4 * n)), 4 * n)
    ports = []
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"found only {len(ports)} of {n} free ports in 20000-{ephemeral_low}")


def _read_env_sh(path: Path) -> dict[str, str]:
    lines = [ln.removeprefix("export ") for ln in path.read_text().splitlines() if ln.startswith("export ")]
    return dict(ln.split("=", 1) for ln in lines)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory) -> LocalCluster:
    state = tmp_path_factory.mktemp("cluster-state")
    ports = dict(zip(PORT_VARS, _free_ports(len(PORT_VARS)), strict=True))
    env = {
        **os.environ,
        **{k: str(v) for k, v in ports.items()},
        # conftest turns auth off for in-process Ray; this cluster keeps Ray 2.60's token auth on, as a lab would.
        "RAY_AUTH_MODE": "token",
        "TGAN_READY_TIMEOUT": "240",  # a loaded 2-core CI box
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        up = subprocess.run([str(UP), str(state)], env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f"cluster/local/up.sh failed:\n{up.stderr[-4000:]}"
        yield LocalCluster(state, ports, {**env, **_read_env_sh(state / "env.sh")})
    finally:
        subprocess.run([str(DOWN), str(state)], env=env, capture_output=True, text=True, timeout=300)


def _wait_for_job(cluster: LocalCluster, submission_id: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = cluster.api(f"/api/jobs/{submission_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(3)
    cluster.api(f"/api/jobs/{submission_id}/stop", method="POST")
    return "TIMEOUT"


@pytest.mark.timeout(1200)
def test_pipeline_job_is_tracked_on_the_mlflow_server(local_cluster: LocalCluster, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    from tgan_ray.data.synthetic import make_stack

    stack = make_stack(tmp_path / "stack", n=6, size=96, seed=0)
    run_dir = tmp_path / "run"
    tag = uuid.uuid4().hex[:8]
    experiment, model_name, submission_id = f"cluster-test-{tag}", f"npssegnet-{tag}", f"tgan-pipeline-{tag}"
    submit = subprocess.run(
        [
            "ray", "job", "submit", "--address", local_cluster.dashboard, "--working-dir", str(REPO),
            # .gitignore already keeps runs and stores out of the upload; .git is not worth shipping either.
            "--runtime-env-json", json.dumps({"excludes": [".git"]}),
            "--submission-id", submission_id, "--no-wait", "--",
            "python", "jobs/pipeline.py", "--images", str(stack / "images"), "--out", str(run_dir),
            "--preset", "quick", "--smoke-test",
            "--set", f"tracking.experiment={experiment}", "--set", f"tracking.registered_model={model_name}",
        ],
        env=local_cluster.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stderr[-3000:]}"

    status = _wait_for_job(local_cluster, submission_id, JOB_TIMEOUT_S)
    if status != "SUCCEEDED":
        logs = local_cluster.api(f"/api/jobs/{submission_id}/logs").get("logs", "")
        pytest.fail(f"job {submission_id} ended {status}; last lines of its log:\n{logs[-6000:]}")

    # The run folder is on this machine: the job ran on the head, which is this machine.
    assert (run_dir / "report.html").is_file()
    assert len(list((run_dir / "masks").glob("*.png"))) == 6

    client = MlflowClient(tracking_uri=local_cluster.mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} not on the MLflow server"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, f"expected one parent run, got {[r.info.run_name for r in parents]}"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    # The job found this server through the cluster's environment alone (MLFLOW_TRACKING_URI set by up.sh).
    assert parent.data.params.get("tracking.experiment") == experiment

    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    stages = {r.data.tags.get("stage") for r in children}
    assert {"pix2pix", "cyclegan", "segmenter"} <= stages, f"stage runs found: {stages}"
    assert all(r.info.status == "FINISHED" for r in children)
    assert any(r.data.metrics for r in children), "the stage runs logged no metrics"

    # Artifacts went through the server's proxy into the store up.sh gave it.
    assert client.list_artifacts(parent.info.run_id), "the parent run has no artifacts"
    assert any((local_cluster.state / "mlflow-artifacts").rglob("*.*"))

    # The final NPsSegNet is a model version in the registry, made by this pipeline run.
    versions = client.search_model_versions(f"name='{model_name}'")
    assert versions, f"no version of {model_name} in the model registry"
    assert {v.run_id for v in versions} <= {parent.info.run_id, *(r.info.run_id for r in children)}


def test_dashboard_refuses_requests_without_the_token(local_cluster: LocalCluster):
    with pytest.raises(urllib.error.HTTPError) as denied:
        local_cluster.api("/api/jobs/", token=False)
    assert denied.value.code == 401
    assert isinstance(local_cluster.api("/api/jobs/"), list)


def test_up_refuses_a_second_cluster_on_the_same_state(local_cluster: LocalCluster):
    again = subprocess.run(
        [str(UP), str(local_cluster.state)], env=local_cluster.env, capture_output=True, text=True
    )
    assert again.returncode != 0
    assert "already running" in again.stderr.strip().splitlines()[-1]
    assert isinstance(local_cluster.api("/api/jobs/"), list), (
        "the failed second start hurt the running cluster"
    )


def test_down_stops_every_service(local_cluster: LocalCluster):
    pids = {p.stem: int(p.read_text()) for p in local_cluster.state.glob("*.pid")}
    assert set(pids) == {"ray", "mlflow", "s3"}
    ray_temp = Path((local_cluster.state / "ray-temp-dir").read_text().strip())
    down = subprocess.run(
        [str(DOWN), str(local_cluster.state)], env=local_cluster.env, capture_output=True, text=True
    )
    assert down.returncode == 0, down.stderr[-2000:]
    assert not [name for name, pid in pids.items() if _pid_alive(pid)], "a service outlived down.sh"
    assert not [v for v, port in local_cluster.ports.items() if _port_open(port)], "a port is still served"
    assert not ray_temp.exists()
    assert (local_cluster.state / "mlflow.db").is_file(), "down.sh must keep the MLflow record"
