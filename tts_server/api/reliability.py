"""What keeps the gateway trustworthy under bad input, load and faults: API keys, admission
control (bounded in-flight + bounded queue, else 429), readiness probing of the upstreams, and
draining on shutdown. No HTTP framework here; retrying upstream calls is the clients' part
(tts_server/clients/http.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

logger = logging.getLogger("tts_server.gateway")


# --- API keys ---


def hash_key(key: str) -> str:
    """The form in which a key is stored in settings (`tts-server hash-key`)."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyChecker:
    """Checks `Authorization: Bearer <key>` against stored SHA-256 hashes, in constant time."""

    def __init__(self, hashes: list[str]) -> None:
        self._hashes = [bytes.fromhex(h.strip().lower()) for h in hashes if h.strip()]

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def allows(self, authorization: str | None) -> bool:
        return self.identify(authorization) is not None

    def identify(self, authorization: str | None) -> str | None:
        """The matched key's SHA-256 hex digest ("" when no keys are set), None when refused."""
        if not self._hashes:
            return ""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hashlib.sha256(key.strip().encode()).digest()
        matched = False
        for stored in self._hashes:  # every hash compared: the time does not tell which matched
            matched |= hmac.compare_digest(digest, stored)
        return digest.hex() if matched else None


# --- admission control ---


class Rejected(Exception):
    """No room: answer 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class Admission:
    """At most `max_in_flight` requests run; up to `max_queue` more wait, each at most
    `queue_timeout_s`; the rest are rejected at once."""

    def __init__(self, max_in_flight: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_in_flight = max(1, max_in_flight)
        self.max_queue = max(0, max_queue)
        self.queue_timeout_s = queue_timeout_s
        self.running = 0
        self.queued = 0
        self._slots = asyncio.Semaphore(self.max_in_flight)

    def _retry_after(self) -> int:
        return max(1, min(60, int(self.queue_timeout_s) or 1))

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self.running >= self.max_in_flight and self.queued >= self.max_queue:
            raise Rejected(
                f"the server is at capacity ({self.max_in_flight} running, "
                f"{self.max_queue} queued); retry later",
                self._retry_after(),
            )
        self.queued += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.queue_timeout_s)
        except TimeoutError:
            raise Rejected(
                f"no capacity within {self.queue_timeout_s:g} s; retry later", self._retry_after()
            ) from None
        finally:
            self.queued -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


# --- readiness ---


class Readiness:
    """Probes the policy and the PRM every `interval_s`; ready = both healthy and not draining."""

    def __init__(
        self,
        policy_health: Callable[[], Awaitable[bool]],
        prm_health: Callable[[], Awaitable[bool]],
        interval_s: float,
    ) -> None:
        self._policy_health = policy_health
        self._prm_health = prm_health
        self.interval_s = interval_s
        self.policy_ok = True
        self.prm_ok = True
        self.draining = False
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.policy_ok and self.prm_ok and not self.draining

    async def probe_once(self) -> None:
        policy_ok, prm_ok = await asyncio.gather(self._policy_health(), self._prm_health())
        if (policy_ok, prm_ok) != (self.policy_ok, self.prm_ok):
            logger.warning("upstreams: policy %s, PRM %s", _state(policy_ok), _state(prm_ok))
        self.policy_ok, self.prm_ok = policy_ok, prm_ok

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="readiness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.probe_once()
            except Exception as exc:  # a probe must never kill the loop
                logger.error("readiness probe failed: %s", type(exc).__name__)
            await asyncio.sleep(self.interval_s)


def _state(ok: bool) -> str:
    return "up" if ok else "DOWN"
