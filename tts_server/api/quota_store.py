"""Where the per-key quota counters live: in this process (each gateway worker counts apart) or
in Redis (`TTS_REDIS_URL`: every worker and replica shares them).

A counter is one fixed window of one kind for one key: requests, tokens and FLOPs per minute,
FLOPs per day. Its name holds the key's hash prefix, the kind and the window's index, never a
key or a prompt (`tts:quota:<hash>:<kind>:<window>`), and it expires by itself a window after
its own ends. Admitting a request checks every counter of its key and counts the request in one
step (a Lua script in Redis), so two workers never both take the last request of a budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

KINDS = ("requests", "tokens", "flops_minute", "flops_day")
WINDOW_S = {"requests": 60, "tokens": 60, "flops_minute": 60, "flops_day": 86_400}


def window(kind: str, now: float) -> tuple[int, float]:
    """The window's index and the time it ends."""
    length = WINDOW_S[kind]
    index = math.floor(now / length)
    return index, (index + 1) * length


@dataclass(frozen=True)
class Admitted:
    """The counts of a key's current windows after admitting (the request counted) or refusing
    (`refused` names the first exhausted kind; nothing counted)."""

    counts: dict[str, int]
    refused: str | None = None


class QuotaStore(Protocol):
    # What the store raises when it is unreachable (then admitting fails open or closed).
    errors: tuple[type[Exception], ...]

    async def admit(self, key: str, limits: Mapping[str, int], now: float) -> Admitted: ...

    async def charge(self, key: str, amounts: Mapping[str, int], now: float) -> dict[str, int]:
        """Add `amounts` by kind; the new totals of those kinds."""
        ...

    async def aclose(self) -> None: ...


class MemoryStore:
    """Counters in this process: exact within one worker, not shared between workers."""

    errors: tuple[type[Exception], ...] = ()

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], int] = {}
        self._ends: dict[tuple[str, str, int], float] = {}

    def _purge(self, now: float) -> None:
        for name in [n for n, end in self._ends.items() if end <= now]:
            self._counts.pop(name, None)
            del self._ends[name]

    def _name(self, key: str, kind: str, now: float) -> tuple[str, str, int]:
        index, end = window(kind, now)
        name = (key, kind, index)
        self._ends.setdefault(name, end)
        return name

    async def admit(self, key: str, limits: Mapping[str, int], now: float) -> Admitted:
        self._purge(now)
        names = {kind: self._name(key, kind, now) for kind in KINDS}
        counts = {kind: self._counts.get(name, 0) for kind, name in names.items()}
        for kind in KINDS:
            if kind in limits and counts[kind] >= limits[kind]:
                return Admitted(counts, kind)
        counts["requests"] += 1
        self._counts[names["requests"]] = counts["requests"]
        return Admitted(counts)

    async def charge(self, key: str, amounts: Mapping[str, int], now: float) -> dict[str, int]:
        totals = {}
        for kind, amount in amounts.items():
            name = self._name(key, kind, now)
            totals[kind] = self._counts[name] = self._counts.get(name, 0) + amount
        return totals

    async def aclose(self) -> None:
        pass


# KEYS: the requests, tokens, flops_minute and flops_day counters of the current windows.
# ARGV 1-4: their limits (-1: none); ARGV 5-8: when each counter expires (unix seconds).
# Returns {refused kind's position or 0, count, count, count, count} (counts as strings: FLOPs
# pass 2^53).
ADMIT_SCRIPT = """
local raw, counts = {}, {}
for i = 1, 4 do
  raw[i] = redis.call('GET', KEYS[i]) or '0'
  counts[i] = tonumber(raw[i])
end
for i = 1, 4 do
  local limit = tonumber(ARGV[i])
  if limit >= 0 and counts[i] >= limit then
    return {i, raw[1], raw[2], raw[3], raw[4]}
  end
end
raw[1] = tostring(redis.call('INCR', KEYS[1]))
redis.call('EXPIREAT', KEYS[1], ARGV[5])
return {0, raw[1], raw[2], raw[3], raw[4]}
"""


class RedisStore:
    """Counters in Redis, shared by every worker and replica that points at it."""

    def __init__(self, url: str, timeout_s: float) -> None:
        from redis.asyncio import Redis  # only when configured
        from redis.exceptions import RedisError

        self.errors: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)
        self._redis: Any = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        self._admit = self._redis.register_script(ADMIT_SCRIPT)

    @staticmethod
    def _name(key: str, kind: str, now: float) -> tuple[str, int]:
        index, end = window(kind, now)
        # Kept a window past its end: replicas whose clocks differ a little still agree.
        return f"tts:quota:{key}:{kind}:{index}", math.ceil(end + WINDOW_S[kind])

    async def admit(self, key: str, limits: Mapping[str, int], now: float) -> Admitted:
        names = [self._name(key, kind, now) for kind in KINDS]
        args = [limits.get(kind, -1) for kind in KINDS] + [expiry for _, expiry in names]
        reply = await self._admit(keys=[name for name, _ in names], args=args)
        position = int(reply[0])
        counts = {kind: int(value) for kind, value in zip(KINDS, reply[1:], strict=True)}
        return Admitted(counts, KINDS[position - 1] if position else None)

    async def charge(self, key: str, amounts: Mapping[str, int], now: float) -> dict[str, int]:
        async with self._redis.pipeline(transaction=True) as pipe:
            for kind, amount in amounts.items():
                name, expiry = self._name(key, kind, now)
                pipe.incrby(name, amount)
                pipe.expireat(name, expiry)
            reply = await pipe.execute()
        return {kind: int(total) for kind, total in zip(amounts, reply[::2], strict=True)}

    async def aclose(self) -> None:
        await self._redis.aclose()
