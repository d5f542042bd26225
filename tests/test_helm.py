"""The Helm chart (deploy/helm/tts-server), rendered by Helm's own Go SDK (helm-python-sdk) for its
defaults and each example values file: every object validates against the Kubernetes schemas,
the output passes yamllint, deploy/k8s/ is that rendering, and the objects fit together (the
NetworkPolicies, the gateway's settings, the policy's and the PRM's vLLM flags)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter as yamllint_linter

from tts_server.api import metrics
from tts_server.launch.vllm import prm_argv, vllm_argv
from tts_server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
HELM = ROOT / "deploy" / "helm"
CHART = HELM / "tts-server"
README = CHART / "README.md"

_spec = importlib.util.spec_from_file_location("tts_helm_render", HELM / "render.py")
assert _spec and _spec.loader
render_py = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_py)

EXAMPLES = {p.stem: p for p in sorted((HELM / "examples").glob("*.yaml"))}
VALUE_SETS = ["defaults", *EXAMPLES]
# The oldest Kubernetes the chart claims (autoscaling/v2, policy/v1 are GA there) and the newest
# schemas kubernetes-validate ships.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Added by the gateway's affinity work (another branch): checked as settings once they exist.
AFFINITY_ENV = {"TTS_AFFINITY_HEADER", "TTS_AFFINITY_SCOPE", "TTS_AFFINITY_RELEASE_URL"}
YAMLLINT = yamllint_config.YamlLintConfig(
    "extends: default\n"
    "rules:\n"
    "  line-length: {max: 100}\n"
    "  document-start: disable\n"
    "  comments: {min-spaces-from-content: 1}\n"
)
# kubernetes-validate has no CRD schemas: the fields of prometheus-operator's ServiceMonitor
# (monitoring.coreos.com/v1) that this chart sets, with their types.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}

Objects = dict[tuple[str, str], dict[str, Any]]


def values_of(name: str) -> dict[str, Any]:
    return {} if name == "defaults" else render_py.load_values(EXAMPLES[name])


def render_text(values: dict[str, Any]) -> str:
    text: str = render_py.render(values)
    return text


def objects(text: str) -> Objects:
    found: Objects = {}
    for doc in yaml.safe_load_all(text):
        if doc is None:
            continue
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in found, f"two objects {key}"
        found[key] = doc
    return found


def rendered(values: dict[str, Any]) -> Objects:
    return objects(render_text(values))


@pytest.fixture(scope="module", params=VALUE_SETS)
def value_set(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], str]:
    name: str = request.param
    values = values_of(name)
    return name, values, render_text(values)


def merged(values: dict[str, Any]) -> dict[str, Any]:
    """The values the templates saw: the chart's defaults under the given ones."""
    base = yaml.safe_load((CHART / "values.yaml").read_text())
    out: dict[str, Any] = render_py.merge(base, values)
    return out


def component(objs: Objects, kind: str, name: str) -> dict[str, Any]:
    return objs[(kind, f"{render_py.RELEASE}-{name}")]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    [c] = workload["spec"]["template"]["spec"]["containers"]
    out: dict[str, Any] = c
    return out


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} in {argv}"
    return argv[argv.index(name) + 1]


def env_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(workload).get("env", [])}


def service_port(service: dict[str, Any], name: str = "http") -> int:
    [port] = [p for p in service["spec"]["ports"] if p["name"] == name]
    number: int = port["port"]
    return number


def workloads(objs: Objects) -> dict[str, dict[str, Any]]:
    """component label -> Deployment or StatefulSet."""
    return {
        doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: doc
        for (kind, _), doc in objs.items()
        if kind in ("Deployment", "StatefulSet")
    }


# --- rendering and validation ---------------------------------------------------------------


def test_helm_lint_finds_no_errors() -> None:
    result = helm.lint(str(CHART))
    assert result["errors"] == []
    assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]


