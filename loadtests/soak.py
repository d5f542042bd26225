"""Soak: a bounded loopback load against a real gateway process over fake upstreams.

Starts the fake vLLM and the PRM worker app (arith) on 127.0.0.1 in this process, the gateway as
its own process (`tts-server gateway`), then sends chat requests with mixed strategies at a fixed
concurrency for `--duration` seconds and stops by itself. It samples the gateway's RSS and open
file descriptors (sockets included) from /proc every few seconds and prints a JSON summary:
errors, throughput, latency, RSS growth after warm-up, descriptor growth.

    .venv/bin/python -m loadtests.soak --duration 600 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtests.stack import (
    chat_clients,
    open_fds,
    percentile,
    print_summary,
    rss_bytes,
    soak_stack,
)

STRATEGIES = ["greedy", "majority", "best_of_n", "beam_search", "dvts", "auto"]


async def load(url: str, duration_s: float, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    chat = url + "/v1/chat/completions"
    await chat_clients(chat, duration_s, concurrency, STRATEGIES, latencies, statuses)
    return {
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": sum(v for k, v in statuses.items() if k != 200),
        "rps": round(len(latencies) / duration_s, 2),
        "latency_p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "latency_p95_s": percentile(latencies, 0.95),
    }


async def sample(pid: int, every_s: float, until: float, out: list[dict[str, float]]) -> None:
    started = time.monotonic()
    while time.monotonic() < until:
        fds, sockets = open_fds(pid)
        out.append(
            {
                "t": round(time.monotonic() - started, 1),
                "rss": rss_bytes(pid),
                "fds": fds,
                "sockets": sockets,
            }
        )
        await asyncio.sleep(every_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS base")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="tts-soak-"))
    env = {"TTS_MAX_IN_FLIGHT": str(max(16, args.concurrency))}
    with soak_stack(folder, env) as stack:
        pid = stack.pid
        samples: list[dict[str, float]] = []

        async def run() -> dict[str, Any]:
            until = time.monotonic() + args.duration
            sampler = asyncio.ensure_future(sample(pid, 5.0, until, samples))
            result = await load(stack.gateway.url, args.duration, args.concurrency)
            await sampler
            return result

        print(f"soak: {args.duration:g} s at concurrency {args.concurrency}...", file=sys.stderr)
        summary = asyncio.run(run())
        base = next((s for s in samples if s["t"] >= args.warmup), samples[0])
        last = samples[-1]
        summary.update(
            {
                "duration_s": args.duration,
                "concurrency": args.concurrency,
                "rss_after_warmup_mib": round(base["rss"] / 2**20, 1),
                "rss_end_mib": round(last["rss"] / 2**20, 1),
                "rss_growth_pct": round(100 * (last["rss"] - base["rss"]) / base["rss"], 1),
                "fds_after_warmup": base["fds"],
                "fds_end": last["fds"],
                "sockets_after_warmup": base["sockets"],
                "sockets_end": last["sockets"],
                "sockets_max": max(s["sockets"] for s in samples),
            }
        )
        print_summary(summary, args.out)
        ok = summary["errors"] == 0 and summary["rss_growth_pct"] < 10
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
