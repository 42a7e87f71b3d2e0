"""Shared fixtures. One local Ray instance per test session (starting Ray per test is slow)."""

import atexit
import os
import shutil
import tempfile

import pytest

# Quiet, offline, local: set before Ray or MLflow are imported anywhere.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MPLBACKEND", "Agg")
# The session's Ray instance starts with the settings a user's run has (tgan_ray.runtime): its workers inherit them.
from tgan_ray.runtime import set_env_defaults  # noqa: E402

set_env_defaults()
# Fake S3 credentials before the session's Ray starts: Ray workers inherit the starting process's environment,
# so workers reading from the tests' local S3 endpoint see the same keys as the driver.
_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
for _key, _value in _TEST_CREDENTIALS.items():
    os.environ.setdefault(_key, _value)
# Copies of remote models and S3 run folders go to a folder of this test process, never the user's ~/.cache, and
# two pytest-xdist workers (each imports this file) never share one.
os.environ["TGAN_CACHE_DIR"] = tempfile.mkdtemp(prefix="tgan-test-cache-")
atexit.register(shutil.rmtree, os.environ["TGAN_CACHE_DIR"], ignore_errors=True)


# A test that starts one of these (a Ray instance, an S3 or MLflow server, a whole run) is an integration test.
INTEGRATION_FIXTURES = {"ray_local", "s3_server", "local_cluster", "smoke", "finished_run"}
STAGE_MODULES = {"test_stage_loops", "test_train_stages"}


def _kind(item) -> str:
    """unit, stages or integration: ``pytest -m unit`` is the fast part, ``-m stages`` the training loops."""
    if "integration" in item.keywords or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "integration"
    return "stages" if item.module.__name__.rsplit(".", 1)[-1] in STAGE_MODULES else "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(getattr(pytest.mark, _kind(item)))
    run_slow = os.environ.get("TGAN_RUN_SLOW") == "1"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set TGAN_RUN_SLOW=1"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny test models on 2 shared cores: OpenMP threads spin-wait on each other and run many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance shared by the whole session."""
    import ray

    if not ray.is_initialized():
        # address="local": its own instance, also beside another worker's or a test cluster's
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
        )
    try:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    except Exception:
        pass
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint over HTTP (moto's ThreadedMotoServer) on 127.0.0.1, with test credentials."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def moto_auth(s3_server):
    """``set_auth("0")`` switches moto's IAM checks on ("inf": off) and returns the previous setting."""
    import json
    import urllib.request

    def set_auth(initial_no_auth_count: str) -> str:
        request = urllib.request.Request(
            f"{s3_server}/moto-api/reset-auth",
            data=initial_no_auth_count.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]

    return set_auth


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 endpoint; yields (endpoint, bucket name)."""
    import uuid

    import boto3

    name = f"tgan-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return s3_server, name