def test_every_rendered_object_validates_against_the_kubernetes_schemas(
    value_set: tuple[str, dict[str, Any], str],
) -> None:
    name, _, text = value_set
    objs = objects(text)
    assert objs, name
    for (kind, obj_name), doc in objs.items():
        if kind == "ServiceMonitor":
            jsonschema.validate(doc, SERVICE_MONITOR_SCHEMA)
            continue
        for version in KUBE_VERSIONS:
            # strict: unknown fields are errors too; raises on any violation
            kubernetes_validate.validate(doc, version, strict=True)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj_name), obj_name
        assert len(obj_name) <= 63


def test_rendered_output_passes_yamllint(value_set: tuple[str, dict[str, Any], str]) -> None:
    name, _, text = value_set
    problems = list(yamllint_linter.run(text, YAMLLINT))
    assert not problems, f"{name}: " + "; ".join(f"{p.line}: {p.desc}" for p in problems)


def test_chart_values_and_examples_pass_yamllint() -> None:
    files = [CHART / "Chart.yaml", CHART / "values.yaml", *EXAMPLES.values()]
    for path in files:
        problems = list(yamllint_linter.run(path.read_text(), YAMLLINT))
        assert not problems, f"{path.name}: " + "; ".join(f"{p.line}: {p.desc}" for p in problems)


