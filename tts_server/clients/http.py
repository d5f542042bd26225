"""What the policy and PRM clients share: one pooled HTTP client per upstream, retries with
jittered backoff, and every transport or protocol failure as one `UpstreamError`."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httpx

# Health probes and metadata lookups: short, so a stuck upstream cannot stall readiness.
PROBE_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0
# Connections per pool of a `ShardedTransport`.
SHARD_SIZE = 16


class _Release(httpx.AsyncByteStream):
    """A response body that calls `release` once when it is closed (read to the end or not)."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._release is not None:
                self._release()
                self._release = None


class ShardedTransport(httpx.AsyncBaseTransport):
    """Several small connection pools, each request on the one with the fewest responses open.

    httpcore's pool walks all its connections when a request starts and when a response closes
    (and for each idle one, all of them again), so its cost per request grows with the square of
    the pool: at 256 connections that was most of the gateway's CPU against a fast upstream
    (docs/performance.md). Pools of `SHARD_SIZE` keep each walk short; every connection is kept
    alive (a closed one is a new TCP connection on the next call)."""

    def __init__(self, connections: int, *, shard_size: int = SHARD_SIZE) -> None:
        shards = max(1, math.ceil(connections / shard_size))
        size = math.ceil(connections / shards)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        # One TLS context for all pools: each builds its own otherwise (reading the CA bundle,
        # about 40 ms and 1 MB apiece).
        tls = httpx.create_ssl_context()
        self._shards = [httpx.AsyncHTTPTransport(verify=tls, limits=limits) for _ in range(shards)]
        self._open = [0] * shards

    @property
    def open_responses(self) -> list[int]:
        """Responses not yet closed, per pool."""
        return list(self._open)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = min(range(len(self._open)), key=self._open.__getitem__)
        self._open[shard] += 1
        try:
            response = await self._shards[shard].handle_async_request(request)
        except BaseException:
            self._open[shard] -= 1
            raise

        def release() -> None:
            self._open[shard] -= 1

        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Release(response.stream, release)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class UpstreamError(Exception):
    """An upstream failed, refused or could not be reached.

    `status` is the HTTP status the gateway answers with (504 timed out, 502 unreachable or
    unusable, else `answer_status` of the upstream's own status); `upstream_status` is the
    upstream's status when it answered. A subclass says how its failures read: the templates
    below are `str.format`ted by `Upstream` with the fields named in each comment.
    """

    TIMEOUT: ClassVar[str] = "no answer within {timeout:g} s"
    UNREACHABLE: ClassVar[str] = "unreachable ({error})"  # the httpx exception's class name
    REFUSED: ClassVar[str] = "HTTP {status}: {message}"
    # The message of a refusal whose body carries none ({reason}: the status line's phrase).
    UNEXPLAINED: ClassVar[str] = "{reason}"
    UNREADABLE: ClassVar[str] = "answered with {what}"  # a 200 whose body is not a JSON object

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        upstream_status: int | None = None,
        upstream_code: str | None = None,
        upstream_param: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.upstream_status = upstream_status
        self.upstream_code = upstream_code  # the `code` of the upstream's OpenAI-style error
        self.upstream_param = upstream_param  # and its `param` (vLLM names a bad field there)

    @classmethod
    def answer_status(cls, upstream_status: int) -> int:
        """The gateway's status for an upstream's non-200: its 4xx is about the request (e.g. a
        prompt over the context length), anything else is the upstream's fault."""
        return 400 if 400 <= upstream_status < 500 else 502


@dataclass(frozen=True)
class RetryPolicy:
    """Connection errors and 500/502/503 answers are retried `retries` times with capped,
    jittered exponential backoff; 4xx never (the request itself is wrong).

    500 is what a router in front of replicas answers while a dead replica's circuit is still
    closed; the retry then reaches a live one. Every POST the clients send is stateless (a
    generate, a tokenize, a score), so sending it again is safe."""

    retries: int = 2
    backoff_s: float = 0.2
    backoff_cap_s: float = 2.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.backoff_cap_s, self.backoff_s * (2**attempt))
        return random.uniform(0, ceiling)  # full jitter


RETRYABLE_STATUS = frozenset((500, 502, 503))


async def send_with_retries(
    send: Callable[[], Awaitable[httpx.Response]], policy: RetryPolicy
) -> httpx.Response:
    """`send()` again after a connection error or a 500/502/503, up to `policy.retries` times.

    Timeouts are not retried: the upstream may still be working on the first attempt.
    """
    attempt = 0
    while True:
        try:
            response = await send()
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            if attempt >= policy.retries:
                raise
        else:
            if response.status_code not in RETRYABLE_STATUS or attempt >= policy.retries:
                return response
            await response.aclose()
        await asyncio.sleep(policy.delay(attempt))
        attempt += 1


