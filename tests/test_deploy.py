"""The deployment files parse and say what docs/DEPLOY.md says they do (no Docker needed).

The real proof is `make docker-smoke` (deploy/ci-smoke.sh, run by .ci/run); these checks are the
cheap part: the fields a reviewer would look for, and consistency between the files.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's `!reset` merge tag, read as None."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def _compose(name: str) -> dict:
    return yaml.load((DEPLOY / name).read_text(), Loader=_ComposeLoader)


def _k8s(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "k8s" / name).read_text())


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _default_base_image() -> str:
    m = re.search(r"^ARG BASE_IMAGE=(\S+)$", _dockerfile(), re.MULTILINE)
    assert m, "Dockerfile has no ARG BASE_IMAGE default"
    return m.group(1)


def test_dockerfile_defaults_to_a_cuda_13_base_matching_torch():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    assert torch_pin == "torch==2.14.1"  # the cu130 build on PyPI: the base image must be CUDA 13.0
    assert re.fullmatch(
        r"nvidia/cuda:13\.0\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d\d\.04", _default_base_image()
    )


def test_dockerfile_shape():
    text = _dockerfile()
    assert re.search(r"^ARG EXTRAS=gpu$", text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["sbir"\]$', text, re.MULTILINE)
    assert re.search(r'^CMD \["serve"\]$', text, re.MULTILINE)
    assert re.search(r'^VOLUME \["/data"\]$', text, re.MULTILINE)
    user = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert (
        user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    )  # numeric: runAsNonRoot
    # dependencies from pyproject.toml alone, before the code is copied
    deps = text.index('pip install ".[${EXTRAS}]"')
    assert (
        text.index("COPY pyproject.toml")
        < deps
        < text.index("COPY . .")
        < text.index("pip install --no-deps .")
    )


def test_dockerignore_keeps_the_context_small():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "data", "runs", "tests"} <= ignored
    assert not {"pyproject.toml", "README.md", "sbir", "model.ground", "model", "service", "index_builder"} & ignored


def test_faiss_comes_from_exactly_one_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("faiss")]
    extras = project["optional-dependencies"]
    assert [d for d in extras["cpu"] if d.startswith("faiss")] == ["faiss-cpu>=1.8"]
    assert [d for d in extras["gpu"] if d.startswith("faiss")] == ["faiss-gpu>=1.15.1"]
    assert "sbir[cpu]" in extras["dev"]  # make test / make demo install .[dev]


def test_compose_api_and_reindex():
    compose = _compose("compose.yaml")
    api, reindex = compose["services"]["api"], compose["services"]["reindex"]
    for service in (api, reindex):
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
        assert service["volumes"] == ["${SBIR_DATA:-sbir-data}:/data"]
        assert service["init"] is True
        assert service["build"]["args"]["BASE_IMAGE"] == f"${{BASE_IMAGE:-{_default_base_image()}}}"
    assert api["environment"]["SBIR_SNAPSHOT_ROOT"] == "/data/index"
    assert api["restart"] == "unless-stopped"
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["ports"][0].startswith("${SBIR_BIND:-127.0.0.1}:")
    assert "profiles" not in api
    assert reindex["profiles"] == ["reindex"]
    assert reindex["command"][:4] == ["index", "update", "/data/index", "/data/photos"]
    assert reindex["restart"] == "no"


def test_compose_cpu_override_drops_the_gpu():
    override = _compose("compose.cpu.yaml")
    for name in ("api", "reindex"):
        service = override["services"][name]
        assert "deploy" in service and service["deploy"] is None  # `!reset {}`
        assert service["build"]["args"]["EXTRAS"] == "cpu"
    assert "!reset" in (DEPLOY / "compose.cpu.yaml").read_text()


def test_compose_ray_profile_head_gpu_workers_and_a_reindex_job_on_them():
    services = _compose("compose.yaml")["services"]
    head, worker, job = services["ray-head"], services["ray-worker"], services["reindex-ray"]
    for service in (head, worker, job):
        assert service["profiles"] == ["ray"]
        assert service["image"] == "${SBIR_RAY_IMAGE:-sbir-ray:latest}"  # one image for all three
        assert service["build"]["args"]["EXTRAS"].endswith(",ray")
        assert service["volumes"] == ["${SBIR_DATA:-sbir-data}:/data"]  # the photos at one path everywhere
        assert service["environment"]["RAY_AUTH_TOKEN"] == "${SBIR_RAY_TOKEN:-}"
    assert head["command"][:3] == ["start", "--head", "--block"] and head["entrypoint"] == ["ray"]
    assert "deploy" not in head  # the head schedules; no GPU
    assert worker["command"][:4] == ["start", "--address", "ray-head:6379", "--block"]
    gpus = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert job["command"][:4] == ["index", "update", "/data/index", "/data/photos"]
    assert job["command"][job["command"].index("--ray") + 1] == "ray-head:6379"
    cpu = _compose("compose.cpu.yaml")["services"]
    assert cpu["ray-worker"]["deploy"] is None and "--num-gpus" not in cpu["ray-worker"]["command"]
    assert all(
        cpu[name]["build"]["args"]["EXTRAS"] == "cpu,ray"
        for name in ("ray-head", "ray-worker", "reindex-ray")
    )


def test_k8s_rayjob_for_reindexing():
    job = yaml.safe_load((DEPLOY / "k8s" / "ray" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("sbir index update /data/index /data/photos --ray auto")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cluster = job["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    (workers,) = cluster["workerGroupSpecs"]
    (worker,) = workers["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for pod in (head, workers["template"]["spec"]):
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "sbir-data"
        (container,) = pod["containers"]
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
        assert {e["name"] for e in container["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}
    assert _k8s("pvc.yaml")["spec"]["accessModes"] == ["ReadWriteMany"]  # every Ray pod reads the photos
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "ray" / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["rayjob.yaml"]


def test_k8s_deployment_probes_and_gpu():
    deployment = _k8s("deployment.yaml")
    assert deployment["kind"] == "Deployment"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "sbir-data"
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SBIR_SNAPSHOT_ROOT"] == "/data/index"
    # out of the endpoints before SIGTERM, and time left after it for uvicorn's 10 s drain
    (sleep, seconds) = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and 0 < int(seconds) and pod["terminationGracePeriodSeconds"] >= int(seconds) + 10
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_k8s_service_pvc_cronjob():
    service, pvc, cronjob = _k8s("service.yaml"), _k8s("pvc.yaml"), _k8s("cronjob.yaml")
    deployment = _k8s("deployment.yaml")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "sbir-data"
    assert cronjob["kind"] == "CronJob" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:4] == ["index", "update", "/data/index", "/data/photos"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "sbir-data"
    kustomization = _k8s("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in (DEPLOY / "k8s").glob("*.yaml") if p.name != "kustomization.yaml"
    )


@pytest.mark.parametrize("what", ["photos", "sketch"])
def test_smoke_data_helper(tmp_path, what, capsysbinary):
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke_data", DEPLOY / "smoke_data.py")
    smoke_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke_data)
    if what == "photos":
        assert smoke_data.main(["photos", str(tmp_path), "--count", "5", "--size", "32"]) == 0
        assert len(list(tmp_path.glob("*.png"))) == 5
    else:
        assert smoke_data.main(["sketch"]) == 0
        assert capsysbinary.readouterr().out.startswith(b"\x89PNG")


def test_ci_runs_the_docker_smoke_test():
    ci = (ROOT / ".ci" / "run").read_text()
    section = ci[ci.index("# --- Docker deployment smoke test") :]
    assert "make docker-smoke" in section
    assert re.search(
        r"^docker-smoke:\n\tbash deploy/ci-smoke.sh$", (ROOT / "Makefile").read_text(), re.MULTILINE
    )
