"""The gateway's front door, as plain ASGI (no BaseHTTPMiddleware: it must not get in the way of
cancellation): draining, API keys, the body byte cap, per-key quotas, admission control, and the
request metrics. (Slow clients are cut earlier, in the HTTP protocol: api/connections.py.)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tts_server.api import metrics
from tts_server.api.errors import APIError, error_body
from tts_server.api.protocol import HEADER_STRATEGY
from tts_server.api.quotas import ANONYMOUS, QuotaRefused, Quotas, Spending, key_label
from tts_server.api.reliability import Admission, KeyChecker, Readiness, Rejected
from tts_server.types import STRATEGY_NAMES

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COUNTED = ("/v1/completions", "/v1/chat/completions", "/v1/models")
ADMITTED = ("/v1/completions", "/v1/chat/completions")
STRATEGY_LABELS: frozenset[str] = frozenset(STRATEGY_NAMES)
CLIENT_CLOSED = 499  # nginx's code for "the client went away first"
# Where the guard leaves an admitted request's Spending for the routes (api/routes.py).
SPENDING = "tts.spending"
# Where it leaves the matched key's SHA-256 hex digest ("" with no keys): whose traces are whose.
IDENTITY = "tts.identity"
# The inspector's data (its page, plain files without data, is open: a browser cannot send a
# bearer key to load a page; its scripts send the key on every data call).
INSPECTOR_DATA = "/inspector/api/"


async def send_error(send: Send, error: APIError, headers: dict[str, str] | None = None) -> None:
    # The app's error model, encoded as the guard always has (json.dumps' default spacing).
    body = json.dumps(error_body(error).model_dump()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyChecker,
        admission: Admission,
        readiness: Readiness,
        max_body_bytes: int,
        metrics_require_key: bool,
        quotas: Quotas | None = None,
    ) -> None:
        self.app = app
        self.quotas = quotas if quotas is not None and quotas.enabled else None
        self.keys = keys
        self.admission = admission
        self.readiness = readiness
        self.max_body_bytes = max_body_bytes
        self.metrics_require_key = metrics_require_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        protected = path.startswith(("/v1/", INSPECTOR_DATA)) or (
            path == "/metrics" and self.metrics_require_key
        )
        identity = self.keys.identify(headers.get("authorization")) if protected else ""
        if identity is None:
            await send_error(
                send,
                APIError(
                    401,
                    "a valid API key is required: Authorization: Bearer <key>",
                    code="invalid_api_key",
                ),
                {"WWW-Authenticate": "Bearer"},
            )
            self._count(path, headers, 401)
            return
        scope[IDENTITY] = identity
        if path not in COUNTED:
            await self.app(scope, receive, send)
            return

        code = 500
        echoed: str | None = None

        async def tracking_send(message: Message) -> None:
            nonlocal code, echoed
            if message["type"] == "http.response.start":
                code = int(message["status"])
                for key, value in message.get("headers", []):
                    if key.decode("latin-1").lower() == HEADER_STRATEGY.lower():
                        echoed = value.decode("latin-1")
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            if path in ADMITTED:
                key = key_label(identity) if identity else ANONYMOUS
                await self._admitted(scope, receive, tracking_send, headers, key)
            else:
                await self.app(scope, receive, tracking_send)
        finally:
            metrics.IN_FLIGHT.dec()
            self._count(path, headers, code, echoed)

    async def _admitted(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str], key: str
    ) -> None:
        if self.readiness.draining:
            await send_error(
                send,
                APIError(503, "the server is shutting down; retry on another replica"),
                {"Retry-After": "1"},
            )
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await send_error(send, self._too_large())
            return
        # Read the body here, bounded, so an oversized one never reaches the parser.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await send_error(send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if self.quotas is not None:
            # Counted once the body is in, before an admission slot is taken.
            try:
                spending = await self.quotas.admit(key)
            except QuotaRefused as exc:
                code = "rate_limit_exceeded" if exc.status == 429 else "quota_store_unavailable"
                await send_error(
                    send,
                    APIError(exc.status, exc.message, code=code),
                    {"Retry-After": str(exc.retry_after_s), **exc.headers},
                )
                return
            if spending is not None:
                scope[SPENDING] = spending
                send = _with_budget(send, spending)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        try:
            async with self.admission.admit():
                await self.app(scope, replay, send)
        except Rejected as exc:
            await send_error(
                send,
                APIError(429, exc.message, code="server_busy"),
                {"Retry-After": str(exc.retry_after_s)},
            )

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is over {self.max_body_bytes} bytes", code="body_too_large"
        )

    @staticmethod
    def _count(path: str, headers: dict[str, str], status: int, echoed: str | None = None) -> None:
        if path not in COUNTED:
            return
        # The echoed strategy on success; otherwise the asked one if valid (bounded labels).
        asked = echoed or headers.get(HEADER_STRATEGY.lower())
        strategy = asked if asked in STRATEGY_LABELS else "unknown"
        if path == "/v1/models":
            strategy = "none"  # no strategy involved
        metrics.REQUESTS.labels(path, strategy, metrics.status_class(status)).inc()


def _with_budget(send: Send, spending: Spending) -> Send:
    """`send` that adds the key's remaining budget to the response's headers, once the charges
    sent so far have been counted."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            await spending.flush()
            extra = [(k.encode(), v.encode()) for k, v in spending.headers().items()]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending
