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
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.fake_vllm import FakeVLLM
from tests.support.faults import ThreadServer
from tests.support.gateway import MODEL, script
from tests.support.servers import ServerProcess, cli, free_port
from tts_server.prm_worker import create_app as create_prm_app
from tts_server.prm_worker.backends.arith import ArithBackend

STRATEGIES = ["greedy", "majority", "best_of_n", "beam_search", "dvts", "auto"]
QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> tuple[int, int]:
    """(all descriptors, sockets) of the process."""
    fds = list(Path(f"/proc/{pid}/fd").iterdir())
    sockets = 0
    for fd in fds:
        with contextlib.suppress(OSError):  # closed while we looked
            sockets += os.readlink(fd).startswith("socket:")
    return len(fds), sockets


async def load(url: str, duration_s: float, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop_at = time.monotonic() + duration_s

    async def worker(k: int, client: httpx.AsyncClient) -> None:
        i = k
        while time.monotonic() < stop_at:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": QUESTION}],
                "tts": {"strategy": STRATEGIES[i % len(STRATEGIES)], "budget": 4, "beam_width": 2},
            }
            started = time.perf_counter()
            try:
                response = await client.post(url + "/v1/chat/completions", json=body)
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            i += concurrency

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(k, client) for k in range(concurrency)))
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "errors": sum(v for k, v in statuses.items() if k != 200),
        "rps": round(len(latencies) / duration_s, 2),
        "latency_p50_s": round(statistics.median(ordered), 4) if ordered else None,
        "latency_p95_s": round(ordered[int(0.95 * (len(ordered) - 1))], 4) if ordered else None,
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
    profile = folder / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    vllm = ThreadServer(FakeVLLM(script=script, model=MODEL).app()).start()
    prm = ThreadServer(create_prm_app(ArithBackend())).start()
    port = free_port()
    env = {
        "TTS_POLICY_MODEL": MODEL,
        "TTS_PROMPT_PROFILES": json.dumps({MODEL: str(profile)}),
        "TTS_POLICY_PARAMS": "1000000",
        "TTS_PRM_PARAMS": "0",
        "TTS_MAX_IN_FLIGHT": str(max(16, args.concurrency)),
    }
    argv = cli("gateway", "--port", str(port), "--policy-url", vllm.url, "--prm-url", prm.url)
    gateway = ServerProcess("gateway", argv, port, folder).start(env)
    try:
        gateway.wait_healthy(60, path="/health/ready")
        assert gateway.process is not None
        pid = gateway.process.pid
        samples: list[dict[str, float]] = []

        async def run() -> dict[str, Any]:
            until = time.monotonic() + args.duration
            sampler = asyncio.ensure_future(sample(pid, 5.0, until, samples))
            result = await load(gateway.url, args.duration, args.concurrency)
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
        text = json.dumps(summary, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        ok = summary["errors"] == 0 and summary["rss_growth_pct"] < 10
        return 0 if ok else 1
    finally:
        gateway.stop()
        prm.stop()
        vllm.stop()


if __name__ == "__main__":
    sys.exit(main())
