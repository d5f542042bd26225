"""`HTTPPRMClient` against the real worker process, and its errors against broken servers."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.support.servers import free_port
from tts_server.clients import HTTPPRMClient, PRMError, RetryPolicy
from tts_server.types import PRMClient, PRMUsage

QUESTION = "Tom has 3 apples and buys 4 more, then doubles them. How many?"
SOLUTIONS = [
    ["3 + 4 = 7 apples.", "7 * 2 = 14.", "The answer is 14."],
    ["3 + 4 = 8 apples.", "8 * 2 = 16.", "The answer is 16."],
    [],
    ["He doubles them.", "\\boxed{14}"],
]
# The arith worker's scores, worked out by hand from its rules (backends/arith.py): right and
# grounded in the question's 3, 4 and "doubles" (0.9), an answer a right equation showed (0.95);
# a wrong sum (0.05), then a right product of the wrong 8 (0.3, ungrounded), then an answer after
# an error (0.1); no equation (0.5), then an answer nothing supports (0.6).
SCORES = [[0.9, 0.9, 0.95], [0.05, 0.3, 0.1], [], [0.5, 0.6]]


def mock_client(handler: httpx.MockTransport) -> HTTPPRMClient:
    return HTTPPRMClient("http://prm", client=httpx.AsyncClient(transport=handler))


async def test_scores_a_batch_on_the_real_worker(prm_url: str) -> None:
    client: PRMClient = HTTPPRMClient(prm_url)
    assert isinstance(client, HTTPPRMClient)
    usage = PRMUsage()
    try:
        assert await client.health()
        scores = await client.score(QUESTION, SOLUTIONS, usage)
    finally:
        await client.aclose()
    assert scores == SCORES
    assert [len(s) for s in scores] == [3, 3, 0, 2]
    assert usage.calls == 1
    assert usage.steps_scored == 8
    words = len(QUESTION.split()) * 3 + sum(len(step.split()) for s in SOLUTIONS for step in s)
    assert usage.tokens == words


async def test_concurrent_calls_on_the_real_worker(prm_url: str) -> None:
    client = HTTPPRMClient(prm_url)
    usage = PRMUsage()
    batches = [[[f"{i} + 1 = {i + 1 + i % 2}"], [f"\\boxed{{{i}}}"]] for i in range(16)]
    try:
        results = await asyncio.gather(
            *(client.score(f"q{i}", b, usage) for i, b in enumerate(batches))
        )
    finally:
        await client.aclose()
    # Each answer its own request's: `i + 1` is right for even i (0.3: the question "q{i}" gives
    # no i, so ungrounded) and wrong for odd i (0.05); no equation supports the boxed i (0.6).
    for i, scores in enumerate(results):
        assert scores == [[0.3 if i % 2 == 0 else 0.05], [0.6]], i
    assert usage.calls == 16 and usage.steps_scored == 32


async def test_nothing_to_score_makes_no_call() -> None:
    def refuse(_: httpx.Request) -> httpx.Response:
        raise AssertionError("no request expected")

    client = mock_client(httpx.MockTransport(refuse))
    usage = PRMUsage()
    assert await client.score("q", [], usage) == []
    assert await client.score("q", [[], []], usage) == [[], []]
    assert usage == PRMUsage()
    await client.aclose()


async def test_sends_the_documented_body() -> None:
    seen: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/score"
        seen.append(json.loads(request.content))
        body = {"scores": [[0.25, 1]], "model": "m", "steps_scored": 2, "tokens": 11}
        return httpx.Response(200, json=body)

    client = mock_client(httpx.MockTransport(handler))
    usage = PRMUsage(calls=1, steps_scored=1, tokens=1)
    assert await client.score("q", [("a", "b")], usage) == [[0.25, 1.0]]
    assert seen == [{"question": "q", "solutions": [["a", "b"]]}]
    assert usage == PRMUsage(calls=2, steps_scored=3, tokens=12)
    await client.aclose()


async def test_unreachable_worker_is_a_prm_error() -> None:
    client = HTTPPRMClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    usage = PRMUsage()
    with pytest.raises(PRMError, match=r"unreachable"):
        await client.score("q", [["a"]], usage)
    assert not await client.health()
    assert usage == PRMUsage()
    await client.aclose()


async def test_timeout_is_a_prm_error() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client = mock_client(httpx.MockTransport(slow))
    with pytest.raises(PRMError, match="no answer within") as info:
        await client.score("q", [["a"]], PRMUsage())
    assert info.value.status == 504
    await client.aclose()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        # A 5xx body stays in the worker's log: only its status is passed on.
        (500, {"error": {"message": "the PRM backend failed", "type": "server_error"}}, "HTTP 500"),
        (400, {"error": {"message": "'question' is required", "param": "question"}}, "required"),
        (502, "Bad Gateway", "Bad Gateway"),
    ],
)
async def test_non_200_is_a_prm_error_with_the_status(
    status: int, body: object, expected: str
) -> None:
    def handler(_: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    client = mock_client(httpx.MockTransport(handler))
    with pytest.raises(PRMError, match=expected) as info:
        await client.score("q", [["a"]], PRMUsage())
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value)
    await client.aclose()


@pytest.mark.parametrize(
    "body",
    [
        {"scores": [[0.5], [0.5]]},  # one list too many
        {"scores": [[0.5, 0.5]]},  # one score too many
        {"scores": [["high"]]},
        {"scores": [[1.5]]},
        {"model": "m"},
        [[0.5]],
    ],
)
async def test_malformed_responses_are_prm_errors(body: object) -> None:
    client = mock_client(httpx.MockTransport(lambda _: httpx.Response(200, json=body)))
    usage = PRMUsage()
    with pytest.raises(PRMError, match=r"malformed|not an object"):
        await client.score("q", [["a"]], usage)
    assert usage == PRMUsage()
    await client.aclose()


async def test_invalid_json_is_a_prm_error() -> None:
    client = mock_client(httpx.MockTransport(lambda _: httpx.Response(200, text="{oops")))
    with pytest.raises(PRMError, match="invalid JSON"):
        await client.score("q", [["a"]], PRMUsage())
    await client.aclose()


OK_BODY = {"scores": [[0.5]], "model": "m", "steps_scored": 1, "tokens": 3}


@pytest.mark.parametrize(
    ("failures", "attempts", "succeeds"),
    [
        (["connect", "connect"], 3, True),  # two retries, then the answer
        (["503", "502"], 3, True),
        (["503", "503", "503"], 3, False),  # retries are bounded
        (["400"], 1, False),  # the request is wrong: never retried
        (["timeout"], 1, False),  # the first attempt may still be running: not retried
    ],
)
async def test_retries_connection_errors_and_502_503_only(
    failures: list[str], attempts: int, succeeds: bool
) -> None:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) <= len(failures):
            kind = failures[len(seen) - 1]
            if kind == "connect":
                raise httpx.ConnectError("refused", request=request)
            if kind == "timeout":
                raise httpx.ReadTimeout("slow", request=request)
            return httpx.Response(int(kind), json={"error": {"message": "no"}})
        return httpx.Response(200, json=OK_BODY)

    client = HTTPPRMClient(
        "http://prm",
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        retry=RetryPolicy(retries=2, backoff_s=0.01, backoff_cap_s=0.02),
    )
    if succeeds:
        assert await client.score("q", [["a"]], PRMUsage()) == [[0.5]]
    else:
        with pytest.raises(PRMError):
            await client.score("q", [["a"]], PRMUsage())
    assert len(seen) == attempts
    await client.aclose()


def test_backoff_is_capped_and_jittered() -> None:
    policy = RetryPolicy(retries=5, backoff_s=0.1, backoff_cap_s=0.3)
    delays = [policy.delay(attempt) for attempt in range(6) for _ in range(50)]
    assert all(0 <= d <= 0.3 for d in delays)
    assert len({round(d, 6) for d in delays}) > 10  # jittered, not a fixed schedule
