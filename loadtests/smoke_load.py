"""A bounded loopback load: N chat requests at concurrency C, mixed strategies, then a summary."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from urllib.parse import urlparse

import httpx

QUESTIONS = [
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "A box holds 12 pens. Sara takes 4. How many pens are left?",
    "Each bag has 6 marbles. How many marbles are in 7 bags?",
]
STRATEGIES = ["greedy", "majority", "best_of_n", "beam_search", "dvts"]


async def one(client: httpx.AsyncClient, url: str, model: str, i: int) -> tuple[float, int, int]:
    strategy = STRATEGIES[i % len(STRATEGIES)]
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % 3]}]}
    headers = {"X-TTS-Strategy": strategy, "X-TTS-Budget": "4", "X-TTS-Beam-Width": "2"}
    started = time.perf_counter()
    response = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
    tokens = response.json().get("usage", {}).get("total_tokens", 0) if response.is_success else 0
    return time.perf_counter() - started, response.status_code, tokens


async def main(url: str, requests: int, concurrency: int) -> int:
    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("load tests only target a gateway on this machine (127.0.0.1)")
    async with httpx.AsyncClient(timeout=600) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded(i: int) -> tuple[float, int, int]:
            async with semaphore:
                return await one(client, url, model, i)

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    errors = sum(1 for r in results if r[1] != 200)
    print(f"requests {requests}, concurrency {concurrency}, wall {wall:.1f} s")
    print(f"throughput {requests / wall:.2f} req/s, errors {errors}")
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"latency p50 {statistics.median(latencies):.2f} s, p95 {p95:.2f} s")
    print(f"mean tokens per answer {statistics.mean(r[2] for r in results):.0f}")
    return 1 if errors else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.url, args.requests, args.concurrency)))
