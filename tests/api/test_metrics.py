"""The gateway's /metrics: FLOPs histograms agree with what clients were told; bounded labels."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import MODEL, EquationPRM, plain_profiles, script, serve
from tts_server.settings import Settings
from tts_server.types import PRMClient, PRMUsage

CANARY_PROMPT = "canary-prompt-7f3a9 Tom has 3 apples and buys 5. How many?"
CANARY_KEY = "sk-canary-key-51c2e"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with open_gateway(
        tmp_path, FakeVLLM(script=script, model=MODEL), EquationPRM()
    ) as client:
        yield client


@asynccontextmanager
async def open_gateway(
    tmp_path: Path, fake: FakeVLLM, prm: PRMClient
) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        policy_model=MODEL,
        prompt_profiles=plain_profiles(tmp_path),
        policy_params=1_000_000,
        prm_params=0,
    )
    async with serve(settings, fake, prm) as (_, client):
        yield client


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (await client.get("/metrics")).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def test_flops_histogram_sums_equal_what_clients_received(
    gateway: httpx.AsyncClient,
) -> None:
    before = await scrape(gateway)
    told = 0
    strategies = ["greedy", "majority", "best_of_n", "beam_search", "dvts", "auto"]
    for strategy in strategies:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": CANARY_PROMPT}],
            "tts": {"strategy": strategy, "budget": 4, "beam_width": 2},
        }
        headers = {"Authorization": f"Bearer {CANARY_KEY}", "X-Request-Id": "req-canary-1"}
        response = await gateway.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 200, response.text
        told += response.json()["tts"]["flops"]["total"]
    after = await scrape(gateway)
    assert told > 0
    grown = total(after, "tts_answer_flops_sum") - total(before, "tts_answer_flops_sum")
    assert grown == told
    answered = total(after, "tts_answer_flops_count") - total(before, "tts_answer_flops_count")
    assert answered == len(strategies)
    ok = [
        (key, value)
        for key, value in after.items()
        if key[0] == "tts_requests_total"
        and ("endpoint", "/v1/chat/completions") in key[1]
        and ("status", "2xx") in key[1]
    ]
    grown_by_strategy = {dict(k[1])["strategy"]: v - before.get(k, 0.0) for k, v in ok}
    assert {s: grown_by_strategy.get(s, 0.0) for s in strategies} == dict.fromkeys(strategies, 1.0)
    assert total(after, "tts_requests_in_flight") == 0
    decisions = "tts_router_decisions_total"
    assert total(after, decisions) - total(before, decisions) == 1


async def test_errors_are_counted_by_status_class_with_bounded_labels(
    gateway: httpx.AsyncClient,
) -> None:
    before = await scrape(gateway)
    headers = {"X-TTS-Strategy": "no-such-thing-" + CANARY_KEY}
    body = {"model": MODEL, "messages": [{"role": "user", "content": CANARY_PROMPT}]}
    response = await gateway.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 400
    after = await scrape(gateway)
    key = (
        "tts_requests_total",
        (("endpoint", "/v1/chat/completions"), ("status", "4xx"), ("strategy", "unknown")),
    )
    assert after[key] - before.get(key, 0.0) == 1


async def test_no_prompt_key_or_request_id_in_metrics(gateway: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": CANARY_PROMPT}],
        "tts": {"strategy": "best_of_n", "budget": 2},
    }
    headers = {"Authorization": f"Bearer {CANARY_KEY}", "X-Request-Id": "req-canary-1"}
    assert (await gateway.post("/v1/chat/completions", json=body, headers=headers)).is_success
    text = (await gateway.get("/metrics")).text
    assert "tts_answer_flops_bucket" in text
    for canary in ("canary-prompt-7f3a9", CANARY_KEY, "req-canary-1"):
        assert canary not in text


class SlowPRM(EquationPRM):
    """EquationPRM taking `delay_s` a call."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def score(
        self,
        question: str,
        solutions: Sequence[Sequence[str]],
        usage: PRMUsage,
        *,
        context: Sequence[int] | None = None,
        affinity: str | None = None,
    ) -> list[list[float]]:
        await asyncio.sleep(self.delay_s)
        return await super().score(question, solutions, usage, context=context)


