"""The PRM client: the PRM worker's HTTP API (`POST /v1/score`), as a `PRMClient`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import httpx

from tts_server.reliability import RetryPolicy, send_with_retries
from tts_server.types import PRMUsage


class PRMError(Exception):
    """The PRM worker failed, refused or could not be reached. `status` is its HTTP status."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class HTTPPRMClient:
    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        client: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=128, max_keepalive_connections=32),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def score(
        self, question: str, solutions: Sequence[Sequence[str]], usage: PRMUsage
    ) -> list[list[float]]:
        if not any(solutions):
            return [[] for _ in solutions]  # nothing to score: no call
        body = {"question": question, "solutions": [list(steps) for steps in solutions]}
        data = await self._post("/v1/score", body)
        scores = _parse_scores(data, solutions)
        usage.calls += 1
        usage.steps_scored += _count(data, "steps_scored", sum(len(s) for s in solutions))
        usage.steps_cached += _count(data, "steps_cached", 0)
        usage.tokens += _count(data, "tokens", 0)
        return scores

    async def parameters(self) -> int | None:
        """The PRM's parameter count as the worker reports it (0 for a checker without weights)."""
        try:
            response = await self._client.get(self.base_url + "/v1/models", timeout=5.0)
            cards = response.json().get("data", [])
            value = cards[0].get("parameters")
        except (httpx.HTTPError, ValueError, AttributeError, IndexError, TypeError):
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    async def health(self) -> bool:
        try:
            response = await self._client.get(self.base_url + "/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.base_url + path
        try:
            response = await send_with_retries(
                lambda: self._client.post(url, json=body), self.retry
            )
        except httpx.TimeoutException as exc:
            raise PRMError(f"no answer within {self.timeout:g} s", status=504) from exc
        except httpx.HTTPError as exc:
            raise PRMError(f"unreachable ({type(exc).__name__})") from exc
        if response.status_code != 200:
            status = response.status_code
            raise PRMError(f"HTTP {status}: {_error_message(response)}", status=status)
        try:
            data = response.json()
        except ValueError as exc:
            raise PRMError("answered with invalid JSON", status=200) from exc
        if not isinstance(data, dict):
            raise PRMError(f"answered with a JSON {type(data).__name__}, not an object")
        return data


def _parse_scores(data: dict[str, Any], solutions: Sequence[Sequence[str]]) -> list[list[float]]:
    raw = data.get("scores")
    if not isinstance(raw, list) or len(raw) != len(solutions):
        raise PRMError(f"malformed response: expected {len(solutions)} score lists")
    scores: list[list[float]] = []
    for i, (row, steps) in enumerate(zip(raw, solutions, strict=True)):
        if not isinstance(row, list) or len(row) != len(steps):
            raise PRMError(f"malformed response: solution {i} needs {len(steps)} scores")
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


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "no error message"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return response.reason_phrase or "no error message"
