"""The deploy files: the compose file's services and profiles, the Kubernetes manifests, and that
the PRM vLLM they start is the one `prm_argv` would start (nothing here runs a container)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tts_server.launch.vllm import prm_argv
from tts_server.settings import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S = DEPLOY / "k8s"
PRM_MODEL, PRM_NAME, PRM_TAG = "Qwen/Qwen2.5-Math-PRM-7B", "Qwen2.5-Math-PRM-7B", 151651


def _flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} in {argv}"
    return argv[argv.index(name) + 1]


def _check_prm_vllm_args(args: list[str], port: int) -> None:
    """The pooling flags `prm_argv` gives the same model (the CPU-only ones aside)."""
    reference = prm_argv(Settings(), PRM_MODEL, PRM_NAME, port, step_tag_id=PRM_TAG)
    for name in ("--model", "--served-model-name", "--runner", "--port"):
        assert _flag(args, name) == _flag(reference, name)
    pooler = json.loads(_flag(args, "--pooler-config"))
    assert pooler == json.loads(_flag(reference, "--pooler-config")) == {"step_tag_id": PRM_TAG}


def _check_worker_args(args: list[str], host: str, port: int) -> None:
    assert _flag(args, "--backend") == "vllm"
    url = urlsplit(_flag(args, "--vllm-url"))
    assert (url.hostname, url.port) == (host, port)
    assert _flag(args, "--model") == PRM_NAME


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _services(compose: dict[str, Any], profile: str | None) -> dict[str, dict[str, Any]]:
    """What `docker compose [--profile P] up` starts: the services without profiles, and P's."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


def test_compose_default_services_are_unchanged_by_the_gpu_profile(
    compose: dict[str, Any],
) -> None:
    default = _services(compose, None)
    assert set(default) == {"policy", "prm", "gateway", "prometheus", "grafana"}
    assert _flag(default["prm"]["command"], "--backend") == "arith"
    assert default["gateway"]["environment"]["TTS_PRM_URL"] == "http://prm:8200"
    gpu = set(_services(compose, "gpu-prm")) - set(default)
    assert gpu == {"prm-vllm", "prm-worker-vllm", "gateway-prm-vllm"}


@pytest.mark.parametrize("profile", [None, "gpu-prm"])
def test_compose_waits_only_on_checked_services_and_ports_do_not_clash(
    compose: dict[str, Any], profile: str | None
) -> None:
    services = _services(compose, profile)
    host_ports: list[str] = []
    for name, service in services.items():
        host_ports += [str(p).split(":")[0] for p in service.get("ports", [])]
        depends = service.get("depends_on", {})
        for other, rule in depends.items() if isinstance(depends, dict) else []:
            assert other in services, f"{name} depends on {other}, not started with {profile}"
            if rule["condition"] == "service_healthy":
                assert services[other].get("healthcheck", {}).get("test"), other
    assert len(host_ports) == len(set(host_ports)), host_ports


def test_compose_gpu_profile_chains_gateway_worker_and_prm_vllm(compose: dict[str, Any]) -> None:
    services = _services(compose, "gpu-prm")
    prm = services["prm-vllm"]
    _check_prm_vllm_args(prm["command"], 8300)
    devices = prm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "8300/health" in " ".join(prm["healthcheck"]["test"])

    worker = services["prm-worker-vllm"]
    _check_worker_args(worker["command"], "prm-vllm", 8300)
    assert worker["depends_on"]["prm-vllm"]["condition"] == "service_healthy"
    # Its health check asks its own port (the image's default asks the gateway's).
    worker_port = _flag(worker["command"], "--port")
    assert f"127.0.0.1:{worker_port}/health" in " ".join(worker["healthcheck"]["test"])

    gateway = services["gateway-prm-vllm"]
    assert gateway["environment"]["TTS_PRM_URL"] == f"http://prm-worker-vllm:{worker_port}"
    assert gateway["environment"]["TTS_POLICY_URL"] == "http://policy:8100"
    assert gateway["depends_on"] == {
        "policy": {"condition": "service_healthy"},
        "prm-worker-vllm": {"condition": "service_healthy"},
    }


