"""The gateway behind a real vllm-router (0.1.17, `make install-router`) in front of two fake
vLLM replicas, all on 127.0.0.1: the router pins on the gateway's affinity key, spreads the
requests' sessions, accepts their release, and when a replica dies under load no request fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.fake_vllm import FakeVLLM
from tests.support.faults import ThreadServer
from tests.support.gateway import MODEL, EquationPRM, chat, script
from tests.support.servers import ServerProcess, free_port
from tts_server.api.app import create_app
from tts_server.launch.replicas import plan_replicas
from tts_server.settings import Settings

pytestmark = pytest.mark.integration


@dataclass
class Routed:
    gateway: ThreadServer
    fakes: list[FakeVLLM]
    servers: list[ThreadServer]
    router: ServerProcess
    metrics_url: str


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[Routed]:
    settings = Settings()
    if not settings.router_bin.exists():
        pytest.fail(f"vllm-router is missing ({settings.router_bin}): run `make install`")
    fakes = [FakeVLLM(script=script, model=MODEL, delay_s=0.05) for _ in range(2)]
    servers = [ThreadServer(f.app()).start() for f in fakes]
    port, metrics_port = free_port(), free_port()
    plan = plan_replicas(
        Settings(policy_port=port, policy_replicas=2, router_prometheus_port=metrics_port)
    )
    argv = list(plan.router_argv)
    at = argv.index("--worker-urls") + 1
    argv[at : at + 2] = [s.url for s in servers]  # the fakes, not the planned replicas
    router = ServerProcess("vllm-router", argv, port, tmp_path).start()
    profile = tmp_path / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    config = Settings(
        policy_model=MODEL,
        prompt_profiles={MODEL: str(profile)},
        policy_url=router.url,
        affinity_release_url=f"{router.url}/finish_session",
        retry_backoff_s=0.05,
        upstream_retries=3,
    )
    gateway = None
    try:
        router.wait_healthy(30)
        gateway = ThreadServer(create_app(config, prm=EquationPRM())).start()
        yield Routed(gateway, fakes, servers, router, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        if gateway is not None:
            gateway.stop()
        router.stop()
        for server in servers:
            server.stop()


def ask(url: str, strategy: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=chat(strategy, 4), timeout=60)


def completions_keys(fake: FakeVLLM) -> list[str | None]:
    return [k for p, k in fake.keys if p == "/v1/completions"]


def released_ok(url: str) -> float:
    """The gateway's count of releases the router answered ok (the registry is per process: other
    tests in this pytest process add to it, so compare a difference)."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('tts_affinity_releases_total{outcome="ok"} '):
            return float(line.split()[1])
    return 0.0


def test_the_router_pins_each_request_to_one_replica_and_spreads_them(routed: Routed) -> None:
    before = released_ok(routed.gateway.url)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda s: ask(routed.gateway.url, s), ["beam_search", "dvts"] * 4))
    assert [a.status_code for a in answers] == [200] * 8
    on = [set(completions_keys(f)) for f in routed.fakes]
    assert None not in on[0] | on[1]
    assert len(on[0] | on[1]) == 8  # a key per request
    assert not on[0] & on[1]  # no request's calls on both replicas
    assert on[0] and on[1]  # and the requests on both
    # Releases run in the background after each answer: wait for the last ones (up to 10 s).
    deadline = time.monotonic() + 10
    while released_ok(routed.gateway.url) - before < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert released_ok(routed.gateway.url) - before == 8  # the router said ok, once per request


def test_a_replica_dying_under_load_fails_no_request(routed: Routed) -> None:
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(ask, routed.gateway.url, "beam_search") for _ in range(8)]
        while sum(len(completions_keys(f)) for f in routed.fakes) < 12:
            time.sleep(0.01)
        routed.servers[0].stop()  # replica 0 dies mid-search
        answers = [p.result() for p in pending]
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    moved = set(completions_keys(routed.fakes[0])) & set(completions_keys(routed.fakes[1]))
    assert moved  # some searches went on on replica 1
    text = httpx.get(routed.metrics_url).text
    assert "vllm_router_cb_state" in text
