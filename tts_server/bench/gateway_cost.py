"""What the gateway itself costs: one gateway process on one CPU in front of zero-latency fake
upstreams (the test suite's fake vLLM and the `arith` PRM worker app, each its own process),
every strategy in a closed loop; CPU seconds per answer from /proc, answers per second, peak RSS.

The fakes live in the source checkout's tests/support (they are test code, not shipped): from an
installed package without it, the scenario says so and is skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tts_server.bench.load import Call, closed_loop, read_gateway, summarize
from tts_server.bench.stack import StackError, free_port

MODEL = "fake-model"  # tests/support/gateway.py's
QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have?"
STRATEGIES = ("greedy", "majority", "best_of_n", "beam_search", "dvts", "auto")


def source_root() -> Path | None:
    """The source checkout holding tests/support (the working directory, or the one this
    package was installed from in editable mode), None without one."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "tests" / "support" / "upstreams.py").is_file():
            return root
    return None


def fakes_available() -> str | None:
    """None when the fakes can be started, else why not."""
    if source_root() is None:
        return "needs the source checkout's tests/support fakes (run from the repository root)"
    return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class _Proc:
    name: str
    process: subprocess.Popen[bytes]
    url: str


def _start(name: str, argv: list[str], logs: Path, env: dict[str, str], cpu: int | None) -> _Proc:
    port = int(argv[argv.index("--port") + 1])

    def pin() -> None:  # in the child, before exec: its threads inherit the one CPU
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    with (logs / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            preexec_fn=pin,
            start_new_session=True,
        )
    return _Proc(name, process, f"http://127.0.0.1:{port}")


def _wait(proc: _Proc, path: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise StackError(f"{proc.name} exited early (code {proc.process.returncode})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(proc.url + path, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise StackError(f"{proc.name} not ready after {timeout_s} s")


def _stop(proc: _Proc) -> None:
    if proc.process.poll() is None:
        proc.process.terminate()
        try:
            proc.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.process.pid, 9)
            proc.process.wait()


def _cpus() -> tuple[int, int | None]:
    """(the gateway's CPU, the fakes' CPU): the last CPU we may use for the gateway, the first
    for the fakes (on one CPU: all on it)."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[-1], (cpus[0] if len(cpus) > 1 else None)


@dataclass(frozen=True)
class Fakes:
    policy_url: str
    prm_url: str
    pids: tuple[int, ...]


@contextlib.contextmanager
def fake_upstreams(
    logs: Path, *, vllm_delay_s: float = 0.0, vllm_jitter_s: float = 0.0
) -> Iterator[Fakes]:
    """The fake vLLM and the arith PRM worker, each its own process on the fakes' CPU.
    A completion takes `vllm_delay_s` plus up to `vllm_jitter_s` (uniform) seconds."""
    procs: list[_Proc] = []
    # The fakes import tests.support from the checkout.
    path = {
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(source_root()), os.environ.get("PYTHONPATH")])
        )
    }
    try:
        for kind in ("vllm", "prm"):
            argv = [sys.executable, "-m", "tests.support.upstreams", "--kind", kind]
            argv += ["--port", str(free_port())]
            if kind == "vllm":
                argv += ["--delay", str(vllm_delay_s), "--jitter", str(vllm_jitter_s)]
            procs.append(_start(f"fake-{kind}", argv, logs, path, _cpus()[1]))
        for proc in procs:
            _wait(proc, "/health")
        yield Fakes(procs[0].url, procs[1].url, tuple(p.process.pid for p in procs))
    finally:
        for proc in reversed(procs):
            _stop(proc)


@contextlib.contextmanager
def cost_gateway(
    logs: Path,
    policy_url: str,
    prm_url: str,
    *,
    name: str = "cost-gateway",
    source: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, int]]:
    """(URL, PID) of a gateway process on the gateway's CPU in front of the fakes. `source`: a
    source tree to import tts_server from instead of this one (to compare two commits side by
    side in one run); `env`: settings over the scenario's."""
    profile = logs / "plain-chat-profile.json"
    profile.write_text(json.dumps({"name": "plain", "style": "chat", "examples": []}))
    settings = {
        "TTS_POLICY_MODEL": MODEL,
        "TTS_PROMPT_PROFILES": json.dumps({MODEL: str(profile)}),
        "TTS_POLICY_PARAMS": "1000000",
        "TTS_PRM_PARAMS": "0",
        "TTS_MAX_IN_FLIGHT": "256",
        "TTS_MAX_QUEUE": "256",
        "TTS_LOG_LEVEL": "warning",
        **(env or {}),
    }
    if source is not None:  # ahead of the installed package on sys.path
        settings["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(source), os.environ.get("PYTHONPATH")])
        )
    argv = [sys.executable, "-m", "tts_server.cli", "gateway", "--port", str(free_port())]
    argv += ["--policy-url", policy_url, "--prm-url", prm_url]
    gateway = _start(name, argv, logs, settings, _cpus()[0])
    try:
        _wait(gateway, "/health/ready")
        yield gateway.url, gateway.process.pid
    finally:
        _stop(gateway)


@contextlib.contextmanager
def fake_stack(logs: Path) -> Iterator[tuple[str, int]]:
    """(gateway URL, gateway PID): the gateway on the last CPU we may use, the fakes on the
    others (on one CPU: all on it)."""
    with (
        fake_upstreams(logs) as fakes,
        cost_gateway(logs, fakes.policy_url, fakes.prm_url) as gateway,
    ):
        yield gateway


def cost_call(strategy: str, budget: int, beam_width: int) -> Call:
    tts: dict[str, Any] = {"strategy": strategy}
    if strategy != "greedy":
        tts["budget"] = budget
    if strategy in ("beam_search", "dvts"):
        tts["beam_width"] = beam_width
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "tts": tts}
    return Call(strategy, "8", "/v1/chat/completions", body)


async def measure(
    client: httpx.AsyncClient,
    url: str,
    pid: int,
    strategy: str,
    *,
    budget: int,
    beam_width: int,
    requests: int,
    concurrency: int,
    time_limit_s: float,
    advance: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """One strategy: a short warm-up, then `requests` answers (or `time_limit_s`)."""
    call = cost_call(strategy, budget, beam_width)
    await closed_loop(client, url, [call] * 8, read_gateway, concurrency=4, time_limit_s=30)
    cpu_before = cpu_seconds(pid)
    records, wall = await closed_loop(
        client,
        url,
        [call] * requests,
        read_gateway,
        concurrency=concurrency,
        time_limit_s=time_limit_s,
        on_done=lambda r: advance(1),
    )
    cpu = cpu_seconds(pid) - cpu_before
    advance(requests - len(records))
    summary = summarize(records, wall)
    answers = summary["answers"]
    return {
        **summary,
        "strategy": strategy,
        "budget": None if strategy == "greedy" else budget,
        "concurrency": concurrency,
        "gateway_cpu_s": cpu,
        "cpu_s_per_answer": cpu / answers if answers else None,
        # What one fully busy core would sustain at that cost.
        "answers_per_cpu_s": answers / cpu if cpu > 0 else None,
        "gateway_cpu_share": cpu / wall if wall > 0 else None,
        "peak_rss_mib": peak_rss_mib(pid),
    }
