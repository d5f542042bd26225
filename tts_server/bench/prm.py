"""The PRM path: steps a PRM worker scores per second under concurrent requests (shared with
loadtests/prm_bench.py, which serves a tiny PRM with vLLM), and what PRM scoring adds to each
search step as the gateway saw it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import httpx

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


async def warm_up(client: httpx.AsyncClient, url: str) -> None:
    body = {"question": "warm-up", "solutions": [["1 + 1 = 2."]]}
    (await client.post(url + "/v1/score", json=body)).raise_for_status()


async def throughput(url: str, concurrency: int, requests: int) -> dict[str, float]:
    """Steps scored per second over `requests` new requests (two 4-step solutions each, every
    one different, so no cache answers them) sent from `concurrency` loops."""
    counter = iter(range(requests))
    steps = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal steps
        for i in counter:
            solutions = [
                [f"Step one of {i}-{j}: 3 + 4 = 7.", "Then 7 - 1 = 6.", "So 6 * 2 = 12.", "Done."]
                for j in range(2)
            ]
            response = await client.post(
                url + "/v1/score", json={"question": QUESTION, "solutions": solutions}
            )
            response.raise_for_status()
            steps += response.json()["steps_scored"]

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        await warm_up(client, url)
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"steps_per_s": steps / elapsed, "seconds": elapsed, "steps": steps}


def per_step_latency(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """From a step search's gateway records: PRM seconds per search step (the PRM call is on
    each step's critical path) against generation seconds per step."""
    prm, gen, steps = 0.0, 0.0, 0
    for record in records:
        stages, iterations = record.get("stage_seconds") or {}, record.get("iterations") or 0
        if "error" in record or not iterations:
            continue
        prm += float(stages.get("prm_scoring", 0.0))
        gen += float(stages.get("generation", 0.0))
        steps += int(iterations)
    if not steps:
        return {"prm_s_per_step": None, "generation_s_per_step": None, "steps": 0}
    return {"prm_s_per_step": prm / steps, "generation_s_per_step": gen / steps, "steps": steps}
