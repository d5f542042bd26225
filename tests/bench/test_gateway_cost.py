"""Gateway cost against the zero-latency fakes: real processes (the gateway pinned to one CPU,
the fakes beside it), CPU seconds from /proc."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tts_server.bench.gateway_cost import cpu_seconds, fake_stack, measure, peak_rss_mib


def test_cpu_time_and_peak_rss_of_this_process() -> None:
    before = cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))  # some CPU work
    assert cpu_seconds(os.getpid()) > before
    assert peak_rss_mib(os.getpid()) > 10


async def test_best_of_n_against_the_fakes(tmp_path: Path) -> None:
    with fake_stack(tmp_path) as (url, pid):
        assert os.sched_getaffinity(pid) == {max(os.sched_getaffinity(0))}
        async with httpx.AsyncClient(timeout=60) as client:
            result = await measure(
                client,
                url,
                pid,
                "best_of_n",
                budget=4,
                beam_width=2,
                requests=12,
                concurrency=4,
                time_limit_s=60,
            )
    assert result["answers"] == 12 and result["errors"] == 0
    assert result["accuracy"] is not None  # the fake's answers, 8 or 9, were read
    assert result["cpu_s_per_answer"] > 0
    assert result["answers_per_cpu_s"] > 0
    assert result["peak_rss_mib"] > 20  # a Python web server, loaded
