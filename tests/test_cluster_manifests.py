"""The cluster configs (cluster/) agree with each other and with the code, and every job entrypoint starts.

No Kubernetes or AWS here: the KubeRay manifests are checked for the mistakes that only show on a real cluster (an
image that differs between head and workers, a GPU limit that Ray does not know about, an env var the code never
reads, a job file that does not exist); the ``ray up`` config goes through Ray's own schema validation.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
JOBS = sorted(p for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_"))
# What the code reads to find the tracking server and the S3 endpoint; the cluster must set both on every Ray pod.
REQUIRED_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL")


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay(kind: str) -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in _documents(p) if d.get("kind") == kind]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """(name, RayCluster spec) for every RayCluster and every RayJob's embedded cluster."""
    specs = [(d["metadata"]["name"], d["spec"]) for d in _kuberay("RayCluster")]
    specs += [(d["metadata"]["name"], d["spec"]["rayClusterSpec"]) for d in _kuberay("RayJob")]
    return specs


def _ray_containers() -> list[tuple[str, dict]]:
    """(where, container) for every container that runs Ray (heads and workers)."""
    out = []
    for name, spec in _ray_cluster_specs():
        groups = [("head", spec["headGroupSpec"])] + [
            (g["groupName"], g) for g in spec.get("workerGroupSpecs", [])
        ]
        for group, g in groups:
            out += [(f"{name}/{group}", c) for c in g["template"]["spec"]["containers"]]
    return out


def _all_images() -> set[str]:
    text = "\n".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    return set(re.findall(r"^\s*image:\s*(\S+)", text, flags=re.MULTILINE))


def test_every_yaml_under_cluster_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert len(files) >= 4, f"expected the KubeRay and AWS configs under {CLUSTER}, found {files}"
    for path in files:
        docs = _documents(path)
        assert docs, f"{path} holds no YAML document"
        assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_kuberay_has_a_raycluster_and_a_rayjob():
    assert _kuberay("RayCluster"), "cluster/kuberay needs a RayCluster manifest"
    assert _kuberay("RayJob"), "cluster/kuberay needs a RayJob example"


def test_one_image_everywhere():
    images = _all_images()
    assert len(images) == 1, f"head, workers, submitter and MLflow must run one image, found {sorted(images)}"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    image = images.pop()
    assert image in dockerfile, f"cluster/Dockerfile should show how to build {image}"


def test_ray_versions_match_the_installed_ray():
    import ray

    for name, spec in _ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__, (
            f"{name}: rayVersion {spec['rayVersion']} != {ray.__version__}"
        )
    base = re.search(r"^FROM rayproject/ray:(\S+?)-", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    assert base and base.group(1) == ray.__version__, "cluster/Dockerfile's base image must match the Ray pin"
    assert f"ray[train,tune,serve,data,default]=={ray.__version__}" in (REPO / "pyproject.toml").read_text()


def test_gpu_workers_ask_kubernetes_and_ray_for_the_same_gpus():
    gpu_groups = 0
    for name, spec in _ray_cluster_specs():
        for group in spec.get("workerGroupSpecs", []):
            (container,) = group["template"]["spec"]["containers"]
            resources = container["resources"]
            k8s_gpus = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
            ray_gpus = int(group["rayStartParams"].get("num-gpus", 0))
            assert k8s_gpus == ray_gpus, (
                f"{name}/{group['groupName']}: nvidia.com/gpu {k8s_gpus} != num-gpus {ray_gpus}"
            )
            if k8s_gpus:
                gpu_groups += 1
                assert resources["requests"].get("nvidia.com/gpu") == resources["limits"]["nvidia.com/gpu"]
                tolerations = group["template"]["spec"].get("tolerations", [])
                assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), (
                    f"{name}: GPU taint not tolerated"
                )
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (
                f"{name}: replica bounds"
            )
    assert gpu_groups >= 2, "the RayCluster and the RayJob each need a GPU worker group"


def test_token_auth_is_on_in_every_kuberay_cluster():
    for name, spec in _ray_cluster_specs():
        assert spec.get("authOptions", {}).get("mode") == "token", f"{name}: set authOptions.mode: token"


def test_ray_pods_get_the_env_the_code_reads():
    code = "\n".join(p.read_text() for p in [*REPO.glob("tgan_ray/**/*.py"), *REPO.glob("jobs/*.py")])
    for name in REQUIRED_ENV:
        assert f'"{name}"' in code, f"no code reads {name}; the manifests set a variable nothing uses"
    secrets = {d["metadata"]["name"]: d for d in _kuberay("Secret")}
    containers = _ray_containers()
    assert containers
    for where, container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        missing = [n for n in REQUIRED_ENV if n not in env]
        assert not missing, f"{where}: env lacks {missing}"
        for e in env.values():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] in secrets, (
                    f"{where}: {e['name']} reads Secret {ref['name']}, which no manifest defines"
                )
                assert ref["key"] in secrets[ref["name"]]["stringData"], (
                    f"{where}: Secret {ref['name']} lacks {ref['key']}"
                )