def test_deploy_k8s_is_the_chart_rendered() -> None:
    """`make k8s` regenerates deploy/k8s/ from the chart: nothing there is edited by hand."""
    wanted: dict[Path, str] = render_py.k8s_files()
    assert {p.name for p in wanted} == {p.name for p in render_py.K8S.glob("*.yaml")}
    for path, text in wanted.items():
        assert path.read_text() == text, f"{path.name} is stale: run `make k8s`"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"policy": {"mode": "sglang"}}, "policy.mode must be vllm or external"),
        ({"policy": {"mode": "external"}}, "policy.external.url is required"),
        ({"gateway": {"affinity": {"scope": "session"}}}, "scope must be request or subtree"),
        ({"gateway": {"apiKeys": {"hashes": ["my-secret-key"]}}}, "SHA-256 hex digests"),
        ({"prm": {"backend": "hf"}}, "prm.backend must be arith or vllm"),
        ({"prm": {"backend": "vllm", "vllm": {"deploy": False}}}, "prm.vllm.url is required"),
    ],
)
def test_invalid_values_fail_to_render_with_a_reason(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render_text(values)


# --- the gateway ------------------------------------------------------------------------------


def test_every_gateway_env_var_is_a_setting(value_set: tuple[str, dict[str, Any], str]) -> None:
    _, _, text = value_set
    fields = {f"TTS_{name.upper()}" for name in Settings.model_fields}
    names = set(env_of(component(objects(text), "Deployment", "gateway")))
    unknown = names - fields - AFFINITY_ENV
    assert not unknown, f"not settings of tts_server/settings.py: {sorted(unknown)}"


def test_the_affinity_env_vars_are_settings_once_the_gateway_has_them() -> None:
    missing = {n for n in AFFINITY_ENV if n[4:].lower() not in Settings.model_fields}
    if missing:
        pytest.skip(f"the gateway has no {sorted(missing)} yet (the affinity branch adds them)")


def test_gateway_probes_and_graceful_drain(value_set: tuple[str, dict[str, Any], str]) -> None:
    _, values, text = value_set
    gateway = component(objects(text), "Deployment", "gateway")
    c = container(gateway)
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    drain = float(env_of(gateway)["TTS_DRAIN_TIMEOUT_S"]["value"])
    assert gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain
    assert flag(c["args"], "--port") == str(merged(values)["gateway"]["port"])


def test_gateway_calls_the_policy_router_and_releases_its_pins(
    value_set: tuple[str, dict[str, Any], str],
) -> None:
    _, values, text = value_set
    objs = objects(text)
    env = env_of(component(objs, "Deployment", "gateway"))
    v = merged(values)
    assert env["TTS_AFFINITY_HEADER"]["value"] == v["gateway"]["affinity"]["header"]
    assert env["TTS_AFFINITY_SCOPE"]["value"] in ("request", "subtree")
    policy = urlsplit(env["TTS_POLICY_URL"]["value"])
    if v["policy"]["mode"] == "vllm":
        router = component(objs, "Service", "router")
        assert (policy.hostname, policy.port) == (router["metadata"]["name"], service_port(router))
        release = urlsplit(env["TTS_AFFINITY_RELEASE_URL"]["value"])
        assert (release.hostname, release.port, release.path) == (
            policy.hostname,
            policy.port,
            "/finish_session",
        )
        # vllm-router pins by x-session-id (then x-user-id, ...): the header must be one it reads.
        assert env["TTS_AFFINITY_HEADER"]["value"] == "x-session-id"
    else:
        assert env["TTS_POLICY_URL"]["value"] == v["policy"]["external"]["url"]
        assert ("TTS_AFFINITY_RELEASE_URL" in env) == bool(v["gateway"]["affinity"]["releaseUrl"])
        assert not [k for k in objs if k[0] == "StatefulSet" or k[1].endswith("-router")]
    prm = urlsplit(env["TTS_PRM_URL"]["value"])
    prm_service = component(objs, "Service", "prm")
    assert (prm.hostname, prm.port) == (prm_service["metadata"]["name"], service_port(prm_service))


def test_hpa_scales_the_gateway_on_its_in_flight_gauge(
    value_set: tuple[str, dict[str, Any], str],
) -> None:
    _, _, text = value_set
    objs = objects(text)
    hpa = component(objs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", f"{render_py.RELEASE}-gateway")
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    # the gauge the gateway exports (a Gauge's exposition name is its own name)
    assert metric["pods"]["metric"]["name"] == metrics.IN_FLIGHT._name == "tts_requests_in_flight"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert float(metric["pods"]["target"]["averageValue"]) > 0
    # the HPA owns the replica count
    assert "replicas" not in component(objs, "Deployment", "gateway")["spec"]


def test_hpa_off_gives_the_deployment_its_replicas() -> None:
    objs = rendered({"gateway": {"autoscaling": {"enabled": False}, "replicas": 3}})
    assert not [k for k in objs if k[0] == "HorizontalPodAutoscaler"]
    assert component(objs, "Deployment", "gateway")["spec"]["replicas"] == 3


def test_pdbs_select_the_gateway_and_policy_pods(
    value_set: tuple[str, dict[str, Any], str],
) -> None:
    _, _, text = value_set
    objs = objects(text)
    pods = workloads(objs)
    pdbs = [d for (kind, _), d in objs.items() if kind == "PodDisruptionBudget"]
    covered = {
        name
        for pdb in pdbs
        for name, w in pods.items()
        if selects(pdb["spec"]["selector"]["matchLabels"], pod_labels(w))
    }
    assert "gateway" in covered
    assert ("policy" in covered) == ("policy" in pods)
    gateway_pdb = component(objs, "PodDisruptionBudget", "gateway")
    assert gateway_pdb["spec"]["minAvailable"] >= 1


def test_service_monitor_only_when_asked_and_it_scrapes_the_gateway() -> None:
    assert not [k for k in rendered({}) if k[0] == "ServiceMonitor"]
    objs = rendered({"gateway": {"serviceMonitor": {"enabled": True, "labels": {"r": "p"}}}})
    monitor = component(objs, "ServiceMonitor", "gateway")
    service = component(objs, "Service", "gateway")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert not selects(
        monitor["spec"]["selector"]["matchLabels"],
        component(objs, "Service", "prm")["metadata"]["labels"],
    )
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["r"] == "p"
    # The router's own metrics too, on its metrics port (with the project's vLLM behind it).
    router_monitor = component(objs, "ServiceMonitor", "router")
    router_service = component(objs, "Service", "router")
    assert selects(
        router_monitor["spec"]["selector"]["matchLabels"], router_service["metadata"]["labels"]
    )
    [router_endpoint] = router_monitor["spec"]["endpoints"]
    ports = {p["name"]: p["port"] for p in router_service["spec"]["ports"]}
    assert ports[router_endpoint["port"]] == router_service["spec"]["ports"][1]["port"]
    assert router_endpoint["port"] == "metrics" and router_monitor["metadata"]["labels"]["r"] == "p"


def test_api_key_digests_come_from_a_secret() -> None:
    digests = ["a" * 64, "0123456789abcdef" * 4]
    objs = rendered({"gateway": {"apiKeys": {"hashes": digests}}})
    ref = env_of(component(objs, "Deployment", "gateway"))["TTS_API_KEY_HASHES"]
    assert "value" not in ref
    key = ref["valueFrom"]["secretKeyRef"]
    secret = objs[("Secret", key["name"])]
    assert secret["stringData"][key["key"]].split(",") == digests
    # comma-separated, as Settings reads them
    assert Settings(api_key_hashes=secret["stringData"][key["key"]]).key_hashes == digests

    objs = rendered({"gateway": {"apiKeys": {"existingSecret": "mine", "secretKey": "k"}}})
    ref = env_of(component(objs, "Deployment", "gateway"))["TTS_API_KEY_HASHES"]
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "k"}
    assert not [k for k in objs if k[0] == "Secret"]

    assert "TTS_API_KEY_HASHES" not in env_of(component(rendered({}), "Deployment", "gateway"))


# --- the network policies ---------------------------------------------------------------------


def _admitted(objs: Objects, target: dict[str, Any]) -> list[tuple[dict[str, Any], set[int]]]:
    """(peer, ports) for every ingress rule of every NetworkPolicy that selects the target."""
    rules = []
    for (kind, _), policy in objs.items():
        if kind != "NetworkPolicy" or not selects(
            policy["spec"]["podSelector"]["matchLabels"], pod_labels(target)
        ):
            continue
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), "a rule without `from` admits every pod"
            assert rule.get("ports"), "a rule without `ports` admits every port"
            ports = {p["port"] for p in rule["ports"]}
            rules += [(peer, ports) for peer in rule["from"]]
    return rules


