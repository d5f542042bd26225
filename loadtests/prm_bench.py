"""PRM scoring on a real vLLM-served PRM: worker throughput, and what the step cache saves.

Builds the tiny random-weight PRM of the tests, serves it with vLLM CPU as a pooling model on
127.0.0.1, and measures, each side by side in one run (these machines are noisy):

1. Steps scored per second through a PRM worker process at concurrency 1, 8 and 32, with
   cross-request batching on (`--max-batch-size 64 --batch-wait-ms 5`) and off (1, 0: each
   request alone). Every request is new (the worker's cache is off), two 4-step solutions each.
2. Per beam-search request (budget 8, beam width 2) of depth 4, 8 and 16: the step scores the
   PRM worker was asked for and the tokens the PRM computed, with the gateway's step cache on
   and off (the worker's cache off in both, so only the step cache differs).

Stops by itself; prints a JSON report (also `--out`).

    .venv/bin/python -m loadtests.prm_bench --out reports/prm-bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support.fakes import FakePolicy, encode
from tests.support.servers import ServerProcess, cli, free_port
from tests.support.tiny_prm import build_tiny_vllm_prm
from tts_server.accounting import Account
from tts_server.bench.prm import throughput
from tts_server.clients.prm import HTTPPRMClient
from tts_server.flops import FlopsCounter, ModelShape
from tts_server.launch.vllm import prm_argv, vllm_env
from tts_server.prefixes import PrefixScores
from tts_server.settings import Settings
from tts_server.strategies import REGISTRY
from tts_server.types import Problem, SearchConfig

NAME = "tiny-vllm-prm"
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


@contextlib.contextmanager
def vllm_prm(logs: Path) -> Iterator[str]:
    settings = Settings()
    folder, tag_id = build_tiny_vllm_prm(logs / "prm", settings.embedded_model_dir)
    port = free_port()
    argv = prm_argv(
        settings, folder, NAME, port, step_tag_id=tag_id, max_model_len=2048, dtype="float32"
    )
    server = ServerProcess("vllm-prm", argv, port, logs).start(env=vllm_env(kv_cache_gib=1))
    try:
        server.wait_healthy(900)
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def worker(vllm_url: str, logs: Path, *, batching: bool) -> Iterator[str]:
    port = free_port()
    size, wait = ("64", "5") if batching else ("1", "0")
    argv = cli(
        "prm-worker", "--backend", "vllm", "--vllm-url", vllm_url, "--model", NAME,
        "--port", str(port), "--cache-size", "0", "--max-batch-size", size,
        "--batch-wait-ms", wait, "--log-level", "warning",
    )  # fmt: skip
    server = ServerProcess(f"prm-worker-{'batched' if batching else 'single'}", argv, port, logs)
    server.start()
    try:
        server.wait_healthy(60)
        yield server.url
    finally:
        server.stop()


def endless(prompt: list[int], sample: int) -> str:
    """A step that never ends the solution, different for every beam and iteration."""
    return f"We have {len(prompt)} and {sample}, so {len(prompt)} + {sample} is next.\n\nmore"


async def beam_request(url: str, depth: int, *, step_cache: bool) -> dict[str, Any]:
    problem = Problem(question=QUESTION, prompt_ids=tuple(encode(f"Q: {QUESTION}\nA: ")))
    config = SearchConfig(
        budget=8, beam_width=2, max_tokens=100_000, max_step_tokens=200, max_iterations=depth
    )
    account = Account(
        FlopsCounter(ModelShape(1), ModelShape(1)),
        step_scores=PrefixScores() if step_cache else None,
    )
    prm = HTTPPRMClient(url, timeout=300)
    started = time.perf_counter()
    try:
        policy, accounted = account.wrap(FakePolicy(endless), prm)
        await REGISTRY["beam_search"].run(problem, config, policy, accounted)
    finally:
        await prm.aclose()
    usage = account.prm_usage
    return {
        "steps_used": usage.steps_scored,
        "steps_computed": usage.steps_scored - usage.steps_cached,
        "prm_tokens": usage.tokens,
        "prm_seconds": round(account.prm_scoring_s, 3),
        "wall_s": round(time.perf_counter() - started, 3),
    }


def _mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Each pair of cells runs A B B A (the mean of the two), so a load that drifts while the
    benchmark runs (other processes on the machine) weighs on both sides alike."""
    report: dict[str, Any] = {"throughput": {}, "beam_search": {}}
    with tempfile.TemporaryDirectory(prefix="prm-bench-") as tmp:
        logs = Path(tmp)
        with (
            vllm_prm(logs) as vllm_url,
            worker(vllm_url, logs, batching=True) as batched,
            worker(vllm_url, logs, batching=False) as single,
        ):
            for concurrency in args.concurrency:
                seen: dict[str, list[dict[str, float]]] = {"batched": [], "one_at_a_time": []}
                for name in ("batched", "one_at_a_time", "one_at_a_time", "batched"):
                    url = batched if name == "batched" else single
                    seen[name].append(await throughput(url, concurrency, args.requests))
                for name, rows in seen.items():
                    report["throughput"][f"c{concurrency}/{name}"] = _mean(rows)
                ratio = (
                    _mean(seen["batched"])["steps_per_s"]
                    / _mean(seen["one_at_a_time"])["steps_per_s"]
                )
                report["throughput"][f"c{concurrency}/ratio_batched_over_single"] = ratio
                print(f"c{concurrency}", json.dumps(seen), f"ratio {ratio:.2f}", flush=True)
            await beam_request(batched, 4, step_cache=True)  # warm up
            for depth in args.depths:
                runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
                for on in (True, False, False, True):
                    runs[on].append(await beam_request(batched, depth, step_cache=on))
                with_cache, without = _mean(runs[True]), _mean(runs[False])
                row: dict[str, Any] = {"with_step_cache": with_cache, "without": without}
                row["ratios"] = {
                    key: with_cache[key] / without[key]
                    for key in ("steps_computed", "prm_tokens", "prm_seconds")
                }
                report["beam_search"][f"depth_{depth}"] = row
                print(f"depth {depth}", json.dumps(row), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=96, help="score requests per cell")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
