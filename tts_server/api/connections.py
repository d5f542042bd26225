"""Deadlines for slow clients and a cap on open connections, at the HTTP protocol level.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but has no deadline for
reading a request's head or body: a client that sends headers and a few bytes of its body and
then nothing holds its connection (and a file descriptor) for ever. `GuardedH11Protocol` is
uvicorn's h11 protocol with three more rules per connection:

- the head of a request must arrive within `head_timeout_s` of the connection opening (or, on a
  kept-alive connection, of the next request's first byte);
- its body within `body_timeout_s` of the head; past either, a 408 (OpenAI's error shape,
  `Connection: close`) and the connection is closed (closed without a word when it sent nothing);
- past `max_connections` open connections in this worker, a new one is answered 503 as soon as
  its head arrives (its head deadline shortened to `OVER_CAP_HEAD_TIMEOUT_S`) and closed. The
  liveness and readiness probes (`/health*`) are still served, so an attack does not get the
  pod restarted.

The admission slot (api/reliability.py) is taken only once the body is in (api/guard.py), so a
slow body never holds one. Each refusal is counted in `tts_rejections_total{reason}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from functools import partial
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from tts_server.api import metrics

logger = logging.getLogger("tts_server.gateway")

# A legitimate client sends its head right after connecting; one over the cap gets little time.
OVER_CAP_HEAD_TIMEOUT_S = 1.0
# File descriptors beyond the connection cap: upstream clients, the listening socket, logs.
SPARE_FDS = 256


@dataclass(frozen=True)
class ConnectionLimits:
    head_timeout_s: float
    body_timeout_s: float
    max_connections: int  # per worker process; 0: no cap


def _error(status: int, message: str, code: str) -> bytes:
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n" % (status, reason, len(body))
    )
    return head + body


TIMEOUT_408 = _error(408, "the request was not received in time", "request_timeout")
OVER_CAP_BODY = json.dumps(
    {
        "error": {
            "message": "the server has too many open connections; retry later",
            "type": "server_error",
            "param": None,
            "code": "too_many_connections",
        }
    }
).encode()


async def _over_cap(app: Any, scope: Any, receive: Any, send: Any) -> None:
    """What a connection past the cap is served: the probes, else a 503 that closes it."""
    if scope["type"] == "http" and str(scope.get("path", "")).startswith("/health"):
        await app(scope, receive, send)
        return
    metrics.REJECTIONS.labels("connection_cap").inc()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(OVER_CAP_BODY)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": OVER_CAP_BODY})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with head and body deadlines and a connection cap (see module)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "head"  # head, body, or app (the request is in: the app's time)
        self._seen: object = None  # the request cycle whose head we have seen
        self._head_timeout_s = limits.head_timeout_s
        self._received = False  # a byte of the request being waited for

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cap = self.limits.max_connections
        if cap and len(self.connections) > cap:
            self.app = partial(_over_cap, self.app)
            self._head_timeout_s = min(self._head_timeout_s, OVER_CAP_HEAD_TIMEOUT_S)
        self._arm(self._head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._received = True
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()  # a pipelined request may have been parsed from the buffer

    def _track(self) -> None:
        cycle = self.cycle
        if self.transport.is_closing():
            return
        if cycle is not None and cycle is not self._seen:  # a new request's head is in
            self._seen = cycle
            if cycle.more_body:
                self._phase = "body"
                self._arm(self.limits.body_timeout_s)
            else:
                self._phase = "app"
                self._disarm()
        elif self._phase == "body" and cycle is not None and not cycle.more_body:
            self._phase = "app"
            self._disarm()
        elif self._phase == "app" and cycle is not None and cycle.response_complete:
            # The response went out and the connection is kept alive: uvicorn's keep-alive timer
            # waits for the next head; once a byte of it arrives, that head has a deadline.
            self._phase = "head"
            self._received = False
        if self._phase == "head" and self._received and self._deadline is None:
            self._arm(self._head_timeout_s)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        metrics.REJECTIONS.labels(f"{self._phase}_deadline").inc()
        cycle = self.cycle
        started = cycle is not None and cycle is self._seen and cycle.response_started
        if self._received and not started:
            self.transport.write(TIMEOUT_408)
        self.transport.close()  # connection_lost tells a waiting app it is gone


def protocol_factory(limits: ConnectionLimits) -> Any:
    """What `uvicorn.Config(http=...)` takes: it calls it as the protocol class (picklable, for
    uvicorn's worker processes)."""
    return partial(GuardedH11Protocol, limits=limits)


def raise_fd_limit(max_connections: int) -> None:
    """Let the process hold its connection cap: raise the soft RLIMIT_NOFILE (within the hard
    limit) to the cap plus spares, and say so when the hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            logger.warning(
                "open files limited to %d: below the connection cap %d plus %d spare",
                target,
                max_connections,
                SPARE_FDS,
            )