def test_compose_config_accepts_the_file_where_docker_compose_exists() -> None:
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0
    ):
        pytest.skip("no `docker compose` here (the YAML checks above still ran)")
    for profile in ([], ["--profile", "gpu-prm"]):
        result = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), *profile, "config", "--quiet"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr


def _manifests(*paths: Path) -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _check_service_selects(service: dict[str, Any], deployment: dict[str, Any]) -> int:
    """The Service reaches the Deployment's pods on a named container port; its port."""
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    [port] = service["spec"]["ports"]
    names = {p["name"] for p in _container(deployment)["ports"]}
    assert port["targetPort"] in names
    number: int = port["port"]
    return number


def test_k8s_gpu_prm_manifests_chain_worker_to_prm_vllm() -> None:
    gpu = _manifests(*(K8S / "gpu-prm").glob("*.yaml"))
    assert set(gpu) == {
        ("Deployment", "tts-prm-vllm"),
        ("Service", "tts-prm-vllm"),
        ("Deployment", "tts-prm"),
        ("Service", "tts-prm"),
    }
    prm = gpu[("Deployment", "tts-prm-vllm")]
    vllm = _container(prm)
    port = _check_service_selects(gpu[("Service", "tts-prm-vllm")], prm)
    _check_prm_vllm_args(vllm["args"], port)
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": "http"}

    worker = gpu[("Deployment", "tts-prm")]
    _check_service_selects(gpu[("Service", "tts-prm")], worker)
    _check_worker_args(_container(worker)["args"], "tts-prm-vllm", port)
    assert _container(worker)["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "nvidia.com/gpu" not in str(_container(worker)["resources"])


def test_k8s_gpu_prm_worker_replaces_the_default_one_for_the_gateway() -> None:
    """Same names, labels, ports, image and resources as ../prm-worker.yaml: only the backend
    differs, so the gateway's TTS_PRM_URL reaches either."""
    default = _manifests(K8S / "prm-worker.yaml")
    gpu = _manifests(K8S / "gpu-prm" / "prm-worker.yaml")
    assert set(gpu) == set(default)
    assert gpu[("Service", "tts-prm")] == default[("Service", "tts-prm")]
    old, new = (
        _container(default[("Deployment", "tts-prm")]),
        _container(gpu[("Deployment", "tts-prm")]),
    )
    for key in ("name", "image", "ports", "readinessProbe", "resources"):
        assert new[key] == old[key], key
    assert _flag(old["args"], "--port") == _flag(new["args"], "--port")
    gateway = _container(_manifests(K8S / "gateway.yaml")[("Deployment", "tts-gateway")])
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    url = urlsplit(env["TTS_PRM_URL"])
    assert (url.hostname, url.port) == (
        "tts-prm",
        default[("Service", "tts-prm")]["spec"]["ports"][0]["port"],
    )


def test_kustomize_builds_each_set_where_kubectl_exists(tmp_path: Path) -> None:
    """kubectl's kustomize parses every manifest and refuses two objects of one name."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl here (the YAML checks above still ran)")
    sets = {
        "default": [K8S / "gateway.yaml", K8S / "prm-worker.yaml"],
        "gpu-prm": [K8S / "gateway.yaml", *sorted((K8S / "gpu-prm").glob("*.yaml"))],
    }
    for name, files in sets.items():
        folder = tmp_path / name
        folder.mkdir()
        for i, path in enumerate(files):
            shutil.copy(path, folder / f"{i}-{path.name}")
        resources = sorted(p.name for p in folder.iterdir())
        (folder / "kustomization.yaml").write_text(yaml.safe_dump({"resources": resources}))
        result = subprocess.run(
            [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        kinds = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(result.stdout)]
        assert ("Deployment", "tts-prm") in kinds
        assert (("Deployment", "tts-prm-vllm") in kinds) == (name == "gpu-prm")