def test_network_policies_admit_only_the_gateway_to_the_policy_and_the_prm(
    value_set: tuple[str, dict[str, Any], str],
) -> None:
    name, values, text = value_set
    objs = objects(text)
    pods = workloads(objs)
    metrics_from = merged(values)["networkPolicy"]["metricsFrom"]
    # who may call whom: the gateway the router and the PRM worker, the router the policy
    # replicas, the PRM worker its vLLM; nothing reaches the policy or the PRM but the gateway
    callers = {"router": "gateway", "prm": "gateway", "policy": "router", "prm-vllm": "prm"}
    for target, caller in callers.items():
        if target not in pods:
            continue
        admitted = _admitted(objs, pods[target])
        assert admitted, f"{name}: no NetworkPolicy selects the {target} pods"
        service = component(objs, "Service", target)
        api_port = container(pods[target])["ports"][0]["containerPort"]
        assert service["spec"]["ports"][0]["targetPort"] == "http"
        for peer, ports in admitted:
            if "podSelector" in peer and "namespaceSelector" not in peer:
                # exactly the caller's pods, and no other component's
                labels = peer["podSelector"]["matchLabels"]
                assert selects(labels, pod_labels(pods[caller])), (target, labels)
                others = [
                    c for c, w in pods.items() if c != caller and selects(labels, pod_labels(w))
                ]
                assert not others, (target, others)
                assert ports == {api_port}
            else:
                assert peer in metrics_from, f"{name}: {target} admits {peer}"
    # the gateway's own pods are the only ones that reach the PRM worker and the router
    for target in ("prm", "router"):
        if target in pods:
            callers_seen = {
                c
                for peer, _ in _admitted(objs, pods[target])
                if "podSelector" in peer
                for c, w in pods.items()
                if selects(peer["podSelector"]["matchLabels"], pod_labels(w))
            }
            assert callers_seen == {"gateway"}