async def test_stage_seconds_measure_each_stage_and_are_exported(tmp_path: Path) -> None:
    """Each policy call and each PRM call takes at least `delay`: the generation and PRM
    scoring stages are at least that per call made, and, not overlapping, fit in the wall time.
    (Selection is the rest of the wall time by definition: nothing to check there.)"""
    delay = 0.02
    fake = FakeVLLM(script=script, model=MODEL, delay_s=delay)
    prm = SlowPRM(delay)
    async with open_gateway(tmp_path, fake, prm) as gateway:
        before = await scrape(gateway)
        stages_seen: dict[str, set[str]] = {}
        for strategy in ("greedy", "beam_search", "auto"):
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "Tom has 3 apples and buys 5. How many?"}],
                "tts": {"strategy": strategy, "budget": 4, "beam_width": 2},
            }
            prm_calls = prm.calls
            tts = (await gateway.post("/v1/chat/completions", json=body)).json()["tts"]
            stages = tts["stage_seconds"]
            stages_seen[strategy] = set(stages)
            assert all(v >= 0 for v in stages.values())
            policy_calls, prm_calls = tts["policy_tokens"]["calls"], prm.calls - prm_calls
            assert policy_calls >= 1 and tts["prm"]["calls"] == prm_calls
            assert (prm_calls == 0) == (strategy == "greedy")
            # Each call is timed whole (rounded to 0.1 ms); the stages run one after the other.
            assert stages["generation"] >= policy_calls * delay - 1e-4, strategy
            assert stages["prm_scoring"] >= prm_calls * delay - 1e-4, strategy
            assert stages["generation"] + stages["prm_scoring"] <= tts["wall_time_s"] + 2e-4
        assert stages_seen["greedy"] == {"generation", "prm_scoring", "selection"}
        assert stages_seen["auto"] == {"pilot", "generation", "prm_scoring", "selection"}
        after = await scrape(gateway)
    for stage in ("pilot", "generation", "prm_scoring", "selection"):
        key = ("tts_stage_duration_seconds_count", (("stage", stage), ("strategy", "auto")))
        assert after.get(key, 0) - before.get(key, 0) == 1, stage


def test_two_uvicorn_workers_export_one_aggregated_view(tmp_path: Path) -> None:
    """`gateway --workers 2`: whichever worker answers /metrics, it counts both workers' work."""
    from tests.support.faults import ThreadServer
    from tests.support.servers import ServerProcess, cli, free_port
    from tts_server.prm_worker import create_app as create_prm_app
    from tts_server.prm_worker.backends.arith import ArithBackend

    profile = tmp_path / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    fake = FakeVLLM(script=script, model=MODEL)
    with ThreadServer(fake.app()) as vllm, ThreadServer(create_prm_app(ArithBackend())) as prm:
        port = free_port()
        argv = cli(
            "gateway",
            "--port",
            str(port),
            "--workers",
            "2",
            "--policy-url",
            vllm.url,
            "--prm-url",
            prm.url,
            "--policy-model",
            MODEL,
        )
        env = {
            "TTS_PROMPT_PROFILES": json.dumps({MODEL: str(profile)}),
            "TTS_POLICY_PARAMS": "1000000",
            "TTS_PRM_PARAMS": "0",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "multiproc"),
        }
        (tmp_path / "multiproc").mkdir()
        gateway = ServerProcess("gateway-2w", argv, port, tmp_path).start(env)
        try:
            gateway.wait_healthy(60)
            told, requests = 0.0, 0
            multiproc = tmp_path / "multiproc"

            def answered_by() -> set[str]:  # the pids whose histograms hold an answer
                return {f.stem.rsplit("_", 1)[-1] for f in multiproc.glob("histogram_*.db")}

            # A new connection per request, so that both workers answer some; the kernel hands
            # connections to whichever worker accepts first, so send until both have (on a loaded
            # machine one worker took 40 in a row once).
            while requests < 8 or (len(answered_by()) < 2 and requests < 200):
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"Tom has {requests} apples."}],
                    "tts": {"strategy": "best_of_n", "budget": 2},
                }
                response = httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=30)
                assert response.status_code == 200, response.text
                told += response.json()["tts"]["flops"]["total"]
                requests += 1
            workers = answered_by()
            scrapes = [httpx.get(gateway.url + "/metrics", timeout=30).text for _ in range(6)]
        finally:
            gateway.stop()
    # Two workers answered, and every scrape (each on a new connection) saw the sum of both.
    assert len(workers) == 2, (workers, requests)
    for text in scrapes:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert total(samples, "tts_answer_flops_count") == requests
        assert total(samples, "tts_answer_flops_sum") == pytest.approx(told)
