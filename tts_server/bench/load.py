"""A closed loop of requests at a fixed concurrency, bounded in count and time, and what each
answer was: latency, the extracted answer, whether it is right."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tts_server.answers import answers_equal, canonical_answer, extract_answer


@dataclass(frozen=True)
class Call:
    """One request of a cell: where it goes, and the answer it should give."""

    id: str
    expected: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


# A 200 response body -> (the answer it gives, what else to keep of it).
Reader = Callable[[dict[str, Any]], tuple[str | None, dict[str, Any]]]


def _content(choice: dict[str, Any]) -> str:
    message = choice.get("message")
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return str(choice.get("text") or "")


def read_gateway(data: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The gateway's chosen answer, and the search's own account of itself."""
    tts = data.get("tts") or {}
    answer = tts.get("answer")
    if answer is None and data.get("choices"):
        answer = extract_answer(_content(data["choices"][0]))
    extra = {
        "iterations": tts.get("iterations"),
        "stage_seconds": tts.get("stage_seconds") or {},
        "usage": data.get("usage") or {},
    }
    return answer, extra


def read_vote(data: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Direct vLLM: the most common answer among the choices (one choice: its answer)."""
    answers = [extract_answer(_content(c)) for c in data.get("choices") or []]
    found = [canonical_answer(a) for a in answers if a is not None]
    answer = Counter(found).most_common(1)[0][0] if found else None
    return answer, {"usage": data.get("usage") or {}}


def read_text(data: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """A peer's response: the answer stated in its first choice's text."""
    choices = data.get("choices") or []
    answer = extract_answer(_content(choices[0])) if choices else None
    return answer, {"usage": data.get("usage") or {}}


def is_right(answer: str | None, expected: str) -> bool:
    return answer is not None and answers_equal(answer, expected)


async def _one(
    client: httpx.AsyncClient, base_url: str, call: Call, reader: Reader, score: bool = True
) -> dict[str, Any]:
    started = time.perf_counter()
    record: dict[str, Any] = {"id": call.id, "started_at": started}
    try:
        response = await client.post(base_url + call.path, json=call.body, headers=call.headers)
    except httpx.HTTPError as exc:
        return {**record, "error": f"{type(exc).__name__}: {exc}"[:300]}
    record["latency_s"] = time.perf_counter() - started
    if response.status_code != 200:
        return {**record, "error": f"HTTP {response.status_code}: {response.text[:300]}"}
    answer, extra = reader(response.json())
    if not score:
        return {**record, "answer": answer, **extra}
    # math-verify is CPU work: off the loop, or it delays the next request's timing.
    right = await asyncio.to_thread(is_right, answer, call.expected)
    return {**record, "answer": answer, "correct": right, **extra}


async def closed_loop(
    client: httpx.AsyncClient,
    base_url: str,
    calls: Sequence[Call],
    reader: Reader,
    *,
    concurrency: int,
    time_limit_s: float,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    score: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """Send `calls` from `concurrency` loops, each starting its next call when its last one
    ends; none starts after `time_limit_s`. Returns the records in call order and the wall time.
    `score=False`: answers are not checked (math-verify costs the client CPU a cost
    measurement would rather leave to the gateway)."""
    queue = iter(enumerate(calls))
    records: dict[int, dict[str, Any]] = {}
    stop_at = time.monotonic() + time_limit_s
    base_url = base_url.rstrip("/")

    async def loop() -> None:
        for index, call in queue:
            if time.monotonic() >= stop_at:
                return
            records[index] = await _one(client, base_url, call, reader, score)
            if on_done is not None:
                on_done(records[index])

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(max(1, concurrency))))
    wall = time.perf_counter() - started
    return [records[i] for i in sorted(records)], wall


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(records: Sequence[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Counts, latency percentiles, answers per second and accuracy of one cell's records."""
    ok = [r for r in records if "error" not in r]
    latencies = [r["latency_s"] for r in ok]
    return {
        "requests": len(records),
        "answers": len(ok),
        "errors": len(records) - len(ok),
        "first_error": next((r["error"] for r in records if "error" in r), None),
        "wall_s": wall_s,
        "answers_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "mean_s": sum(latencies) / len(latencies) if latencies else None,
        "accuracy": sum(bool(r.get("correct")) for r in ok) / len(ok) if ok else None,
    }
