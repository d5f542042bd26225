"""The plumbing both upstream clients share (tts_server/clients/http.py): retries, the mapping of
every failure to an `UpstreamError`, error-message parsing and the health probe; over
`httpx.MockTransport`, no sockets."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tts_server.clients import (
    PolicyError,
    PRMError,
    RetryPolicy,
    UpstreamError,
    VLLMPolicyClient,
)
from tts_server.clients.http import Upstream, error_message

Handler = Callable[[httpx.Request], httpx.Response]
FAST = RetryPolicy(retries=2, backoff_s=0.001, backoff_cap_s=0.002)
OK = {"ok": True}


def upstream(
    handler: Handler, *, error: type[UpstreamError] = UpstreamError, retry: RetryPolicy = FAST
) -> Upstream:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return Upstream("http://up/", error=error, timeout=7, connections=8, retry=retry, client=client)


def failing(failures: list[str], seen: list[str]) -> Handler:
    """Fails the first calls as `failures` say ("connect", "protocol", "read", "timeout" or a
    status), then answers 200."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if len(seen) > len(failures):
            return httpx.Response(200, json=OK)
        kind = failures[len(seen) - 1]
        if kind == "connect":
            raise httpx.ConnectError("refused", request=request)
        if kind == "protocol":
            raise httpx.RemoteProtocolError("closed mid-answer", request=request)
        if kind == "read":
            raise httpx.ReadError("reset", request=request)
        if kind == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        return httpx.Response(int(kind), json={"error": {"message": "no"}})

    return handler


# --- retries ---


@pytest.mark.parametrize(
    ("failures", "attempts", "succeeds"),
    [
        ([], 1, True),
        (["503", "502"], 3, True),  # two retries, then the answer
        (["connect", "protocol"], 3, True),
        (["read"], 2, True),
        (["502", "503", "502"], 3, False),  # bounded: the third failure is final
        (["connect", "connect", "connect"], 3, False),
        (["400"], 1, False),  # the request is wrong: never retried
        (["404"], 1, False),
        (["429"], 1, False),
        # A router's answer while a dead replica's circuit is closed: the retry moves on.
        (["500"], 2, True),
        (["500", "500", "500"], 3, False),
        (["timeout"], 1, False),  # the first attempt may still be running
    ],
)
async def test_post_retries_connection_errors_and_500_502_503_only(
    failures: list[str], attempts: int, succeeds: bool
) -> None:
    seen: list[str] = []
    up = upstream(failing(failures, seen))
    if succeeds:
        assert await up.post_json("/v1/x", {"a": 1}) == OK
    else:
        with pytest.raises(UpstreamError):
            await up.post_json("/v1/x", {"a": 1})
    assert seen == ["/v1/x"] * attempts
    await up.aclose()


@pytest.mark.parametrize("retries", [0, 1, 4])
async def test_the_retry_count_is_the_policys(retries: int) -> None:
    seen: list[str] = []
    up = upstream(failing(["503"] * 10, seen), retry=RetryPolicy(retries, 0.001, 0.002))
    with pytest.raises(UpstreamError) as info:
        await up.post_json("/x", {})
    assert len(seen) == retries + 1
    assert info.value.upstream_status == 503
    await up.aclose()


async def test_get_json_is_not_retried() -> None:
    seen: list[str] = []
    up = upstream(failing(["503"], seen))
    with pytest.raises(UpstreamError):
        await up.get_json("/v1/models")
    assert seen == ["/v1/models"]
    await up.aclose()


def test_backoff_grows_to_its_cap_with_full_jitter() -> None:
    policy = RetryPolicy(retries=5, backoff_s=0.1, backoff_cap_s=0.3)
    assert max(policy.delay(0) for _ in range(200)) <= 0.1
    assert all(0 <= policy.delay(attempt) <= 0.3 for attempt in range(8) for _ in range(50))


# --- failures as UpstreamError ---


def answering(status: int, **response: object) -> Handler:
    return lambda _: httpx.Response(status, **response)  # type: ignore[arg-type]


