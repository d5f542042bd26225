"""vLLM's CPU per process for the same samples sent two ways: 16 problems as one `n=8` request
each, or as 8 `n=1` requests each, all at once (two alternating pairs). It tells whether the
gap in the bench's engine saturation (best-of-N@8 through the gateway against direct `n=8`)
comes from vLLM's API server or from the model worker (docs/performance.md).

    .venv/bin/tts-server policy --port 9400 &        # a vLLM of its own; then, once it serves:
    .venv/bin/python loadtests/vllm_fanout_cpu.py http://127.0.0.1:9400 PID_OF_THAT_SERVER

Sends traffic to the given URL only (use 127.0.0.1) and stops after the four rounds.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path

import httpx

from tts_server.settings import DEFAULT_MODEL
from tts_server.tools.datasets import load_dataset


def processes(root: int) -> dict[str, int]:
    """The server's process and its descendants (EngineCore, the model worker), by name."""
    found, todo = {"api": root}, [root]
    while todo:
        pid = todo.pop()
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            found[Path(f"/proc/{child}/comm").read_text().strip()] = int(child)
            todo.append(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def generated(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    pattern = r"^vllm:generation_tokens_total\{[^}]*\} ([0-9.e+]+)"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


async def send(url: str, questions: list[str], fan_out: bool) -> None:
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(question: str) -> None:
            body = {
                "model": DEFAULT_MODEL,
                "prompt": f"Question: {question}\nAnswer step by step.\n",
                "max_tokens": 128,
                "temperature": 0.8,
                "ignore_eos": True,  # the same tokens either way
            }
            if fan_out:
                await asyncio.gather(
                    *(client.post(url + "/v1/completions", json=body) for _ in range(8))
                )
            else:
                await client.post(url + "/v1/completions", json={**body, "n": 8})

        await asyncio.gather(*(one(q) for q in questions))


def main(url: str, server_pid: int) -> None:
    questions = [e.question for e in load_dataset("mawps_singleop")][:16]
    procs = processes(server_pid)
    for fan_out in (False, True, False, True):
        before = {name: cpu_seconds(pid) for name, pid in procs.items()}
        tokens, started = generated(url), time.perf_counter()
        asyncio.run(send(url, questions, fan_out))
        wall = time.perf_counter() - started
        tokens = generated(url) - tokens
        used = {name: round(cpu_seconds(pid) - before[name], 1) for name, pid in procs.items()}
        label = "16 x 8 n=1" if fan_out else "16 x n=8"
        print(f"{label}: {tokens / wall:.0f} gen tokens/s, CPU s by process {used}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