def test_network_policies_can_be_left_out() -> None:
    objs = rendered({"networkPolicy": {"enabled": False}})
    assert not [k for k in objs if k[0] == "NetworkPolicy"]


# --- the policy: vLLM StatefulSet behind vllm-router ------------------------------------------


def own_policy(
    value_set: tuple[str, dict[str, Any], str],
) -> tuple[dict[str, Any], Objects, dict[str, Any]]:
    """(merged values, rendered objects, the policy StatefulSet) of a value set whose policy is
    the chart's own vLLM; skips the others."""
    _, values, text = value_set
    v = merged(values)
    if v["policy"]["mode"] != "vllm":
        pytest.skip("the policy is an external router here")
    objs = objects(text)
    return v, objs, component(objs, "StatefulSet", "policy")


def test_policy_replicas_run_with_the_launchers_flags_and_gpus(
    value_set: tuple[str, dict[str, Any], str],
) -> None:
    v, objs, policy = own_policy(value_set)
    c = container(policy)
    args = c["args"]
    reference = vllm_argv(Settings(), Path("/model"), 8100)
    assert flag(args, "--block-size") == flag(reference, "--block-size") == "32"
    for name in ("--enable-prompt-tokens-details", "--disable-uvicorn-access-log"):
        assert name in args and name in reference
    assert flag(args, "--model") == v["policy"]["vllm"]["model"]
    gateway_env = env_of(component(objs, "Deployment", "gateway"))
    assert flag(args, "--served-model-name") == gateway_env["TTS_POLICY_MODEL"]["value"]
    assert policy["spec"]["replicas"] == v["policy"]["vllm"]["replicas"]
    gpus = v["policy"]["vllm"]["gpus"]
    resources = c["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
    assert resources["limits"]["nvidia.com/gpu"] == gpus >= 1
    headless = component(objs, "Service", "policy")
    assert headless["spec"]["clusterIP"] == "None"
    assert policy["spec"]["serviceName"] == headless["metadata"]["name"]
    assert selects(headless["spec"]["selector"], pod_labels(policy))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}


def test_router_lists_every_policy_replica_with_the_measured_flags(
    value_set: tuple[str, dict[str, Any], str],
) -> None:
    _, objs, policy = own_policy(value_set)
    headless = policy["spec"]["serviceName"]
    port = service_port(component(objs, "Service", "policy"))
    router = container(component(objs, "Deployment", "router"))
    args = router["args"]
    start = args.index("--worker-urls") + 1
    end = next(i for i in range(start, len(args)) if args[i].startswith("--"))
    replicas = policy["spec"]["replicas"]
    name = policy["metadata"]["name"]
    assert args[start:end] == [f"http://{name}-{i}.{headless}:{port}" for i in range(replicas)]
    assert flag(args, "--policy") == "sticky_least_loaded"
    assert flag(args, "--cb-failure-threshold") == "2"
    assert flag(args, "--health-check-interval-secs") == "5"
    assert flag(args, "--health-failure-threshold") == "2"
    assert flag(args, "--log-level") == "warning"
    assert flag(args, "--host") == flag(args, "--prometheus-host") == "0.0.0.0"
    router_service = component(objs, "Service", "router")
    assert service_port(router_service) == int(flag(args, "--port"))
    assert service_port(router_service, "metrics") == int(flag(args, "--prometheus-port"))
    assert router["readinessProbe"]["httpGet"]["port"] == "http"


def test_router_image_is_the_one_deploy_router_builds() -> None:
    dockerfile = (ROOT / "deploy" / "router" / "Dockerfile").read_text()
    [pin] = re.findall(r"vllm-router==([0-9.]+)", dockerfile)
    image = merged({})["router"]["image"]
    assert image.endswith(f":{pin}") and pin == "0.1.17"


