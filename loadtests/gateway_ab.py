"""The gateway's CPU cost per answer, this tree against another commit, side by side in one run.

Both gateways run at once, each its own process pinned to the same CPU, in front of the same
zero-latency fakes (`tts-server bench`'s gateway-cost setup); blocks of requests go to one, then
the other, in the order A B B A A B ..., so that drift in the machine's load weighs on both alike.
Each gateway's CPU seconds (from /proc) are counted over its own blocks only.

    .venv/bin/python -m loadtests.gateway_ab --base main --strategies best_of_n,beam_search
    .venv/bin/python -m loadtests.gateway_ab --profile reports/gateway-profile --strategies dvts

`--profile DIR` runs only this tree's gateway with py-spy attached (sampling from outside, so
the gateway is not slowed) and writes DIR/STRATEGY.txt (py-spy's collapsed stacks) and
DIR/STRATEGY-top.txt (self and inclusive shares by function and by package).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tts_server.bench.gateway_cost import (
    cost_call,
    cost_gateway,
    cpu_seconds,
    fake_upstreams,
)
from tts_server.bench.load import closed_loop, read_gateway

STRATEGIES = ("greedy", "majority", "best_of_n", "beam_search", "dvts", "auto")


def export_tree(ref: str, into: Path) -> Path:
    """The tts_server package of `ref` (any git revision) under `into`, without touching the
    repository's worktrees."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "tts_server"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def abba(sides: list[str], blocks: int) -> list[str]:
    """A B B A A B B A ...: each side as often first as second, `blocks` blocks per side."""
    order: list[str] = []
    for i in range(blocks):
        order += sides if i % 2 == 0 else list(reversed(sides))
    return order


async def block(
    client: httpx.AsyncClient,
    url: str,
    pid: int,
    strategy: str,
    *,
    requests: int,
    concurrency: int,
    budget: int,
    beam_width: int,
    fakes: tuple[int, ...] = (),
) -> dict[str, Any]:
    call = cost_call(strategy, budget, beam_width)
    before = cpu_seconds(pid)
    fakes_before = sum(cpu_seconds(p) for p in fakes)
    client_before = cpu_seconds(os.getpid())
    records, wall = await closed_loop(
        client,
        url,
        [call] * requests,
        read_gateway,
        concurrency=concurrency,
        time_limit_s=120,
        score=False,
    )
    cpu = cpu_seconds(pid) - before
    fakes_cpu = sum(cpu_seconds(p) for p in fakes) - fakes_before
    client_cpu = cpu_seconds(os.getpid()) - client_before
    errors = [r["error"] for r in records if "error" in r]
    return {
        "answers": len(records) - len(errors),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "cpu_s": cpu,
        "fakes_cpu_s": fakes_cpu,
        "client_cpu_s": client_cpu,
        "wall_s": wall,
    }


