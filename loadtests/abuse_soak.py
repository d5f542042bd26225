"""Soak with abusive clients: do good clients keep their latency while others misbehave?

Starts a zero-latency fake vLLM and the PRM worker app (arith) on 127.0.0.1 in this process and
the gateway as its own process, with per-key quotas (a keys file: the good key generous, the
greedy key 60 requests and 2e10 FLOPs a minute), short slow-client deadlines and a connection cap.
Good clients (good key, mixed strategies, budget 4) run `--phase` seconds alone and as long
beside the abusers, alternating in blocks of `--block` seconds (so that the rest of a shared
machine's load weighs on both alike). The abusers run in a child process of their own:

- slowloris: `--stalled` connections that send a head (with the greedy key) and part of a
  body, then nothing, each reopened as soon as the gateway closes it;
- silent: connections that send nothing at all, reopened likewise;
- greedy: the greedy key sending best-of-16 requests as fast as `--greedy-concurrency`
  clients can (refused with 429 past its quota).

Prints a JSON summary: good latency (and the gateway's CPU share) alone and attacked, their
ratio, what the abusers got (statuses, 408s, connections cut, their own CPU seconds), the
gateway's rejections by reason, its descriptors mid-attack. Stops by itself; traffic only to
127.0.0.1.

    .venv/bin/python -m loadtests.abuse_soak                 # 2 x 30 s
    .venv/bin/python -m loadtests.abuse_soak --phase 150     # 5 minutes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.stack import (
    QUESTION,
    chat_clients,
    open_fds,
    percentile,
    print_summary,
    soak_stack,
)
from tests.support.gateway import MODEL
from tts_server.api.reliability import hash_key

STRATEGIES = ["greedy", "majority", "best_of_n", "beam_search", "dvts"]
GOOD_KEY, GREEDY_KEY = "sk-soak-good-0001", "sk-soak-greedy-0002"
MAX_PHASE_S = 150.0  # two phases: at most 5 minutes of load
# With a valid key (without one the gateway answers 401 at once, before the body).
STALLED_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Authorization: Bearer " + GREEDY_KEY.encode() + b"\r\n"
    b"Content-Length: 100000\r\n\r\n" + b'{"model": "' + b"x" * 512
)


@dataclass
class Block:
    """What the good clients saw in one block, and the gateway's CPU seconds meanwhile."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    gateway_cpu_s: float = 0.0
    seconds: float = 0.0


async def good_clients(url: str, duration_s: float, concurrency: int, block: Block) -> None:
    headers = {"Authorization": f"Bearer {GOOD_KEY}"}
    await chat_clients(
        url, duration_s, concurrency, STRATEGIES, block.latencies, block.statuses, headers
    )


def summarise(block: Block) -> dict[str, Any]:
    latencies = block.latencies
    return {
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(block.statuses.items())},
        "latency_p50_s": round(statistics.median(latencies), 4) if latencies else None,
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
        "gateway_cpu_share": round(block.gateway_cpu_s / block.seconds, 3),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_block(url: str, seconds: float, concurrency: int, pid: int, block: Block) -> None:
    cpu, started = cpu_seconds(pid), time.monotonic()
    asyncio.run(good_clients(url, seconds, concurrency, block))
    block.gateway_cpu_s += cpu_seconds(pid) - cpu
    block.seconds += time.monotonic() - started


# --- the abusers (run as a child process: --abuse PORT) ---


async def hold(port: int, payload: bytes, stop_at: float, seen: dict[str, int]) -> None:
    """One slow connection after another: each sends `payload` and then nothing."""
    while time.monotonic() < stop_at:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            seen["connect_failed"] += 1
            await asyncio.sleep(0.5)
            continue
        seen["opened"] += 1
        if payload:
            writer.write(payload)
        try:
            left = stop_at - time.monotonic()
            answer = await asyncio.wait_for(reader.read(), max(0.01, left))
            seen["cut"] += 1
            seen["got_408"] += answer.startswith(b"HTTP/1.1 408")
            seen["got_503"] += answer.startswith(b"HTTP/1.1 503")
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()


async def greedy(url: str, stop_at: float, statuses: dict[str, int]) -> None:
    headers = {"Authorization": f"Bearer {GREEDY_KEY}"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "tts": {"strategy": "best_of_n", "budget": 16},
    }
    async with httpx.AsyncClient(timeout=60) as client:
        while time.monotonic() < stop_at:
            try:
                status = str((await client.post(url, json=body, headers=headers)).status_code)
            except httpx.HTTPError:
                status = "error"
            statuses[status] = statuses.get(status, 0) + 1


async def abuse(port: int, duration_s: float, stalled: int, silent: int, greedy_n: int) -> None:
    stop_at = time.monotonic() + duration_s
    seen = dict.fromkeys(("opened", "cut", "got_408", "got_503", "connect_failed"), 0)
    statuses: dict[str, int] = {}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    await asyncio.gather(
        *(hold(port, STALLED_HEAD, stop_at, seen) for _ in range(stalled)),
        *(hold(port, b"", stop_at, seen) for _ in range(silent)),
        *(greedy(url, stop_at, statuses) for _ in range(greedy_n)),
    )
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = round(usage.ru_utime + usage.ru_stime, 2)
    print(json.dumps({"slow_connections": seen, "greedy_statuses": statuses, "cpu_s": cpu}))


