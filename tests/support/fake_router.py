"""A fake of what the gateway relies on in vllm-router (`--policy sticky_least_loaded`), as an
in-process ASGI app in front of fake vLLM replicas:

- a request with the affinity header goes to its session's replica; a new session goes to the
  replica with the fewest sessions; without the header, to replica 0;
- a dead replica (in `dead`, or past its `die_after` count of /v1/completions) answers 500
  with its internal URL in the body (as the router does) until `breaker` failures open its
  circuit; its sessions then move to a live replica;
- `POST /finish_session?session_id=ID` releases a session (recorded in `finished`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tests.support.fake_vllm import FakeVLLM

INTERNAL_URL = "http://10.0.3.{n}:8000"  # what a real router's error body names


@dataclass
class FakeRouter:
    replicas: list[FakeVLLM]
    header: str = "x-session-id"
    breaker: int = 1
    dead: set[int] = field(default_factory=set)
    die_after: dict[int, int] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    # (path, affinity key or None, replica that answered or -1 for a 500) per request
    routed: list[tuple[str, str | None, int]] = field(default_factory=list)

    def _open(self, replica: int) -> bool:
        return self.failures.get(replica, 0) >= self.breaker

    def _pick(self, key: str | None) -> int:
        if key is None:
            return 0
        replica = self.sessions.get(key)
        if replica is None or self._open(replica):
            live = [i for i in range(len(self.replicas)) if not self._open(i)]
            load = {i: sum(1 for r in self.sessions.values() if r == i) for i in live}
            replica = min(live, key=lambda i: (load[i], i))
            self.sessions[key] = replica
        return replica

    def on(self, replica: int, path: str = "/v1/completions") -> list[str | None]:
        """The affinity keys of the `path` requests `replica` answered."""
        return [k for p, k, r in self.routed if r == replica and p == path]

    def app(self) -> FastAPI:
        app = FastAPI()
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=r.app()), base_url="http://r")
            for r in self.replicas
        ]

        @app.post("/finish_session")
        async def finish(session_id: str) -> dict[str, Any]:
            self.finished.append(session_id)
            self.sessions.pop(session_id, None)
            return {"status": "ok", "session_id": session_id}

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {}

        @app.post("/{path:path}")
        async def forward(path: str, request: Request) -> Response:
            key = request.headers.get(self.header)
            replica = self._pick(key)
            limit = self.die_after.get(replica)
            if limit is not None and path == "v1/completions" and len(self.on(replica)) >= limit:
                self.dead.add(replica)
            if replica in self.dead:
                self.failures[replica] = self.failures.get(replica, 0) + 1
                self.routed.append(("/" + path, key, -1))
                url = INTERNAL_URL.format(n=replica)
                message = f"Request to {url}/{path} failed after 5 attempts: connection refused"
                return JSONResponse({"error": {"message": message}}, status_code=500)
            self.routed.append(("/" + path, key, replica))
            answer = await clients[replica].post("/" + path, content=await request.body())
            return Response(answer.content, answer.status_code, media_type="application/json")

        return app
