"""The PRM client: the PRM worker's HTTP API (`POST /v1/score`), as a `PRMClient`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import httpx

from tts_server.clients.http import RetryPolicy, Upstream, UpstreamError
from tts_server.types import PRMUsage


class PRMError(UpstreamError):
    """The PRM worker failed, refused or could not be reached. Unlike the policy's, `status`
    keeps the worker's own status when it refused; the gateway answers 502 for anything but a
    timeout (504)."""

    @classmethod
    def answer_status(cls, upstream_status: int) -> int:
        return upstream_status


class HTTPPRMClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        client: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
        affinity_header: str | None = None,
    ) -> None:
        self._upstream = Upstream(
            base_url,
            error=PRMError,
            timeout=timeout,
            connections=128,
            retry=retry,
            client=client,
            affinity_header=affinity_header,
        )

    async def aclose(self) -> None:
        await self._upstream.aclose()

    async def score(
        self,
        question: str,
        solutions: Sequence[Sequence[str]],
        usage: PRMUsage,
        *,
        context: Sequence[int] | None = None,
        affinity: str | None = None,
    ) -> list[list[float]]:
        first = list(context) if context is not None else [0] * len(solutions)
        wanted = [len(steps) - f for steps, f in zip(solutions, first, strict=True)]
        if not any(wanted):
            return [[] for _ in solutions]  # nothing to score: no call
        body: dict[str, Any] = {
            "question": question,
            "solutions": [list(steps) for steps in solutions],
        }
        if any(first):
            body["context_steps"] = first
        data = await self._upstream.post_json("/v1/score", body, affinity=affinity)
        scores = _parse_scores(data, wanted)
        usage.calls += 1
        usage.steps_scored += _count(data, "steps_scored", sum(wanted))
        usage.steps_cached += _count(data, "steps_cached", 0)
        usage.tokens += _count(data, "tokens", 0)
        return scores

    async def parameters(self) -> int | None:
        """The PRM's parameter count as the worker reports it (0 for a checker without weights)."""
        value = (await self._card()).get("parameters")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    async def model_name(self) -> str | None:
        value = (await self._card()).get("id")
        return value if isinstance(value, str) else None

    async def _card(self) -> dict[str, Any]:
        """The worker's model card (empty when it cannot be read)."""
        try:
            card = (await self._upstream.get_json("/v1/models"))["data"][0]
        except (PRMError, LookupError, TypeError):
            return {}
        return card if isinstance(card, dict) else {}

    async def health(self) -> bool:
        return await self._upstream.health()


def _parse_scores(data: dict[str, Any], wanted: list[int]) -> list[list[float]]:
    raw = data.get("scores")
    if not isinstance(raw, list) or len(raw) != len(wanted):
        raise PRMError(f"malformed response: expected {len(wanted)} score lists")
    scores: list[list[float]] = []
    for i, (row, count) in enumerate(zip(raw, wanted, strict=True)):
        if not isinstance(row, list) or len(row) != count:
            raise PRMError(f"malformed response: solution {i} needs {count} scores")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in row):
            raise PRMError(f"malformed response: non-numeric score for solution {i}")
        values = [float(v) for v in row]
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise PRMError(f"malformed response: score outside [0, 1] for solution {i}")
        scores.append(values)
    return scores


def _count(data: dict[str, Any], key: str, default: int) -> int:
    value = data.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default
