"""Releasing a finished request's affinity keys at the router (vllm-router's
`POST /finish_session?session_id=KEY`), so its session table does not keep them for hours.

Best effort and off the response's path: `release` only schedules the calls; each is bounded by
a timeout, and a failure is counted (`on_outcome`) and logged once, never raised.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import httpx

logger = logging.getLogger("tts_server.clients")


class SessionRelease:
    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        client: httpx.AsyncClient | None = None,
        on_outcome: Callable[[bool], None] | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.on_outcome = on_outcome
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._pending: set[asyncio.Task[None]] = set()
        self._warned = False

    def release(self, keys: Sequence[str]) -> None:
        """Schedule the release of `keys`; returns at once."""
        if not keys:
            return
        task = asyncio.get_running_loop().create_task(self._release_all(list(keys)))
        self._pending.add(task)  # a reference, or the loop may drop the task half-way
        task.add_done_callback(self._pending.discard)

    async def _release_all(self, keys: list[str]) -> None:
        await asyncio.gather(*(self._release(key) for key in keys))

    async def _release(self, key: str) -> None:
        try:
            response = await asyncio.wait_for(
                self._client.post(self.url, params={"session_id": key}), self.timeout_s
            )
            ok, why = response.status_code == 200, f"HTTP {response.status_code}"
        except (httpx.HTTPError, TimeoutError) as exc:
            ok, why = False, type(exc).__name__
        if self.on_outcome is not None:
            self.on_outcome(ok)
        if not ok:
            # Once at warning (a misconfigured URL fails every release), then quietly.
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            logger.log(level, "releasing an affinity session at %s failed: %s", self.url, why)

    async def wait_idle(self) -> None:
        """Until the releases scheduled so far are done (each is bounded by the timeout)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def aclose(self) -> None:
        await self.wait_idle()
        await self._client.aclose()
