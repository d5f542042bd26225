"""Quotas shared through a real Redis (Debian's redis-server on a free loopback port, started
and stopped here by PID): two gateways share one key's budget exactly, also under concurrent
requests; the headers count down across them; a FLOPs quota spent at one caps max_flops at the
other; the counters' names hold no key and expire; Redis stopped mid-test fails open or closed
as set, logged once."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis

from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import EquationPRM, chat, gateway_with, script
from tests.support.redis_server import RedisServer
from tts_server.api import quotas
from tts_server.api.reliability import hash_key

pytestmark = pytest.mark.integration

KEY = "sk-redis-quota-5d1a"
PROMPT_MARK = "apples"  # in every test prompt: must appear in no Redis key or value


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def frozen(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The quota clock, 30 s into a minute a little ahead (Redis expires counters by the real
    clock: their windows must lie in the future)."""
    now = [(math.floor(time.time() / 60) + 2) * 60 + 30.0]
    monkeypatch.setattr(quotas, "clock", lambda: now[0])
    return now


@asynccontextmanager
async def gateways(
    tmp_path: Path, count: int, **settings: Any
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` gateway apps (as separate workers or replicas would be), each over its own fake
    vLLM, all counting in the same Redis."""
    async with AsyncExitStack() as stack:
        clients = []
        for i in range(count):
            folder = tmp_path / f"gw{i}"
            folder.mkdir()
            fake = FakeVLLM(script=script, model="fake-model")
            values = {"api_key_hashes": hash_key(KEY), **settings}
            clients.append(
                await stack.enter_async_context(gateway_with(fake, EquationPRM(), folder, **values))
            )
        yield clients
        for client in clients:  # the apps' Redis clients (no lifespan under ASGITransport)
            await client._transport.app.state.quotas.aclose()  # type: ignore[attr-defined]


async def post(client: httpx.AsyncClient, **extra: Any) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        json=chat("greedy", 1, **extra),
        headers={"Authorization": f"Bearer {KEY}"},
    )


async def test_two_gateways_share_one_keys_budget_exactly(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with gateways(tmp_path, 2, redis_url=redis_server.url, quota_requests_per_minute=5) as (
        a,
        b,
    ):
        answers = [await post(a if i % 2 == 0 else b) for i in range(8)]
    assert [r.status_code for r in answers] == [200] * 5 + [429] * 3
    # The headers count down across both gateways.
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers] == [
        "4",
        "3",
        "2",
        "1",
        "0",
        "0",
        "0",
        "0",
    ]
    assert all(r.headers["x-ratelimit-reset-requests"] == "30s" for r in answers)
    assert all(r.headers["retry-after"] == "30" for r in answers[5:])
    # The counters: named by the key's hash prefix, expiring, no key and no prompt.
    redis = Redis.from_url(redis_server.url)
    names = [n.decode() for n in redis.keys("*")]
    label = hash_key(KEY)[:16]
    assert names and all(n.startswith(f"tts:quota:{label}:") for n in names)
    # Expiring a window after their own ends (which the frozen clock puts 2-3 minutes ahead).
    assert all(0 < redis.ttl(n) <= 5 * 60 for n in names if ":requests:" in n)
    for name in names:
        text = name + (redis.get(name) or b"").decode()
        assert KEY not in text and PROMPT_MARK not in text
    redis.close()


async def test_concurrent_requests_at_two_gateways_take_exactly_the_budget(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with gateways(tmp_path, 2, redis_url=redis_server.url, quota_requests_per_minute=7) as (
        a,
        b,
    ):
        answers = await asyncio.gather(*(post(a if i % 2 else b) for i in range(20)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] * 7 + [429] * 13
    left = sorted(
        int(r.headers["x-ratelimit-remaining-requests"]) for r in answers if r.status_code == 200
    )
    assert left == [0, 1, 2, 3, 4, 5, 6]  # each admitted request saw its own count


async def test_flops_spent_at_one_gateway_cap_max_flops_at_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    budget = 2_000_000_000
    settings = {
        "redis_url": redis_server.url,
        "quota_flops_per_minute": budget,
        "quota_tokens_per_minute": 100_000,
        "policy_params": 1_000_000,
        "prm_params": 0,
    }
    async with gateways(tmp_path, 2, **settings) as (a, b):
        first = await post(a)
        used = first.json()["tts"]["flops"]["total"]
        tokens = first.json()["usage"]["total_tokens"]
        assert int(first.headers["x-ratelimit-remaining-flops"]) == budget - used
        second = await post(b)
    assert second.json()["tts"]["max_flops"] == budget - used
    assert (
        int(second.headers["x-ratelimit-remaining-tokens"])
        == 100_000 - tokens - second.json()["usage"]["total_tokens"]
    )
    assert (
        int(second.headers["x-ratelimit-remaining-flops"])
        == budget - used - second.json()["tts"]["flops"]["total"]
    )


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_stopped_mid_test_fails_open_or_closed_logged_once(
    tmp_path: Path, redis_server: RedisServer, fail_open: bool, caplog: pytest.LogCaptureFixture
) -> None:
    settings = {
        "redis_url": redis_server.url,
        "quota_requests_per_minute": 3,
        "quota_fail_open": fail_open,
    }
    async with gateways(tmp_path, 1, **settings) as (gateway,):
        assert (await post(gateway)).headers["x-ratelimit-remaining-requests"] == "2"
        redis_server.stop()
        with caplog.at_level(logging.WARNING, logger="tts_server.gateway"):
            down = [await post(gateway) for _ in range(4)]
        if fail_open:  # served, not counted: the limit is shown, the remaining is not known
            assert [r.status_code for r in down] == [200] * 4
            assert all("x-ratelimit-remaining-requests" not in r.headers for r in down)
            assert all(r.headers["x-ratelimit-limit-requests"] == "3" for r in down)
        else:
            assert [r.status_code for r in down] == [503] * 4
            assert {r.json()["error"]["code"] for r in down} == {"quota_store_unavailable"}
            assert all(r.headers["retry-after"] == "1" for r in down)
        logged = [r.getMessage() for r in caplog.records if "quota store" in r.getMessage()]
        assert len(logged) == 1 and ("failing open" if fail_open else "failing closed") in logged[0]
        # Back on the same port: counted again, from where the counter was (Redis kept no data).
        redis_server.start()
        again = await post(gateway)
    assert again.status_code == 200
    assert again.headers["x-ratelimit-remaining-requests"] == "2"  # a fresh Redis: 1 counted


def test_a_two_worker_gateway_process_shares_the_budget_and_cuts_slow_bodies(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """`tts-server gateway --workers 2` over Redis: one budget for both worker processes (each
    request on a fresh connection, which either worker may accept), and the slow-client protocol is
    in the workers too."""
    import json
    import socket

    from tests.support.faults import ThreadServer
    from tests.support.gateway import MODEL
    from tests.support.servers import ServerProcess, cli, free_port
    from tts_server.prm_worker import create_app as create_prm_app
    from tts_server.prm_worker.backends.arith import ArithBackend

    profile = tmp_path / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    vllm = ThreadServer(FakeVLLM(script=script, model=MODEL).app())
    prm = ThreadServer(create_prm_app(ArithBackend()))
    with vllm, prm:
        port = free_port()
        env = {
            "TTS_POLICY_MODEL": MODEL,
            "TTS_PROMPT_PROFILES": json.dumps({MODEL: str(profile)}),
            "TTS_API_KEY_HASHES": hash_key(KEY),
            "TTS_REDIS_URL": redis_server.url,
            "TTS_QUOTA_REQUESTS_PER_MINUTE": "6",
            "TTS_BODY_TIMEOUT_S": "1",
            "TTS_LOG_LEVEL": "warning",
        }
        argv = cli("gateway", "--port", str(port), "--policy-url", vllm.url, "--prm-url", prm.url)
        gateway = ServerProcess("gateway", [*argv, "--workers", "2"], port, tmp_path).start(env)
        try:
            gateway.wait_healthy(90, path="/health/ready")
            # The process's clock is its own: keep the ten requests inside one minute.
            if time.time() % 60 > 50:
                time.sleep(61 - time.time() % 60)
            codes = []
            for _ in range(10):
                with httpx.Client(base_url=gateway.url, timeout=30) as client:  # a new connection
                    r = client.post(
                        "/v1/chat/completions",
                        json=chat("greedy", 1),
                        headers={"Authorization": f"Bearer {KEY}"},
                    )
                    codes.append(r.status_code)
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            head = f"Authorization: Bearer {KEY}\r\nContent-Length: 500\r\n\r\n{{"
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + head.encode())
            started = time.monotonic()
            answer = sock.recv(4096)
            waited = time.monotonic() - started
            sock.close()
        finally:
            gateway.stop()
    assert codes == [200] * 6 + [429] * 4
    assert answer.startswith(b"HTTP/1.1 408") and waited < 3