# --- the PRM ----------------------------------------------------------------------------------


def test_default_prm_worker_is_arith_without_a_gpu() -> None:
    objs = rendered({})
    worker = container(component(objs, "Deployment", "prm"))
    assert flag(worker["args"], "--backend") == "arith"
    assert not [k for k in objs if k[1].endswith("-prm-vllm")]
    assert "nvidia.com/gpu" not in str(worker["resources"])


def test_vllm_prm_chains_worker_to_a_pooling_vllm() -> None:
    objs = rendered(values_of("vllm-router"))
    prm = component(objs, "Deployment", "prm-vllm")
    vllm = container(prm)
    service = component(objs, "Service", "prm-vllm")
    port = service_port(service)
    assert selects(service["spec"]["selector"], pod_labels(prm))
    reference = prm_argv(
        Settings(), "Qwen/Qwen2.5-Math-PRM-7B", "Qwen2.5-Math-PRM-7B", port, step_tag_id=151651
    )
    for name in ("--model", "--served-model-name", "--runner", "--port"):
        assert flag(vllm["args"], name) == flag(reference, name), name
    pooler = json.loads(flag(vllm["args"], "--pooler-config"))
    assert pooler == json.loads(flag(reference, "--pooler-config")) == {"step_tag_id": 151651}
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert vllm["resources"]["requests"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": "http"}

    worker = container(component(objs, "Deployment", "prm"))
    assert flag(worker["args"], "--backend") == "vllm"
    url = urlsplit(flag(worker["args"], "--vllm-url"))
    assert (url.hostname, url.port) == (service["metadata"]["name"], port)
    assert flag(worker["args"], "--model") == "Qwen2.5-Math-PRM-7B"
    assert "nvidia.com/gpu" not in str(worker["resources"])


def test_the_vllm_prm_worker_replaces_the_arith_one_for_the_gateway() -> None:
    """Same Service, labels, port and image: only the backend differs, so the gateway's
    TTS_PRM_URL reaches either."""
    arith, gpu = rendered({}), rendered(values_of("vllm-router"))
    assert component(arith, "Service", "prm") == component(gpu, "Service", "prm")
    old = container(component(arith, "Deployment", "prm"))
    new = container(component(gpu, "Deployment", "prm"))
    for key in ("name", "image", "ports", "readinessProbe", "livenessProbe", "resources"):
        assert new[key] == old[key], key


def test_an_external_prm_vllm_is_used_as_given() -> None:
    url = "http://prm.gpu.svc:8300"
    objs = rendered({"prm": {"backend": "vllm", "vllm": {"deploy": False, "url": url}}})
    assert flag(container(component(objs, "Deployment", "prm"))["args"], "--vllm-url") == url
    assert not [k for k in objs if k[1].endswith("-prm-vllm")]


# --- the README -------------------------------------------------------------------------------


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("requests", "limits", "labels"):
            out += _leaves(value, f"{path}.")
        else:
            out.append(path)
    return out


def test_the_readme_documents_every_value() -> None:
    readme = README.read_text()
    rows = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    leaves = _leaves(yaml.safe_load((CHART / "values.yaml").read_text()))
    documented = {leaf for leaf in leaves if leaf in rows or leaf.rsplit(".", 1)[0] in rows}
    assert set(leaves) == documented, sorted(set(leaves) - documented)
    assert rows <= set(leaves) | {leaf.rsplit(".", 1)[0] for leaf in leaves}, sorted(
        rows - set(leaves)
    )


def test_the_readme_shows_each_example_values_file_as_it_is() -> None:
    readme = README.read_text()
    blocks = re.findall(r"```yaml\n# examples/([a-z-]+)\.yaml\n(.*?)```", readme, flags=re.S)
    shown = {name: body for name, body in blocks}
    assert set(shown) == set(EXAMPLES)
    for name, path in EXAMPLES.items():
        assert shown[name] == path.read_text(), name