def test_tracking_uri_points_at_the_mlflow_service():
    services = {d["metadata"]["name"]: d for d in _kuberay("Service")}
    for where, container in _ray_containers():
        uri = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_TRACKING_URI")
        match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", uri)
        assert match, f"{where}: MLFLOW_TRACKING_URI {uri!r} is not http://<service>:<port>"
        service = services.get(match.group(1))
        assert service, f"{where}: no Service named {match.group(1)} in cluster/kuberay"
        assert int(match.group(2)) in [p["port"] for p in service["spec"]["ports"]], (
            f"{where}: wrong port in {uri}"
        )


def test_volumes_used_by_containers_are_declared():
    claims = {d["metadata"]["name"] for d in _kuberay("PersistentVolumeClaim")}
    pod_specs = [
        g["template"]["spec"]
        for _, s in _ray_cluster_specs()
        for g in [s["headGroupSpec"], *s["workerGroupSpecs"]]
    ]
    pod_specs += [d["spec"]["template"]["spec"] for d in _kuberay("Deployment")]
    for spec in pod_specs:
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, (
                    f"{container['name']}: volume {mount['name']} is mounted, not declared"
                )
        for v in volumes.values():
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            assert claim is None or claim in claims, f"PersistentVolumeClaim {claim} is used but not defined"


def _referenced_jobs() -> set[str]:
    text = "\n".join(p.read_text() for p in CLUSTER.rglob("*") if p.is_file())
    text += (REPO / "README.md").read_text() if (REPO / "README.md").exists() else ""
    return set(re.findall(r"\bjobs/(\w+\.py)\b", text))


def test_jobs_named_in_manifests_exist():
    referenced = _referenced_jobs()
    assert "pipeline.py" in referenced, "the RayJob example should run jobs/pipeline.py"
    for name in referenced:
        assert (REPO / "jobs" / name).is_file(), (
            f"jobs/{name} is referenced under cluster/ but does not exist"
        )
    rayjob_entrypoints = " ".join(d["spec"]["entrypoint"] for d in _kuberay("RayJob"))
    assert "jobs/pipeline.py" in rayjob_entrypoints


def test_rayjob_entrypoint_parses_with_the_job_parser():
    """The RayJob's flags are ones its job accepts: argparse and the --set parser exit 2 on a bad one."""
    for job in _kuberay("RayJob"):
        argv = job["spec"]["entrypoint"].split()
        script = next(a for a in argv if a.endswith(".py"))
        check = (
            "import sys; sys.path.insert(0, 'jobs'); import _common, importlib; "
            f"job = importlib.import_module({Path(script).stem!r}); "
            "_common.parse_sets(job.build_parser().parse_args(sys.argv[1:]).sets)"
        )
        args = argv[argv.index(script) + 1 :]
        run = subprocess.run([sys.executable, "-c", check, *args], cwd=REPO, capture_output=True, text=True)
        assert run.returncode == 0, (
            f"RayJob {job['metadata']['name']}: entrypoint flags rejected: {run.stderr[-500:]}"
        )


def test_aws_cluster_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` runs first; raises on a bad field
    gpu_types = [
        t for t in config["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) > 0
    ]
    assert gpu_types, "the ray up config needs a GPU worker node type"
    # Ray's resource counts must be what the instance has, or tasks wait for GPUs that do not exist.
    gpus_per_instance = {
        "g5.xlarge": 1,
        "g5.2xlarge": 1,
        "g5.12xlarge": 4,
        "g5.48xlarge": 8,
        "p4d.24xlarge": 8,
    }
    for node_type in gpu_types:
        instance = node_type["node_config"]["InstanceType"]
        assert gpus_per_instance.get(instance) == node_type["resources"]["GPU"], (
            f"{instance}: GPU count mismatch"
        )
    setup = "\n".join(config["setup_commands"])
    assert "pip install" in setup and "tgan-ray" in setup, "setup_commands must install this project"
    assert "MLFLOW_TRACKING_URI" in setup and "RAY_AUTH_MODE=token" in setup


@pytest.mark.parametrize("job", JOBS, ids=[p.name for p in JOBS])
def test_every_job_answers_help(job: Path):
    run = subprocess.run(
        [sys.executable, str(job), "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, f"{job.name} --help failed: {run.stderr[-500:]}"
    assert "ray job submit" in run.stdout, f"{job.name}: the help should show the submit command"
    for option in ("--config", "--preset", "--set", "--smoke-test"):
        assert option in run.stdout, f"{job.name} lacks {option}"


def test_jobs_are_the_expected_set():
    assert {p.stem for p in JOBS} == {"pipeline", "tune", "generate", "segment", "serve"}


def test_bad_override_is_one_line_error():
    run = subprocess.run(
        [sys.executable, "jobs/pipeline.py", "--images", "x", "--out", "y", "--set", "segmenter.epochz=3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "segmenter.epochz" in last, run.stderr[-500:]
