"""Per-key quotas: requests and tokens per minute, FLOPs per minute and per day.

Limits come from settings for every key (`TTS_QUOTA_*`) and, per key, from the keys file
(`TTS_API_KEYS_FILE`, TOML: a `[[keys]]` table per key with its `hash` and any of the four
limits, which override the settings'). A request is admitted only while every limited counter of
its key is below its limit (the request is then counted); otherwise 429 with `Retry-After` and
OpenAI's `x-ratelimit-*` headers. Tokens and FLOPs are charged as the answer is computed, call
by call, and a request's FLOPs ceiling (`max_flops`) is capped at what its key has left.

Keys are known here by a prefix of their SHA-256 (`KEY_LABEL_CHARS` hex digits), the form in
which the counters' names and the metrics' labels carry them; no key and no prompt ever.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from tts_server.api import metrics
from tts_server.api.quota_store import KINDS, Admitted, MemoryStore, QuotaStore, window

logger = logging.getLogger("tts_server.gateway")

KEY_LABEL_CHARS = 16
ANONYMOUS = "anonymous"  # every client, when the gateway has no API keys
# Response header suffix per kind: OpenAI's two, then ours in the same pattern.
HEADER_SUFFIX = {
    "requests": "requests",
    "tokens": "tokens",
    "flops_minute": "flops",
    "flops_day": "flops-day",
}
REFUSALS = {
    "requests": "requests per minute",
    "tokens": "tokens per minute",
    "flops_minute": "FLOPs per minute",
    "flops_day": "FLOPs per day",
}
STORE_DOWN = "the quota store is unavailable; retry later"


def clock() -> float:
    """Wall-clock seconds: windows are calendar minutes and days, the same in every replica."""
    return time.time()


def key_label(digest_hex: str) -> str:
    return digest_hex[:KEY_LABEL_CHARS].lower()


def reset_text(seconds: float) -> str:
    """A duration as OpenAI's reset headers write it: 850ms, 17s, 6m0s, 23h59m59s."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass
