"""The compose file: its services and profiles, the compose-spec schema, and that the vLLMs it
starts are the ones our launcher would start (nothing here runs a container). The Kubernetes side,
the Helm chart and deploy/k8s/, is checked in tests/test_helm.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tts_server.launch.vllm import prm_argv, vllm_argv
from tts_server.settings import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
ROUTER_DOCKERFILE = DEPLOY / "router" / "Dockerfile"
PROFILES = [None, "gpu-prm", "router"]
# Added by the gateway's affinity work (another branch): checked as settings once they exist.
AFFINITY_ENV = {"TTS_AFFINITY_HEADER", "TTS_AFFINITY_SCOPE", "TTS_AFFINITY_RELEASE_URL"}
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
    router = set(_services(compose, "router")) - set(default)
    assert router == {"policy-0", "policy-1", "router", "gateway-router"}


@pytest.mark.parametrize("profile", PROFILES)
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
    for profile in ([], ["--profile", "gpu-prm"], ["--profile", "router"]):
        result = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), *profile, "config", "--quiet"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr


def test_compose_file_validates_against_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    """The compose-spec JSON schema as check-jsonschema vendors it (dev extra, pinned)."""
    vendor = files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    # the schema does catch a broken service
    broken = {"services": {"x": {"image": 3, "restart": "sometimes", "portz": []}}}
    assert list(validator.iter_errors(broken))


def test_compose_services_never_share_a_gpu(compose: dict[str, Any]) -> None:
    """Every profile at once: each GPU service names its own device."""
    seen: dict[str, str] = {}
    for name, service in compose["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        for device in devices.get("devices", []):
            assert "count" not in device, f"{name}: a count can take any GPU; name device_ids"
            for gpu in device["device_ids"]:
                assert gpu not in seen, f"GPU {gpu}: {seen[gpu]} and {name}"
                seen[gpu] = name
    assert set(seen) == {"0", "1", "2", "3"}


def test_compose_router_profile_puts_vllm_router_before_two_policy_replicas(
    compose: dict[str, Any],
) -> None:
    services = _services(compose, "router")
    reference = vllm_argv(Settings(), Path("/model"), 8100)
    replicas = ["policy-0", "policy-1"]
    for name in replicas:
        command = services[name]["command"]
        assert services[name]["image"] == services["policy"]["image"]
        assert _flag(command, "--block-size") == _flag(reference, "--block-size")
        assert "--enable-prompt-tokens-details" in command
        assert _flag(command, "--served-model-name") == _flag(
            services["policy"]["command"], "--served-model-name"
        )
        assert "ports" not in services[name], "only the router calls the replicas"
        assert services[name]["healthcheck"]["test"]

    router = services["router"]
    command = router["command"]
    start = command.index("--worker-urls") + 1
    end = next(i for i in range(start, len(command)) if command[i].startswith("--"))
    workers = [urlsplit(u) for u in command[start:end]]
    assert [(u.hostname, u.port) for u in workers] == [
        (name, int(_flag(services[name]["command"], "--port"))) for name in replicas
    ]
    assert _flag(command, "--policy") == "sticky_least_loaded"
    for name, value in [
        ("--cb-failure-threshold", "2"),
        ("--health-check-interval-secs", "5"),
        ("--health-failure-threshold", "2"),
        ("--log-level", "warning"),
    ]:
        assert _flag(command, name) == value
    assert router["build"] == "../router" and ROUTER_DOCKERFILE.exists()
    assert re.search(r"vllm-router==0\.1\.17\b", ROUTER_DOCKERFILE.read_text())
    assert {r: {"condition": "service_healthy"} for r in replicas} == router["depends_on"]
    router_port = int(_flag(command, "--port"))

    gateway = services["gateway-router"]["environment"]
    policy = urlsplit(gateway["TTS_POLICY_URL"])
    assert (policy.hostname, policy.port) == ("router", router_port)
    assert gateway["TTS_AFFINITY_HEADER"] == "x-session-id"  # the first header vllm-router reads
    assert gateway["TTS_AFFINITY_SCOPE"] in ("request", "subtree")
    release = urlsplit(gateway["TTS_AFFINITY_RELEASE_URL"])
    assert (release.hostname, release.port, release.path) == (
        "router",
        router_port,
        "/finish_session",
    )
    assert services["gateway-router"]["depends_on"]["router"]["condition"] == "service_healthy"


def test_every_compose_gateway_env_var_is_a_setting(compose: dict[str, Any]) -> None:
    fields = {f"TTS_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        if service.get("command", [None])[0] in ("gateway", "prm-worker"):
            unknown = set(service.get("environment", {})) - fields - AFFINITY_ENV
            assert not unknown, f"{name}: {sorted(unknown)}"


def test_compose_file_passes_yamllint() -> None:
    from yamllint import config, linter

    rules = config.YamlLintConfig(
        "extends: default\n"
        "rules:\n"
        "  line-length: {max: 110}\n"  # the commands' flow lists
        "  document-start: disable\n"
        "  comments: {min-spaces-from-content: 1}\n"
    )
    problems = list(linter.run(COMPOSE.read_text(), rules))
    assert not problems, "; ".join(f"{p.line}: {p.desc}" for p in problems)