def error_message(response: httpx.Response) -> str | None:
    """The message in an error body: OpenAI's `{"error": {"message": ...}}` or a plain
    `{"message": ...}`; None for any other body (which may be a proxy's HTML page)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if body.get("message"):
        return str(body["message"])
    return None


def error_code(response: httpx.Response, field: str = "code") -> str | None:
    """The `code` (or another string `field`) of an OpenAI-style error body, if it has one."""
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get(field) if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


class Upstream:
    """One upstream server: its base URL, one pooled `httpx.AsyncClient`, the retry policy,
    `error`, the `UpstreamError` subclass its failures are raised as, and `affinity_header`,
    the header a call's affinity key travels in (None: keys are not sent).

    A 5xx answer's body is never passed on: behind a router it names internal worker URLs, and
    what the client can act on is only that the upstream failed."""

    def __init__(
        self,
        base_url: str,
        *,
        error: type[UpstreamError],
        timeout: float,
        connections: int,
        retry: RetryPolicy | None = None,
        client: httpx.AsyncClient | None = None,
        affinity_header: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.affinity_header = affinity_header or None
        self.error = error
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT_S),
            transport=ShardedTransport(connections),
        )
        # Probes and lookups on a connection of their own: queued behind a full pool of
        # generations they would time out and call a busy but healthy upstream down.
        self._probes = (
            httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, limits=httpx.Limits(max_connections=2))
            if client is None
            else client
        )

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._probes is not self._client:
            await self._probes.aclose()

    async def post_json(
        self, path: str, body: dict[str, Any], *, affinity: str | None = None
    ) -> dict[str, Any]:
        """POST `body`, retried per the policy (each attempt with the same affinity key, so a
        router moves the pin only off a dead replica); the answer's JSON object, else `error`."""
        url = self.base_url + path
        headers = self.headers(affinity)
        return await self._json(
            lambda: send_with_retries(
                lambda: self._client.post(url, json=body, headers=headers), self.retry
            ),
            self.timeout,
        )

    def headers(self, affinity: str | None) -> dict[str, str] | None:
        if affinity is None or self.affinity_header is None:
            return None
        return {self.affinity_header: affinity}

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET, once and with the probes' short timeout: these are lookups whose callers fall
        back when they fail, and a retry would only delay the fallback."""
        url = self.base_url + path
        return await self._json(
            lambda: self._probes.get(url, timeout=PROBE_TIMEOUT_S), PROBE_TIMEOUT_S
        )

    async def health(self, path: str = "/health") -> bool:
        try:
            response = await self._probes.get(self.base_url + path, timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    @contextlib.asynccontextmanager
    async def stream(
        self, path: str, body: dict[str, Any], *, affinity: str | None = None
    ) -> AsyncIterator[AsyncIterator[str]]:
        """POST `body` and yield the answer's lines as they arrive (retried like `post_json`
        until the answer starts). Leaving the block closes the connection: the upstream sees
        its client go away. Failures while reading are `error`s too."""
        url = self.base_url + path
        request = self._client.build_request("POST", url, json=body, headers=self.headers(affinity))
        response = await self._send(
            lambda: send_with_retries(lambda: self._client.send(request, stream=True), self.retry),
            self.timeout,
        )
        try:
            if response.status_code != 200:
                await response.aread()
                raise self._refusal(response)
            yield self._lines(response)
        finally:
            await response.aclose()

    async def _lines(self, response: httpx.Response) -> AsyncIterator[str]:
        error = self.error
        try:
            async for line in response.aiter_lines():
                yield line
        except httpx.TimeoutException as exc:
            raise error(error.TIMEOUT.format(timeout=self.timeout), status=504) from exc
        except httpx.HTTPError as exc:
            raise error(error.UNREACHABLE.format(error=type(exc).__name__)) from exc

    async def _send(
        self, send: Callable[[], Awaitable[httpx.Response]], limit_s: float
    ) -> httpx.Response:
        error = self.error
        try:
            return await send()
        except httpx.TimeoutException as exc:
            raise error(error.TIMEOUT.format(timeout=limit_s), status=504) from exc
        except httpx.HTTPError as exc:
            raise error(error.UNREACHABLE.format(error=type(exc).__name__)) from exc

    def _refusal(self, response: httpx.Response) -> UpstreamError:
        error, status = self.error, response.status_code
        reason = response.reason_phrase or "no error message"
        explained = error_message(response) if status < 500 else None
        message = explained or error.UNEXPLAINED.format(status=status, reason=reason)
        return error(
            error.REFUSED.format(status=status, message=message),
            status=error.answer_status(status),
            upstream_status=status,
            upstream_code=error_code(response),
            upstream_param=error_code(response, "param"),
        )

    async def _json(
        self, send: Callable[[], Awaitable[httpx.Response]], limit_s: float
    ) -> dict[str, Any]:
        error = self.error
        response = await self._send(send, limit_s)
        status = response.status_code
        if status != 200:
            raise self._refusal(response)
        try:
            data = response.json()
        except ValueError as exc:
            what = "invalid JSON"
            raise error(error.UNREADABLE.format(what=what), upstream_status=status) from exc
        if not isinstance(data, dict):
            what = f"a JSON {type(data).__name__}, not an object"
            raise error(error.UNREADABLE.format(what=what), upstream_status=status)
        return data
