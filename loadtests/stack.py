"""What the soak scripts share: the stack they load (a fake vLLM and the PRM worker app (arith)
on 127.0.0.1 in the script's process, the gateway as its own process over them), the clients
that load it with good requests, what they read of the gateway process from /proc, and the
JSON summary they end with."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.fake_vllm import FakeVLLM
from tests.support.faults import ThreadServer
from tests.support.gateway import MODEL, script
from tests.support.servers import ServerProcess, cli, free_port
from tts_server.prm_worker import create_app as create_prm_app
from tts_server.prm_worker.backends.arith import ArithBackend

QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"


def chat_body(strategy: str, budget: int = 4) -> dict[str, Any]:
    """The one question, asked of `strategy` (beam width 2 for the searches that use one)."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "tts": {"strategy": strategy, "budget": budget, "beam_width": 2},
    }


async def chat_clients(
    url: str,
    duration_s: float,
    concurrency: int,
    strategies: Sequence[str],
    latencies: list[float],
    statuses: dict[int, int],
    headers: Mapping[str, str] | None = None,
) -> None:
    """`concurrency` clients asking `url` (a chat endpoint) one request after another for
    `duration_s`, taking `strategies` in turn; each request's latency and status (0: no answer)
    added to `latencies` and `statuses`."""
    stop_at = time.monotonic() + duration_s

    async def worker(k: int, client: httpx.AsyncClient) -> None:
        i = k
        while time.monotonic() < stop_at:
            body = chat_body(strategies[i % len(strategies)])
            started = time.perf_counter()
            try:
                status = (await client.post(url, json=body, headers=headers)).status_code
            except httpx.HTTPError:
                status = 0
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            i += concurrency

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*(worker(k, client) for k in range(concurrency)))


@dataclass(frozen=True)
class Stack:
    gateway: ServerProcess
    pid: int  # the gateway's process
    port: int


@contextlib.contextmanager
def soak_stack(
    folder: Path, env: Mapping[str, str], *, vllm_delay_s: float = 0.0
) -> Iterator[Stack]:
    """The stack, up and ready; `env` is added to the gateway's settings (the model's, with
    known parameter counts, come first). Everything is stopped on the way out."""
    profile = folder / "plain-chat.json"
    profile.write_text(json.dumps({"name": "t", "style": "chat", "examples": []}))
    vllm = ThreadServer(FakeVLLM(script=script, model=MODEL, delay_s=vllm_delay_s).app()).start()
    prm = ThreadServer(create_prm_app(ArithBackend())).start()
    port = free_port()
    settings = {
        "TTS_POLICY_MODEL": MODEL,
        "TTS_PROMPT_PROFILES": json.dumps({MODEL: str(profile)}),
        "TTS_POLICY_PARAMS": "1000000",
        "TTS_PRM_PARAMS": "0",
        **env,
    }
    argv = cli("gateway", "--port", str(port), "--policy-url", vllm.url, "--prm-url", prm.url)
    gateway = ServerProcess("gateway", argv, port, folder).start(settings)
    try:
        gateway.wait_healthy(60, path="/health/ready")
        assert gateway.process is not None
        yield Stack(gateway, gateway.process.pid, port)
    finally:
        gateway.stop()
        prm.stop()
        vllm.stop()


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


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return round(ordered[int(q * (len(ordered) - 1))], 4) if ordered else None


def print_summary(summary: dict[str, Any], out: Path | None) -> None:
    """Prints the JSON summary, and writes it to `out` too when given."""
    text = json.dumps(summary, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