class Spending:
    """One admitted request's view of its key's budget: what it may still spend, the charges it
    sends as the answer is computed, and the headers its response carries."""

    quotas: Quotas
    key: str
    limits: dict[str, int]
    counts: dict[str, int]
    now: float
    known: bool = True  # False: the store was down and the request failed open
    _pending: dict[str, int] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    @property
    def flops_left(self) -> int | None:
        """What the key may still spend in FLOPs (None: no FLOPs quota)."""
        left = [
            self.limits[k] - self.counts.get(k, 0)
            for k in ("flops_minute", "flops_day")
            if k in self.limits
        ]
        return max(0, min(left)) if left and self.known else None

    def refuse_flops(self, needed: int) -> QuotaRefused | None:
        """The refusal of a request whose first call cannot fit in what its key has left, at
        `needed` FLOPs at the least: under that ceiling it would only get empty answers."""
        left = self.flops_left
        if left is None or left >= needed:
            return None
        kind = min(
            (k for k in ("flops_minute", "flops_day") if k in self.limits),
            key=lambda k: self.limits[k] - self.counts.get(k, 0),
        )
        return self.quotas.refusal(kind, self.limits, self.counts, self.now, self.headers())

    def spend(self, tokens: int, flops: int) -> None:
        """An upstream call's cost, charged in the background (Account.on_spend)."""
        for kind, amount in (("tokens", tokens), ("flops_minute", flops), ("flops_day", flops)):
            if amount and kind in self.limits:
                self._pending[kind] = self._pending.get(kind, 0) + amount
        if self._pending and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        while self._pending:
            amounts, self._pending = self._pending, {}
            totals = await self.quotas.charge(self.key, amounts)
            self.counts.update(totals)

    async def flush(self) -> None:
        """Wait for the charges sent so far (the headers then count them)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for kind in KINDS:
            if kind not in self.limits:
                continue
            suffix = HEADER_SUFFIX[kind]
            headers[f"x-ratelimit-limit-{suffix}"] = str(self.limits[kind])
            if self.known:
                left = max(0, self.limits[kind] - self.counts.get(kind, 0))
                headers[f"x-ratelimit-remaining-{suffix}"] = str(left)
                # The window the counts are of, from now (a long answer's headers go late).
                ends = window(kind, self.now)[1]
                headers[f"x-ratelimit-reset-{suffix}"] = reset_text(max(0.0, ends - clock()))
        return headers


class QuotaRefused(Exception):
    """Over a quota (429) or, failing closed, the store is down (503)."""

    def __init__(self, status: int, message: str, retry_after_s: int, headers: dict[str, str]):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s
        self.headers = headers


class Quotas:
    """Admits requests against their key's limits and charges what they spend."""

    def __init__(
        self,
        defaults: Mapping[str, int],
        per_key: Mapping[str, Mapping[str, int]],
        store: QuotaStore | None = None,
        *,
        fail_open: bool = True,
    ) -> None:
        self.defaults = dict(defaults)
        self.per_key = {key_label(h): {**self.defaults, **limits} for h, limits in per_key.items()}
        self.store: QuotaStore = store or MemoryStore()
        self.fail_open = fail_open
        self._store_down = False

    @property
    def enabled(self) -> bool:
        return bool(self.defaults) or any(self.per_key.values())

    def limits_for(self, key: str) -> dict[str, int]:
        return self.per_key.get(key, self.defaults)

    async def admit(self, key: str) -> Spending | None:
        """The request's Spending once counted (None: its key has no limits), else QuotaRefused."""
        limits = self.limits_for(key)
        if not limits:
            return None
        now = clock()
        try:
            admitted: Admitted = await self.store.admit(key, limits, now)
        except self.store.errors as exc:  # unreachable, timed out
            self._down(exc)
            if self.fail_open:
                return Spending(self, key, limits, {}, now, known=False)
            metrics.REJECTIONS.labels("quota_store").inc()
            raise QuotaRefused(503, STORE_DOWN, 1, {}) from None
        self._up()
        spending = Spending(self, key, limits, dict(admitted.counts), now)
        self._observe(key, spending)
        if admitted.refused is not None:
            raise self.refusal(admitted.refused, limits, admitted.counts, now, spending.headers())
        return spending

    @staticmethod
    def refusal(
        kind: str,
        limits: dict[str, int],
        counts: dict[str, int],
        now: float,
        headers: dict[str, str],
    ) -> QuotaRefused:
        metrics.REJECTIONS.labels(f"quota_{kind}").inc()
        reset = window(kind, now)[1] - now
        return QuotaRefused(
            429,
            f"rate limit reached for {REFUSALS[kind]}: limit {limits[kind]}, used "
            f"{counts.get(kind, 0)}; retry in {reset_text(reset)}",
            max(1, math.ceil(reset)),
            headers,
        )

    async def charge(self, key: str, amounts: Mapping[str, int]) -> dict[str, int]:
        try:
            totals = await self.store.charge(key, amounts, clock())
        except self.store.errors as exc:
            self._down(exc)  # the charge is lost; admitting decides open or closed
            return {}
        self._up()
        limits = self.limits_for(key)
        for kind, total in totals.items():
            metrics.QUOTA_REMAINING.labels(key, kind).set(max(0, limits[kind] - total))
        return totals

    def _observe(self, key: str, spending: Spending) -> None:
        for kind, limit in spending.limits.items():
            left = max(0, limit - spending.counts.get(kind, 0))
            metrics.QUOTA_REMAINING.labels(key, kind).set(left)

    def _down(self, exc: Exception) -> None:
        if not self._store_down:
            self._store_down = True
            logger.error(
                "quota store unavailable (%s): failing %s until it answers again",
                type(exc).__name__,
                "open (requests are not counted)" if self.fail_open else "closed (503)",
            )

    def _up(self) -> None:
        if self._store_down:
            self._store_down = False
            logger.warning("quota store answers again")

    async def aclose(self) -> None:
        await self.store.aclose()
