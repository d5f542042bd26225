"""The inspector's memory of recent search traces: bounded by count and by age, each trace kept
with the digest of the API key that made it, so a client reads back only its own.

In process (per worker), never on disk: the trace export (TTS_TRACE_DIR) is what keeps traces.
"""

from __future__ import annotations

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
    """At most `max_traces` traces, none older than `max_age_s`; the oldest go first. A key
    sees the traces made with it; with no keys configured (owner "") everyone sees all."""

    def __init__(
        self,
        max_traces: int,
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_traces = max_traces
        self.max_age_s = max_age_s
        self._clock = clock
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._items)

    def put(self, request_id: str, owner: str, endpoint: str, trace: dict[str, Any]) -> None:
        self._items[request_id] = Stored(
            request_id, owner, time.time(), self._clock(), endpoint, trace
        )
        self._items.move_to_end(request_id)
        while len(self._items) > self.max_traces:
            self._items.popitem(last=False)
        self._expire()

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

    def _expire(self) -> None:
        oldest = self._clock() - self.max_age_s
        while self._items:
            first = next(iter(self._items.values()))
            if first.at >= oldest:
                break
            self._items.popitem(last=False)