# --- the soak ---


def rejections(url: str) -> dict[str, float]:
    found = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("tts_rejections_total{"):
            reason = line.split('"')[1]
            found[reason] = float(line.split()[-1])
    return found


def _merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The abuser children's reports, added up."""
    merged: dict[str, Any] = {"slow_connections": {}, "greedy_statuses": {}, "cpu_s": 0.0}
    for report in reports:
        for part in ("slow_connections", "greedy_statuses"):
            for name, count in report[part].items():
                merged[part][name] = merged[part].get(name, 0) + count
        merged["cpu_s"] = round(merged["cpu_s"] + report["cpu_s"], 2)
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", type=float, default=30.0, help="seconds per phase (max 150)")
    parser.add_argument(
        "--block", type=float, default=15.0, help="phases alternate in blocks of this length"
    )
    parser.add_argument("--concurrency", type=int, default=4, help="good clients")
    parser.add_argument("--stalled", type=int, default=300, help="slowloris connections")
    parser.add_argument("--silent", type=int, default=100, help="connections that send nothing")
    parser.add_argument("--greedy-concurrency", type=int, default=2)
    parser.add_argument(
        "--vllm-delay",
        type=float,
        default=0.0,
        help="seconds each fake vLLM call takes (0: zero latency, which keeps the gateway's "
        "core busy, so any CPU the abusers cost it shows in the good clients' latency)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    parser.add_argument("--abuse", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    phase = min(args.phase, MAX_PHASE_S)
    if args.abuse is not None:  # the child process
        asyncio.run(abuse(args.abuse, phase, args.stalled, args.silent, args.greedy_concurrency))
        return 0

    folder = Path(tempfile.mkdtemp(prefix="tts-abuse-soak-"))
    keys = folder / "keys.toml"
    keys.write_text(
        f'[[keys]]\nhash = "{hash_key(GOOD_KEY)}"\nrequests_per_minute = 100000\n\n'
        f'[[keys]]\nhash = "{hash_key(GREEDY_KEY)}"\nrequests_per_minute = 60\n'
        "flops_per_minute = 2e10\n"
    )
    env = {
        "TTS_API_KEYS_FILE": str(keys),
        "TTS_HEAD_TIMEOUT_S": "2",
        "TTS_BODY_TIMEOUT_S": "5",
        "TTS_MAX_CONNECTIONS": "1024",
        "TTS_LOG_LEVEL": "warning",
    }
    with soak_stack(folder, env, vllm_delay_s=args.vllm_delay) as stack:
        url = f"{stack.gateway.url}/v1/chat/completions"
        pid, port = stack.pid, stack.port
        blocks = max(1, math.ceil(phase / args.block))
        seconds = phase / blocks
        print(
            f"abuse soak: {blocks} x ({seconds:g} s alone, {seconds:g} s attacked)", file=sys.stderr
        )
        asyncio.run(good_clients(url, min(5.0, seconds), args.concurrency, Block()))  # warm-up
        alone, attacked = Block(), Block()
        abusers: list[dict[str, Any]] = []
        fds_seen: list[tuple[int, int]] = []
        for _ in range(blocks):
            # Alternating, so that the rest of the machine's load weighs on both alike.
            run_block(url, seconds, args.concurrency, pid, alone)
            child_argv = [
                *(sys.executable, "-m", "loadtests.abuse_soak", "--abuse", str(port)),
                *("--phase", str(seconds + 3), "--stalled", str(args.stalled)),
                *("--silent", str(args.silent)),
                *("--greedy-concurrency", str(args.greedy_concurrency)),
            ]
            child = subprocess.Popen(child_argv, stdout=subprocess.PIPE)
            time.sleep(3)  # the abusers are up
            run_block(url, seconds / 2, args.concurrency, pid, attacked)
            fds_seen.append(open_fds(pid))
            run_block(url, seconds / 2, args.concurrency, pid, attacked)
            out, _ = child.communicate(timeout=60)
            abusers.append(json.loads(out.decode().strip().splitlines()[-1]))
        good_alone, good_attacked = summarise(alone), summarise(attacked)
        summary = {
            "phase_s": phase,
            "vllm_delay_s": args.vllm_delay,
            "blocks": blocks,
            "good_concurrency": args.concurrency,
            "good_alone": good_alone,
            "good_with_abusers": good_attacked,
            "p50_ratio": round(good_attacked["latency_p50_s"] / good_alone["latency_p50_s"], 3),
            "p95_ratio": round(good_attacked["latency_p95_s"] / good_alone["latency_p95_s"], 3),
            "abusers": _merge(abusers),
            "gateway_rejections": rejections(stack.gateway.url),
            "gateway_fds_under_attack_max": max(f for f, _ in fds_seen),
            "gateway_sockets_under_attack_max": max(s for _, s in fds_seen),
        }
        print_summary(summary, args.out)
        good_ok = set(good_attacked["statuses"]) == {"200"}
        return 0 if good_ok else 1


if __name__ == "__main__":
    sys.exit(main())
