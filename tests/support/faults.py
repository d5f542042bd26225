"""Fault injection for the reliability tests: ASGI wrappers that make an upstream slow, hang,
answer 5xx, or close the connection mid-response, served by a real uvicorn on 127.0.0.1.

`Faulty` wraps the fake vLLM (tests/fake_vllm.py) or the real PRM worker app and counts, for its
faulted path, the calls, the requests still open, and the connections the client closed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.support.servers import free_port

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class Faulty:
    """What `path` does now: mode "ok", "slow" (delay_s first), "hang" (until the client goes),
    "gate" (until `gate` is set), "status" (answer `status`; the first `times` calls only when
    times > 0), "close" (start the answer, send `close_after` bytes, drop the connection),
    "hang_after" (answer the first `times` calls, hang the rest)."""

    app: ASGIApp
    path: str
    mode: str = "ok"
    delay_s: float = 0.0
    status: int = 503
    times: int = 0
    close_after: int = 10
    gate: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    open: int = 0
    client_closed: int = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        self.calls += 1
        number = self.calls
        body = b""
        while True:  # the whole request first, as a real server would have it
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_closed += 1
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.open += 1
        try:
            await self._serve(scope, receive, send, body, number)
        finally:
            self.open -= 1

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, number: int
    ) -> None:
        mode = self.mode
        if mode == "hang_after":
            mode = "ok" if number <= self.times else "hang"
        if mode == "hang":
            await self._until_client_closes(receive)
            return
        if mode == "gate" and not await self._wait(receive, self.gate.is_set, 60):
            return
        if mode == "slow":
            deadline = time.monotonic() + self.delay_s
            if not await self._wait(receive, lambda: time.monotonic() >= deadline, 60):
                return
        if mode == "status" and (self.times == 0 or number <= self.times):
            payload = b'{"error": {"message": "injected fault", "type": "server_error"}}'
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": payload})
            return
        if mode == "close":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"4096"),
                    ],
                }
            )
            await send(
                {"type": "http.response.body", "body": b"x" * self.close_after, "more_body": True}
            )
            raise ConnectionAbortedError("injected: connection dropped mid-response")

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _until_client_closes(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.client_closed += 1
                return

    async def _wait(self, receive: Receive, ready: Callable[[], bool], limit_s: float) -> bool:
        """Wait until `ready()`; False (and counted) if the client closed first."""
        closed = asyncio.ensure_future(self._until_client_closes(receive))
        try:
            deadline = time.monotonic() + limit_s
            while not ready() and time.monotonic() < deadline:
                if closed.done():
                    return False
                await asyncio.sleep(0.02)
            return not closed.done()
        finally:
            if not closed.done():
                closed.cancel()


class ThreadServer:
    """A real uvicorn serving `app` on 127.0.0.1 from a thread; stop and start it again on the
    same port to play an upstream that dies and comes back."""

    def __init__(self, app: ASGIApp, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadServer:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(15)
            self._server = None

    def __enter__(self) -> ThreadServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
