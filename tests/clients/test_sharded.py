"""The sharded connection pools of the upstream clients (tts_server/clients/http.py), over real
sockets: a raw asyncio HTTP/1.1 server that can hold its answers, and counts connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from tts_server.clients import PolicyError
from tts_server.clients.http import ShardedTransport, Upstream

BODY = b'{"ok": true}'
ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BODY), BODY)


class Server:
    """Answers each request; while `held` is clear, requests to /held wait for it."""

    def __init__(self) -> None:
        self.connections = 0
        self.open_now = 0
        self.open_most = 0
        self.held = asyncio.Event()
        self.waiting = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_now += 1
        self.open_most = max(self.open_most, self.open_now)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if b" /held " in head.split(b"\r\n")[0] + b" ":
                    self.waiting += 1
                    await self.held.wait()
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_now -= 1
            writer.close()


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[Server, str]]:
    server = Server()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.held.set()
        listener.close()


async def until(condition: object, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_requests_spread_over_the_pools_and_each_pool_keeps_its_size() -> None:
    async with serving() as (server, url):
        transport = ShardedTransport(32, shard_size=8)
        async with httpx.AsyncClient(transport=transport) as client:
            tasks = [asyncio.create_task(client.post(url + "/held", json={})) for _ in range(40)]
            await until(lambda: server.waiting == 32)  # 4 pools of 8: the rest wait in line
            await asyncio.sleep(0.1)
            assert server.waiting == 32 and server.open_most == 32
            assert transport.open_responses == [10, 10, 10, 10]  # 8 sent, 2 queued, each
            server.held.set()
            responses = await asyncio.gather(*tasks)
            assert [r.status_code for r in responses] == [200] * 40
            assert [r.json() for r in responses] == [{"ok": True}] * 40
            assert transport.open_responses == [0, 0, 0, 0]
            assert server.connections == 32  # the 8 queued reused kept-alive connections


async def test_sequential_requests_reuse_one_kept_alive_connection() -> None:
    async with serving() as (server, url):
        transport = ShardedTransport(64)
        async with httpx.AsyncClient(transport=transport) as client:
            for _ in range(20):
                assert (await client.post(url + "/", json={})).status_code == 200
        assert server.connections == 1


async def test_a_failed_request_and_an_unread_stream_release_their_slot() -> None:
    async with serving() as (_server, url):
        transport = ShardedTransport(4, shard_size=2)
        async with httpx.AsyncClient(transport=transport) as client:
            async with client.stream("POST", url + "/", json={}) as response:
                assert response.status_code == 200
                assert sum(transport.open_responses) == 1
            assert transport.open_responses == [0, 0]
            with pytest.raises(httpx.ConnectError):
                await client.post("http://127.0.0.1:1/", json={})
            assert transport.open_responses == [0, 0]


async def test_health_is_probed_past_a_full_pool() -> None:
    """Every connection busy with a held generation: the probe still reaches the upstream."""
    async with serving() as (server, url):
        upstream = Upstream(url, error=PolicyError, timeout=30, connections=4)
        try:
            held = [asyncio.create_task(upstream.post_json("/held", {})) for _ in range(4)]
            await until(lambda: server.waiting == 4)
            assert await asyncio.wait_for(upstream.health("/"), 3) is True
            server.held.set()
            assert await asyncio.gather(*held) == [{"ok": True}] * 4
        finally:
            await upstream.aclose()
