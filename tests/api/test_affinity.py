"""Replica affinity through the whole gateway: the real vLLM client behind a fake router
(tests/support/fake_router.py) in front of two fake vLLM replicas, all in-process.

Every upstream call of a request carries its key; keys differ across requests (and per DVTS
subtree with scope "subtree"); the request's keys are released once when it ends, however it
ends; a release that fails never fails a request; a dead replica's 500 is retried and the search
goes on on the other replica; the router's error body never reaches the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.fake_router import FakeRouter
from tests.support.fake_vllm import FakeVLLM
from tests.support.gateway import MODEL, EquationPRM, FailingPRM, chat, script
from tts_server.api import metrics
from tts_server.api.app import create_app
from tts_server.clients import RetryPolicy, SessionRelease, VLLMPolicyClient
from tts_server.settings import Settings

HEADER = "x-session-id"


@dataclass
class Setup:
    client: httpx.AsyncClient
    router: FakeRouter
    sessions: SessionRelease
    prm: EquationPRM


@asynccontextmanager
async def behind_router(
    tmp_path: Path,
    *,
    prm: EquationPRM | None = None,
    replicas: int = 2,
    release_client: httpx.AsyncClient | None = None,
    delay_s: float = 0.0,
    **overrides: Any,
) -> AsyncIterator[Setup]:
    profile = tmp_path / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    values: dict[str, Any] = {
        "policy_model": MODEL,
        "prompt_profiles": {MODEL: str(profile)},
        "retry_backoff_s": 0.001,
        "retry_backoff_cap_s": 0.002,
    }
    settings = Settings(**{**values, **overrides})
    router = FakeRouter(
        [FakeVLLM(script=script, model=MODEL, delay_s=delay_s) for _ in range(replicas)]
    )
    to_router = httpx.AsyncClient(transport=httpx.ASGITransport(app=router.app()))
    retry = RetryPolicy(
        settings.upstream_retries, settings.retry_backoff_s, settings.retry_backoff_cap_s
    )
    policy = VLLMPolicyClient(
        "http://router",
        MODEL,
        client=to_router,
        retry=retry,
        affinity_header=settings.affinity_header,
    )
    sessions = SessionRelease(
        "http://router/finish_session",
        client=release_client or to_router,
        on_outcome=metrics.observe_release,
    )
    prm = prm or EquationPRM()
    app = create_app(settings, policy=policy, prm=prm, sessions=sessions)
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield Setup(client, router, sessions, prm)
    finally:
        await sessions.wait_idle()
        await to_router.aclose()


async def ask(setup: Setup, strategy: str, budget: int = 4, **extra: Any) -> httpx.Response:
    response = await setup.client.post("/v1/chat/completions", json=chat(strategy, budget, **extra))
    await setup.sessions.wait_idle()
    return response


def keys_of(router: FakeRouter, path: str | None = None) -> list[str | None]:
    return [k for p, k, _ in router.routed if path is None or p == path]


@pytest.mark.parametrize("strategy", ["best_of_n", "beam_search", "dvts", "greedy", "auto"])
async def test_every_call_of_a_request_carries_its_one_key_and_it_is_released(
    tmp_path: Path, strategy: str
) -> None:
    async with behind_router(tmp_path) as setup:
        response = await ask(setup, strategy)
        assert response.status_code == 200, response.text
        keys = keys_of(setup.router)
        assert "/tokenize" in [p for p, _, _ in setup.router.routed]
        assert len(keys) >= 2 and len(set(keys)) == 1, keys
        [key] = set(keys)
        assert key is not None and len(key) == 32  # 128 random bits, hex
        # One replica served the whole request (its prefixes are cached there).
        assert len({r for _, _, r in setup.router.routed}) == 1
        assert setup.router.finished == [key]
        assert HEADER not in response.headers  # the pin is the gateway's own business


async def test_requests_get_distinct_keys_even_for_the_same_prompt(tmp_path: Path) -> None:
    async with behind_router(tmp_path) as setup:
        # Concurrent, so their sessions overlap (a released one no longer counts as load).
        answers = await asyncio.gather(*(ask(setup, "beam_search") for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4
        keys = set(keys_of(setup.router))
        assert len(keys) == 4
        assert sorted(setup.router.finished) == sorted(keys)  # each released once
        # Sticky-least-loaded spreads the sessions: both replicas served requests.
        assert {r for _, _, r in setup.router.routed} == {0, 1}


async def test_prompt_keys_send_the_same_question_to_one_replica_and_release_after_the_last(
    tmp_path: Path,
) -> None:
    async with behind_router(tmp_path, affinity_key="prompt", delay_s=0.05) as setup:
        same = [ask(setup, "beam_search") for _ in range(3)]
        other = ask(setup, "beam_search", messages=[{"role": "user", "content": "Ann: 2 + 2?"}])
        answers = await asyncio.gather(*same, other)
        assert [a.status_code for a in answers] == [200] * 4
        keys = set(keys_of(setup.router))
        assert len(keys) == 2  # one pin per question, not per request
        replicas_of = {k: {r for _, key, r in setup.router.routed if key == k} for k in keys}
        assert all(len(r) == 1 for r in replicas_of.values()), replicas_of
        # Each key released once, when the last request holding it ended.
        assert sorted(setup.router.finished) == sorted(keys)
        assert all("apples" not in k and "Ann" not in k for k in keys)


async def test_the_pins_gauge_counts_the_pins_held_in_flight(tmp_path: Path) -> None:
    def pins() -> float | None:
        return metrics.REGISTRY.get_sample_value("tts_affinity_pins")

    async with behind_router(tmp_path, affinity_key="prompt", delay_s=0.2) as setup:
        tasks = [asyncio.ensure_future(ask(setup, "best_of_n")) for _ in range(2)]
        other = asyncio.ensure_future(
            ask(setup, "best_of_n", messages=[{"role": "user", "content": "Ann: 2 + 2?"}])
        )
        while len({k for p, k, _ in setup.router.routed if p == "/v1/completions"}) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert pins() == 2  # three requests, two questions
        await asyncio.gather(*tasks, other)
        assert pins() == 0


async def test_subtree_scope_gives_each_dvts_subtree_its_own_key(tmp_path: Path) -> None:
    async with behind_router(tmp_path, affinity_scope="subtree") as setup:
        response = await ask(setup, "dvts", budget=8)  # 4 subtrees of width 2
        assert response.status_code == 200, response.text
        generate = keys_of(setup.router, "/v1/completions")
        [request_key] = set(keys_of(setup.router, "/tokenize"))
        assert request_key is not None
        subtree_keys = set(generate)
        assert subtree_keys == {f"{request_key}-{k}" for k in range(4)}
        # A subtree's calls never change replica; the subtrees spread over both.
        replica_of: dict[str | None, set[int]] = {}
        for path, key, replica in setup.router.routed:
            if path == "/v1/completions":
                replica_of.setdefault(key, set()).add(replica)
        assert all(len(r) == 1 for r in replica_of.values())
        assert set().union(*replica_of.values()) == {0, 1}
        assert sorted(setup.router.finished) == sorted({request_key, *subtree_keys})


async def test_subtree_scope_keeps_beam_search_on_the_request_key(tmp_path: Path) -> None:
    async with behind_router(tmp_path, affinity_scope="subtree") as setup:
        assert (await ask(setup, "beam_search")).status_code == 200
        assert len(set(keys_of(setup.router))) == 1


async def test_with_the_header_empty_no_key_is_sent_nor_released(tmp_path: Path) -> None:
    async with behind_router(tmp_path, affinity_header="") as setup:
        assert (await ask(setup, "dvts")).status_code == 200
        assert set(keys_of(setup.router)) == {None}
        assert setup.router.finished == []


async def test_a_failed_request_is_released_too(tmp_path: Path) -> None:
    async with behind_router(tmp_path, prm=FailingPRM()) as setup:
        response = await ask(setup, "best_of_n")
        assert response.status_code == 502
        assert setup.router.finished == list(set(keys_of(setup.router)))
        assert len(setup.router.finished) == 1


async def test_a_streamed_request_is_released_when_its_stream_ends(tmp_path: Path) -> None:
    async with behind_router(tmp_path) as setup:
        response = await ask(setup, "beam_search", stream=True)
        assert response.status_code == 200
        assert response.text.rstrip().endswith("data: [DONE]")
        await setup.sessions.wait_idle()
        assert setup.router.finished == list(set(keys_of(setup.router)))


async def test_a_request_past_its_deadline_is_released(tmp_path: Path) -> None:
    async with behind_router(tmp_path, delay_s=0.2) as setup:
        tts = {"strategy": "beam_search", "budget": 4, "beam_width": 2, "deadline_s": 0.3}
        response = await ask(setup, "beam_search", tts=tts)
        assert response.status_code in (200, 504), response.text
        assert setup.router.finished == list(set(keys_of(setup.router)))
        assert len(setup.router.finished) == 1


async def test_a_request_whose_client_goes_away_is_released(tmp_path: Path) -> None:
    async with behind_router(tmp_path, delay_s=5.0) as setup:
        task = asyncio.ensure_future(setup.client.post("/v1/chat/completions", json=chat("dvts")))
        while not any(p == "/v1/completions" for p, _, _ in setup.router.routed):  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # the fake router has no event to wait on
        task.cancel()  # in-process, cancelling the client cancels the handler
        await asyncio.gather(task, return_exceptions=True)
        await setup.sessions.wait_idle()
        assert len(setup.router.finished) == 1
        assert setup.router.finished == list(set(keys_of(setup.router)))


async def test_a_release_that_fails_never_fails_the_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    failing = httpx.AsyncClient(transport=httpx.MockTransport(refuse))

    def failed() -> float:
        labels = {"outcome": "failed"}
        return metrics.REGISTRY.get_sample_value("tts_affinity_releases_total", labels) or 0.0

    before = failed()
    with caplog.at_level(logging.DEBUG, logger="tts_server.clients"):
        async with behind_router(tmp_path, release_client=failing) as setup:
            for _ in range(3):
                assert (await ask(setup, "best_of_n")).status_code == 200
    assert failed() - before == 3
    ours = [r for r in caplog.records if r.name == "tts_server.clients"]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(ours) == 3 and len(warnings) == 1  # logged once at warning, then quietly
    assert "ConnectError" in warnings[0].getMessage()
    await failing.aclose()


async def test_a_replica_dying_mid_search_moves_the_search_on_from_its_last_step(
    tmp_path: Path,
) -> None:
    async with behind_router(tmp_path) as setup:  # undisturbed: what the search asks for
        assert (await ask(setup, "beam_search")).status_code == 200
        undisturbed = len(setup.router.on(0))
    async with behind_router(tmp_path) as setup:
        router = setup.router
        router.die_after[0] = 4  # beam search 4 x 2: its first step (4 samples), then dead
        response = await ask(setup, "beam_search")
        assert response.status_code == 200, response.text
        [key] = set(keys_of(router))
        # The router's 500s were retried with the same key, and the router moved it.
        assert -1 in [r for _, _, r in router.routed]
        assert router.on(0) == [key] * 4 and router.on(1)
        # Not started again: the same number of samples in all, and replica 1's first
        # prompts continue the steps replica 0 generated.
        assert len(router.on(0)) + len(router.on(1)) == undisturbed
        first = router.replicas[1].calls[0]["prompt"][0]
        assert "".join(chr(t) for t in first).endswith("We add the apples.\n\n")


async def test_the_routers_error_body_never_reaches_the_client(tmp_path: Path) -> None:
    async with behind_router(tmp_path, replicas=1, upstream_retries=1) as setup:
        setup.router.dead.add(0)
        setup.router.breaker = 10**6  # the circuit never opens: every call is a 500
        response = await ask(setup, "greedy", budget=1)
        assert response.status_code == 502
        assert "10.0.3." not in response.text and "attempts" not in response.text
        assert response.json()["error"]["message"] == "policy server: HTTP 500"