def raising(error: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("injected", request=request)

    return handler


@pytest.mark.parametrize(
    ("handler", "message", "status", "upstream_status"),
    [
        (raising(httpx.ReadTimeout), "no answer within 7 s", 504, None),
        (raising(httpx.ConnectTimeout), "no answer within 7 s", 504, None),
        (raising(httpx.ConnectError), "unreachable (ConnectError)", 502, None),
        (raising(httpx.RemoteProtocolError), "unreachable (RemoteProtocolError)", 502, None),
        (answering(200, text="{oops"), "answered with invalid JSON", 502, 200),
        (answering(200, json=[1]), "answered with a JSON list, not an object", 502, 200),
        # A 5xx body is not passed on (a router's names its workers' internal URLs).
        (
            answering(500, json={"error": {"message": "boom"}}),
            "HTTP 500: Internal Server Error",
            502,
            500,
        ),
        (answering(503, text="<html>busy</html>"), "HTTP 503: Service Unavailable", 502, 503),
        (answering(422, json={"detail": []}), "HTTP 422: Unprocessable Entity", 400, 422),
    ],
)
async def test_every_failure_is_an_upstream_error(
    handler: Handler, message: str, status: int, upstream_status: int | None
) -> None:
    up = upstream(handler, retry=RetryPolicy(retries=0))
    with pytest.raises(UpstreamError) as info:
        await up.post_json("/x", {})
    assert (info.value.message, str(info.value)) == (message, message)
    assert (info.value.status, info.value.upstream_status) == (status, upstream_status)
    await up.aclose()


# The one place the two clients differ: wording, and the status a refusal is answered with.
@pytest.mark.parametrize(
    ("error", "handler", "message", "status"),
    [
        (PolicyError, raising(httpx.ReadTimeout), "the policy server timed out", 504),
        (PRMError, raising(httpx.ReadTimeout), "no answer within 7 s", 504),
        (
            PolicyError,
            raising(httpx.ConnectError),
            "the policy server is unreachable (ConnectError)",
            502,
        ),
        (PRMError, raising(httpx.ConnectError), "unreachable (ConnectError)", 502),
        (
            PolicyError,
            answering(400, json={"error": {"message": "prompt too long"}}),
            "policy server: prompt too long",
            400,
        ),
        (
            PRMError,
            answering(400, json={"error": {"message": "'question' is required"}}),
            "HTTP 400: 'question' is required",
            400,
        ),
        (PolicyError, answering(404, text="nope"), "policy server: HTTP 404", 400),
        (PRMError, answering(404, text="nope"), "HTTP 404: Not Found", 404),
        (PolicyError, answering(500, text=""), "policy server: HTTP 500", 502),
        (PRMError, answering(500, text=""), "HTTP 500: Internal Server Error", 500),
        (PRMError, answering(599, text=""), "HTTP 599: no error message", 599),
        (
            PolicyError,
            answering(200, text="{oops"),
            "the policy server answered with invalid JSON",
            502,
        ),
        (PRMError, answering(200, text="{oops"), "answered with invalid JSON", 502),
    ],
)
async def test_the_policy_and_the_prm_word_and_map_failures_their_way(
    error: type[UpstreamError], handler: Handler, message: str, status: int
) -> None:
    up = upstream(handler, error=error, retry=RetryPolicy(retries=0))
    with pytest.raises(error) as info:
        await up.post_json("/x", {})
    assert (info.value.message, info.value.status) == (message, status)
    await up.aclose()


async def test_the_policy_client_maps_an_unreadable_answer_to_a_policy_error() -> None:
    client = httpx.AsyncClient(transport=httpx.MockTransport(answering(200, text="{oops")))
    policy = VLLMPolicyClient("http://vllm", "m", client=client)
    with pytest.raises(PolicyError, match="invalid JSON") as info:
        await policy.tokenize_text("hello")
    assert info.value.status == 502
    await policy.aclose()


# --- error messages ---


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (httpx.Response(400, json={"error": {"message": "bad", "type": "x"}}), "bad"),  # OpenAI
        (httpx.Response(400, json={"message": "plain"}), "plain"),
        (httpx.Response(400, json={"error": {"message": "inner"}, "message": "outer"}), "inner"),
        (httpx.Response(400, json={"error": "a string", "message": "outer"}), "outer"),
        (httpx.Response(400, json={"error": {"message": 42}}), "42"),
        (httpx.Response(400, json={"error": {"message": ""}}), None),
        (httpx.Response(422, json={"detail": [{"msg": "missing"}]}), None),
        (httpx.Response(400, json=["a list"]), None),
        (httpx.Response(502, text="Bad Gateway"), None),
        (httpx.Response(502, text="<html><body>nginx</body></html>"), None),
        (httpx.Response(500, content=b"\xff\xfe"), None),
        (httpx.Response(500), None),
    ],
)
def test_error_message_is_the_bodys_message_or_none(
    response: httpx.Response, expected: str | None
) -> None:
    assert error_message(response) == expected


# --- health ---


@pytest.mark.parametrize(
    ("handler", "healthy"),
    [
        (answering(200, text="ok"), True),
        (answering(503, json={"error": {"message": "loading"}}), False),
        (answering(404), False),
        (raising(httpx.ConnectError), False),
        (raising(httpx.ReadTimeout), False),
    ],
)
async def test_health_is_a_200_on_health(handler: Handler, healthy: bool) -> None:
    seen: list[str] = []

    def recording(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return handler(request)

    up = upstream(recording)
    assert await up.health() is healthy
    assert seen == ["/health"]  # one probe, never retried
    await up.aclose()


async def test_the_base_url_loses_its_trailing_slash() -> None:
    seen: list[str] = []
    up = upstream(failing([], seen))
    await up.post_json("/v1/score", {})
    await up.get_json("/v1/models")
    assert seen == ["/v1/score", "/v1/models"]
    assert up.base_url == "http://up"
    await up.aclose()