def side_summary(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    answers = sum(b["answers"] for b in blocks)
    cpu = sum(b["cpu_s"] for b in blocks)
    wall = sum(b["wall_s"] for b in blocks)
    per_block = [b["cpu_s"] / b["answers"] * 1000 for b in blocks if b["answers"]]
    return {
        "answers": answers,
        "errors": sum(b["errors"] for b in blocks),
        "first_error": next((b["first_error"] for b in blocks if b["first_error"]), None),
        "cpu_ms_per_answer": cpu / answers * 1000 if answers else None,
        "answers_per_cpu_s": answers / cpu if cpu else None,
        "answers_per_s": answers / wall if wall else None,
        "cpu_share": cpu / wall if wall else None,
        "fakes_cpu_share": sum(b["fakes_cpu_s"] for b in blocks) / wall if wall else None,
        "client_cpu_share": sum(b["client_cpu_s"] for b in blocks) / wall if wall else None,
        "cpu_ms_per_answer_by_block": [round(v, 2) for v in per_block],
    }


def top_of(collapsed: Path, limit: int = 40) -> str:
    """Self and inclusive sample shares of py-spy's collapsed stacks, by function and by the
    package a frame's file belongs to (inclusive: a frame counted once per sample)."""
    self_by: Counter[str] = Counter()
    incl_by: Counter[str] = Counter()
    pkg_incl: Counter[str] = Counter()
    pkg_self: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_by[frames[-1]] += count
        pkg_self[_package(frames[-1])] += count
        for frame in set(frames):
            incl_by[frame] += count
        for package in {_package(f) for f in frames}:
            pkg_incl[package] += count
    if not total:
        return "no samples\n"
    lines = [f"samples: {total}", "", "self, by package:"]
    lines += [f"  {n / total:6.1%}  {p}" for p, n in pkg_self.most_common(limit)]
    lines += ["", "inclusive, by package:"]
    lines += [f"  {n / total:6.1%}  {p}" for p, n in pkg_incl.most_common(limit)]
    lines += ["", "self, by function:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in self_by.most_common(limit)]
    lines += ["", "inclusive, by function:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in incl_by.most_common(limit * 2)]
    return "\n".join(lines) + "\n"


def _package(frame: str) -> str:
    """`fn (path/to/pkg/mod.py:12)` -> `pkg` (tts_server: its subpackage or module)."""
    path = frame[frame.rfind("(") + 1 :].split(":")[0]
    parts = Path(path).parts
    for anchor in ("site-packages", "tts_server", "tests"):
        if anchor in parts:
            rest = parts[parts.index(anchor) + (anchor != "tts_server") :]
            if anchor == "tts_server":
                return "/".join(rest[:2]).removesuffix(".py")
            return rest[0].removesuffix(".py") if rest else anchor
    return Path(path).stem if "python3" in path else path


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="gateway-ab-"))
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    results: dict[str, Any] = {"strategies": {}, "logs": str(logs)}
    with contextlib.ExitStack() as stack:
        fakes = stack.enter_context(
            fake_upstreams(logs, vllm_delay_s=args.vllm_delay, vllm_jitter_s=args.vllm_jitter)
        )
        policy_url, prm_url = fakes.policy_url, fakes.prm_url
        gateways: dict[str, tuple[str, int]] = {}
        # One readiness probe at the start: on a loaded machine a starved fake can miss the
        # probe's 5 s, and a gateway that calls it down answers 503 to the rest of the block.
        env = {"TTS_PROBE_INTERVAL_S": "3600"}
        gateways["new"] = stack.enter_context(
            cost_gateway(logs, policy_url, prm_url, name="gateway-new", env=env)
        )
        if args.base and not args.profile:
            tree = export_tree(args.base, Path(tempfile.mkdtemp(prefix="gateway-base-")))
            gateways["base"] = stack.enter_context(
                cost_gateway(logs, policy_url, prm_url, name="gateway-base", source=tree, env=env)
            )
            results["base"] = args.base
        if args.nice:
            for pid in (*fakes.pids, *(pid for _, pid in gateways.values())):
                os.setpriority(os.PRIO_PROCESS, pid, args.nice)
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            for strategy in strategies:
                options = {
                    "requests": args.requests,
                    "concurrency": args.concurrency,
                    "budget": args.budget,
                    "beam_width": args.beam_width,
                }
                for url, pid in gateways.values():  # warm-up: imports, pools, caches
                    await block(client, url, pid, strategy, **{**options, "requests": 16})
                spy = None
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    spy = subprocess.Popen(  # noqa: ASYNC220 (py-spy runs beside the loop)
                        [
                            str(Path(sys.executable).parent / "py-spy"),
                            "record",
                            "--pid",
                            str(gateways["new"][1]),
                            "--format",
                            "raw",
                            "--rate",
                            str(args.rate),
                            "--nonblocking",
                            "--output",
                            str(args.profile / f"{strategy}.txt"),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    await asyncio.sleep(1.0)  # attached
                done: dict[str, list[dict[str, Any]]] = {side: [] for side in gateways}
                for side in abba(list(gateways), args.blocks):
                    url, pid = gateways[side]
                    done[side].append(
                        await block(client, url, pid, strategy, **options, fakes=fakes.pids)
                    )
                if spy is not None:
                    spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                    spy.wait(60)
                    top = top_of(args.profile / f"{strategy}.txt")
                    (args.profile / f"{strategy}-top.txt").write_text(top)
                summary = {side: side_summary(blocks) for side, blocks in done.items()}
                if "base" in summary:
                    new, base = summary["new"], summary["base"]
                    if new["cpu_ms_per_answer"] and base["cpu_ms_per_answer"]:
                        summary["new_over_base_cpu_per_answer"] = round(
                            new["cpu_ms_per_answer"] / base["cpu_ms_per_answer"], 3
                        )
                results["strategies"][strategy] = summary
                print(json.dumps({strategy: summary}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=None, help="a git revision to compare against")
    parser.add_argument("--strategies", default="best_of_n")
    parser.add_argument("--requests", type=int, default=100, help="answers per block")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per gateway")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--budget", type=int, default=8)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument(
        "--vllm-delay",
        type=float,
        default=0.0,
        help="seconds per fake vLLM completion: with some, the gateway holds a steady number "
        "of calls in flight whatever the machine's load (with none, as many as it keeps up with)",
    )
    parser.add_argument(
        "--vllm-jitter",
        type=float,
        default=0.0,
        help="plus up to this many seconds, uniformly: calls that end apart leave connections "
        "idle between busy ones, as a real engine's uneven generations do",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="the fakes' and gateways' niceness (root: below 0 puts them ahead of other work, so "
        "that on a loaded machine the fakes still answer at once)",
    )
    parser.add_argument("--profile", type=Path, default=None, help="py-spy this tree's gateway")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    unknown = {s.strip() for s in args.strategies.split(",")} - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; known: {STRATEGIES}")
    results = asyncio.run(run(args))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
