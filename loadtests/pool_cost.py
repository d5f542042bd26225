"""CPU per upstream call of the gateway's HTTP client, httpx's one pool against the sharded
transport (tts_server/clients/http.py), in one process against a minimal HTTP/1.1 responder.

The responder answers every request at once from a raw asyncio protocol (a few microseconds), so
the process's CPU is almost all client. Rounds of `--in-flight` concurrent POSTs (a best-of-8 at
concurrency 32 holds 256), the two clients alternating round by round, so the machine's load
weighs on both alike:

    .venv/bin/python -m loadtests.pool_cost --in-flight 256 --rounds 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from typing import Any

import httpx

from tts_server.clients.http import ShardedTransport

BODY = json.dumps({"choices": [{"index": 0, "text": "3 + 5 = 8", "token_ids": [1, 2, 3]}]})
RESPONSE = (
    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    f"content-length: {len(BODY)}\r\n\r\n{BODY}"
).encode()


class Responder(asyncio.Protocol):
    """Answers each request (head plus content-length body) with RESPONSE; keeps alive."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            length = 0
            for line in self.buffer[:head_end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            self.buffer = self.buffer[end:]
            self.transport.write(RESPONSE)


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def round_of(client: httpx.AsyncClient, url: str, in_flight: int) -> None:
    body = {"model": "m", "prompt": [[1, 2, 3]], "max_tokens": 16}

    async def one() -> None:
        response = await client.post(url, json=body)
        response.json()

    await asyncio.gather(*(one() for _ in range(in_flight)))


async def run(in_flight: int, rounds: int, connections: int) -> dict[str, Any]:
    server = await asyncio.get_running_loop().create_server(Responder, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/completions"
    clients = {
        # What the gateway had: one pool, a quarter of it kept alive.
        "one_pool": httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections // 4
            )
        ),
        "sharded": httpx.AsyncClient(transport=ShardedTransport(connections)),
    }
    spent = dict.fromkeys(clients, 0.0)
    try:
        for client in clients.values():  # warm-up: connections, imports
            await round_of(client, url, in_flight)
        for i in range(rounds):
            order = list(clients) if i % 2 == 0 else list(reversed(clients))
            for name in order:
                before = cpu_s()
                await round_of(clients[name], url, in_flight)
                spent[name] += cpu_s() - before
    finally:
        for client in clients.values():
            await client.aclose()
        server.close()
    calls = in_flight * rounds
    result: dict[str, Any] = {"in_flight": in_flight, "connections": connections, "calls": calls}
    for name, cpu in spent.items():
        result[f"{name}_us_per_call"] = round(cpu / calls * 1e6, 1)
    result["sharded_over_one_pool"] = round(spent["sharded"] / spent["one_pool"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--connections", type=int, default=256, help="the policy client's")
    args = parser.parse_args()
    started = time.perf_counter()
    result = asyncio.run(run(args.in_flight, args.rounds, args.connections))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
