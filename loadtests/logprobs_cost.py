"""What sampling with top-k logprobs costs on a real vLLM: one run, conditions interleaved, the
same seeds (so the same tokens) with logprobs off, k = 5 and k = 20; per call the wall time and
the CPU seconds of vLLM's whole process tree (its PID given). Ratios within the run only: the
machine is shared. Figures in docs/confidence.md.

    python loadtests/logprobs_cost.py --url http://127.0.0.1:8100 --vllm-pid PID --reps 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from tts_server.clients import VLLMPolicyClient
from tts_server.types import PolicyUsage, SamplingConfig

PROMPT = (
    "Question: Sam has 2 pens and gets 4 more. How many pens does he have?\n"
    "Answer: He gets more, so we add.\n\n2 + 4 = 6\n\nThe answer is 6.\n\n\n"
    "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"
)
CONDITIONS: dict[str, int | None] = {"none": None, "k5": 5, "k20": 20}


def _tree(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    return [pid, *(p for child in children for p in _tree(child))]


def _cpu_seconds(root: int) -> float:
    ticks = 0
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime + stime, all threads
    return ticks / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> None:
    client = VLLMPolicyClient(args.url, args.model)
    ids = await client.tokenize_text(PROMPT)
    wall: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    cpu: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    warm = SamplingConfig(max_tokens=4, seed=1, logprobs=5)
    await client.generate([ids], warm, PolicyUsage(), n=args.n)
    for rep in range(args.reps):
        order = list(CONDITIONS) if rep % 2 == 0 else list(reversed(CONDITIONS))
        for name in order:
            sampling = SamplingConfig(
                temperature=0.8,
                max_tokens=args.max_tokens,
                seed=100 * rep,
                logprobs=CONDITIONS[name],
            )
            before, started = _cpu_seconds(args.vllm_pid), time.perf_counter()
            await client.generate([ids], sampling, PolicyUsage(), n=args.n)
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(_cpu_seconds(args.vllm_pid) - before)
    await client.aclose()
    for name in ("k5", "k20"):
        for label, series in (("wall", wall), ("cpu", cpu)):
            ratios = [a / b for a, b in zip(series[name], series["none"], strict=True)]
            print(
                f"{name}/none {label}: median {statistics.median(ratios):.3f}, per repetition "
                f"{[round(r, 2) for r in ratios]}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8100")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--vllm-pid", type=int, required=True, help="vLLM's API server PID")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="samples per call")
    parser.add_argument("--max-tokens", type=int, default=32)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
