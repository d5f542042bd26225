"""The inspector's memory of recent search traces: bounded by count and by age, each trace kept
with the digest of the API key that made it, so a client reads back only its own.

In process (per worker), never on disk: the trace export (TTS_TRACE_DIR) is what keeps traces.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stored:
    id: str
    owner: str  # the key's SHA-256 hex digest ("" when the server has no keys)
    created: float  # wall clock, for the client
    at: float  # monotonic, for the age limit
    endpoint: str
    trace: dict[str, Any]
    size: int  # bytes of its JSON: what the byte limit counts

    def summary(self) -> dict[str, Any]:
        trace = self.trace
        return {
            "id": self.id,
            "created": int(self.created),
            "endpoint": self.endpoint,
            "strategy": trace.get("strategy"),
            "budget": trace.get("budget"),
            "kind": trace.get("kind"),
            "answer": trace.get("answer"),
        }

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "tts.trace",
            "created": int(self.created),
            "endpoint": self.endpoint,
            "trace": self.trace,
        }


class TraceStore:
    """At most `max_traces` traces holding at most `max_bytes` of JSON in all, none older than
    `max_age_s`; the oldest go first (a trace larger than `max_bytes` alone is not kept). A key
    sees the traces made with it; with no keys configured (owner "") everyone sees all."""

    def __init__(
        self,
        max_traces: int,
        max_age_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_traces = max_traces
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def put(self, request_id: str, owner: str, endpoint: str, trace: dict[str, Any]) -> bool:
        """Keep a trace (False: larger than the whole store may hold, not kept)."""
        size = len(json.dumps(trace, separators=(",", ":")).encode())
        self._drop(request_id)
        if size > self.max_bytes:
            return False
        item = Stored(request_id, owner, time.time(), self._clock(), endpoint, trace, size)
        self._items[request_id] = item
        self._bytes += size
        while len(self._items) > self.max_traces or self._bytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        self._expire()
        return True

    def get(self, request_id: str, owner: str) -> Stored | None:
        """The trace, or None when there is none (expired, never stored, or another key's:
        the same answer, so a client cannot tell another key's ids exist)."""
        self._expire()
        item = self._items.get(request_id)
        if item is None or item.owner != owner:
            return None
        return item

    def recent(self, owner: str) -> list[Stored]:
        """The key's traces, newest first."""
        self._expire()
        return [item for item in reversed(self._items.values()) if item.owner == owner]

    def _drop(self, request_id: str) -> None:
        item = self._items.pop(request_id, None)
        if item is not None:
            self._bytes -= item.size

    def _expire(self) -> None:
        oldest = self._clock() - self.max_age_s
        while self._items:
            first = next(iter(self._items.values()))
            if first.at >= oldest:
                break
            self._drop(first.id)
