"""A real Prometheus scraping the real stack (gateway, PRM worker, vLLM, and a real vllm-router in
front of that vLLM): every dashboard panel's PromQL and every alert rule is evaluated through
Prometheus' HTTP API.

Prometheus comes from Debian's package (`make prometheus`, part of `make test`).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import Stack
from tests.support.servers import ServerProcess, free_port
from tts_server.launch.replicas import plan_replicas
from tts_server.settings import Settings
from tts_server.tools.dashboards import every_query, substitute

# promtool needs no server, but it comes with the Prometheus package that only `make test`
# installs, so it is marked like the rest. The checks that need neither live in tests/tools/.
integration = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CANARY = "prom-canary-3d1e Tom has 3 apples and buys 5 more. How many?"
WINDOW = "5m"


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run `make prometheus` (Debian package prometheus)")
    return found


@integration
def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    promtool = _binary("promtool")
    for args in (
        ["check", "config", str(DEPLOY / "prometheus/prometheus.yml")],
        ["check", "rules", str(DEPLOY / "prometheus/alerts.yml")],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@dataclass
class Router:
    url: str
    metrics_url: str


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=30)
        body: dict[str, Any] = response.json()
        return body

    def value(self, expr: str) -> float:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for(self, expr: str, wanted: float, timeout_s: float = 60) -> float:
        deadline = time.monotonic() + timeout_s
        seen = self.value(expr)
        while time.monotonic() < deadline and abs(seen - wanted) > 1e-6 * max(1.0, wanted):
            time.sleep(0.5)
            seen = self.value(expr)
        return seen


def scrape_config(stack: Stack, router_metrics: str, rules: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the test's targets and a 1 s interval. The stack's
    one vLLM stands behind the router (there are no other replicas to scrape)."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(rules)]
    targets = {
        "tts-gateway": stack.gateway_url,
        "tts-prm-worker": stack.prm_url,
        "vllm": stack.policy_url,
        "vllm-router": router_metrics,
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == {*targets, "vllm-replicas"}
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] in targets]
    for job in config["scrape_configs"]:
        address = targets[job["job_name"]].removeprefix("http://")
        job["static_configs"] = [{"targets": [address]}]
    return config


@pytest.fixture(scope="module")
def router(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """A real vllm-router (`make install-router`) in front of the stack's vLLM, as
    `tts-server up --replicas K` starts it (with one replica)."""
    folder = tmp_path_factory.mktemp("router")
    port, metrics_port = free_port(), free_port()
    plan = plan_replicas(
        Settings(policy_port=port, policy_replicas=1, router_prometheus_port=metrics_port)
    )
    argv = list(plan.router_argv)
    argv[argv.index("--worker-urls") + 1] = stack.policy_url
    server = ServerProcess("vllm-router", argv, port, folder).start()
    try:
        server.wait_healthy(60)
        yield Router(server.url, f"http://127.0.0.1:{metrics_port}")
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prometheus(
    stack: Stack, router: Router, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = _binary("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    alerts = DEPLOY / "prometheus/alerts.yml"
    config.write_text(yaml.safe_dump(scrape_config(stack, router.metrics_url, alerts)))
    port = free_port()
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    server = ServerProcess("prometheus", argv, port, folder).start()
    try:
        server.wait_healthy(60, path="/-/ready")
        prom = Prometheus(server.url)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and prom.value("count(up == 1)") < 4:
            time.sleep(0.5)
        assert prom.value("count(up == 1)") == 4, prom.query("up")
        yield prom
    finally:
        server.stop()


def send(stack: Stack, strategy: str, content: str = CANARY) -> httpx.Response:
    body = {
        "model": stack.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 48,
        "tts": {"strategy": strategy, "budget": 2, "beam_width": 2},
    }
    return httpx.post(
        f"{stack.gateway_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": "Bearer sk-prom-canary-key"},
        timeout=600,
    )


def through_router(stack: Stack, router: Router) -> None:
    """A short generation through the router, pinned like the gateway's calls."""
    body = {"model": stack.model, "prompt": CANARY, "max_tokens": 4, "temperature": 0}
    headers = {"x-session-id": "prom-test-session"}
    response = httpx.post(f"{router.url}/v1/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def traffic(stack: Stack, router: Router, prometheus: Prometheus) -> float:
    """Every strategy (plus a client error), twice; returns the FLOPs the clients were told.

    Twice, because a labelled series is born with its first observation already counted, so
    rate() sees nothing until the second: a panel is only worth something under ongoing traffic.
    """
    flops_sum = "sum(tts_answer_flops_sum)"
    before = prometheus.value(flops_sum)
    told = 0.0
    for _ in range(2):
        for strategy in ("greedy", "majority", "best_of_n", "beam_search", "dvts", "auto"):
            response = send(stack, strategy)
            assert response.status_code == 200, response.text
            told += response.json()["tts"]["flops"]["total"]
        assert send(stack, "no-such-strategy").status_code == 400
        through_router(stack, router)
        seen = prometheus.wait_for(flops_sum, before + told)
        assert seen == pytest.approx(before + told, rel=1e-9)
    time.sleep(3)  # a few more scrapes, so that rate() over the window has two points after it
    return told


def problems_of(prometheus: Prometheus, expr: str) -> str | None:
    """Why a panel query is not fine (does not parse, returns no number), or None."""
    body = prometheus.query(substitute(expr, WINDOW))
    if body.get("status") != "success":
        return f"error: {body.get('error')}"
    values = [float(r["value"][1]) for r in body["data"]["result"]]
    if not any(math.isfinite(v) for v in values):
        return f"no data ({len(values)} series, none finite)"
    return None


@integration
def test_flops_sum_in_prometheus_equals_what_clients_were_told(traffic: float) -> None:
    assert traffic > 0  # the equality itself is asserted when the traffic is sent


@integration
def test_every_dashboard_query_parses_and_returns_data(
    prometheus: Prometheus, traffic: float
) -> None:
    queries = every_query()
    assert len(queries) >= 20
    failures = {
        f"{uid} / {title}: {expr}": problem
        for uid, title, expr in queries
        if (problem := problems_of(prometheus, expr)) is not None
    }
    assert failures == {}


@integration
def test_a_query_naming_a_metric_we_do_not_export_is_caught(
    prometheus: Prometheus, traffic: float
) -> None:
    assert problems_of(prometheus, "sum(rate(tts_no_such_metric_total[$__rate_interval]))")
    assert problems_of(prometheus, "sum(rate(tts_requests_total[5m]") is not None  # no parse


@integration
def test_every_alert_rule_parses_and_is_evaluated_healthy(
    prometheus: Prometheus, traffic: float
) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert len(expressions) >= 6
    for expr in expressions:
        assert prometheus.query(expr)["status"] == "success", expr
    # Prometheus itself loaded the file and evaluated every rule without error.
    deadline = time.monotonic() + 30
    loaded: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        if len(loaded) == len(expressions) and all(r.get("health") == "ok" for r in loaded):
            break
        time.sleep(0.5)
    assert len(loaded) == len(expressions)
    assert {r["name"]: r.get("health") for r in loaded} == {r["name"]: "ok" for r in loaded}


@integration
def test_no_prompt_or_key_in_any_scraped_metric(
    stack: Stack, router: Router, prometheus: Prometheus, traffic: float
) -> None:
    for url in (stack.gateway_url, stack.prm_url, router.metrics_url):
        text = httpx.get(f"{url}/metrics", timeout=10).text
        assert "prom-canary" not in text and "sk-prom-canary-key" not in text
    # Nor in any label value Prometheus stored.
    names = httpx.get(f"{prometheus.url}/api/v1/label/__name__/values", timeout=10).json()
    assert not any("canary" in name for name in names["data"])
    for label in ("strategy", "difficulty", "model", "status", "endpoint", "routed_strategy"):
        values = httpx.get(f"{prometheus.url}/api/v1/label/{label}/values", timeout=10).json()
        assert not any("canary" in v for v in values["data"]), label


@integration
def test_report_draws_every_panel_with_data(
    prometheus: Prometheus, traffic: float, tmp_path: Path
) -> None:
    out = tmp_path / "report.png"
    argv = [sys.executable, "-m", "tts_server.cli", "report", "--prometheus", prometheus.url]
    done = subprocess.run(
        [*argv, "--since", "10m", "--window", WINDOW, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 without data" in done.stdout, done.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 20_000
