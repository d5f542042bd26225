"""The scenarios against the real stack, as cells: one cell is one closed-loop batch of the same
problems sent one way (direct to vLLM, through the gateway, or through a peer) at one
concurrency, with vLLM's own counters read before and after it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import httpx

from tts_server.bench.cells import CellStore
from tts_server.bench.engine_metrics import delta, scrape
from tts_server.bench.load import (
    Call,
    Reader,
    closed_loop,
    read_gateway,
    read_text,
    read_vote,
    summarize,
)
from tts_server.prompting import PromptProfile
from tts_server.tools.datasets import Example

Target = Literal["direct", "gateway", "peer"]


@dataclass(frozen=True)
class Plan:
    """What every cell shares: the problems and how each is sampled."""

    problems: tuple[Example, ...]
    model: str
    profile: PromptProfile
    temperature: float
    max_tokens: int
    budget: int = 8
    beam_width: int = 4
    concurrencies: tuple[int, ...] = (1, 8, 32)
    saturation_concurrency: int = 16
    # Each problem sent this many times in a saturation cell: the closed loop then has a steady
    # part (every loop busy) before its tail (the last, slowest answers with few beside them).
    saturation_rounds: int = 3
    peer_concurrency: int = 4
    # optillm's self-consistency draws a fixed number of samples (5 in 0.4.0, no flag).
    peer_self_consistency_n: int = 5
    cell_time_limit_s: float = 600.0

    def settings(self) -> dict[str, Any]:
        """What a saved cell was measured with (a resumed run must match it)."""
        return {
            "problems": [p.id for p in self.problems],
            "model": self.model,
            "profile": self.profile.name,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "budget": self.budget,
            "beam_width": self.beam_width,
            "concurrencies": list(self.concurrencies),
            "saturation_concurrency": self.saturation_concurrency,
            "saturation_rounds": self.saturation_rounds,
            "peer_concurrency": self.peer_concurrency,
            "cell_time_limit_s": self.cell_time_limit_s,
        }


@dataclass(frozen=True)
class CellSpec:
    id: str
    target: Target
    concurrency: int
    calls: tuple[Call, ...]
    reader: Reader = field(compare=False)
    label: str = ""
    # Sample vLLM's counters during the cell and report its steady rate (`steady_rate`).
    steady: bool = False


def gateway_call(plan: Plan, problem: Example, strategy: str, budget: int | None) -> Call:
    tts: dict[str, Any] = {"strategy": strategy}
    if budget is not None:
        tts["budget"] = budget
    if strategy in ("beam_search", "dvts"):
        tts["beam_width"] = plan.beam_width
    body = {
        "model": plan.model,
        "messages": [{"role": "user", "content": problem.question}],
        "max_tokens": plan.max_tokens,
        "temperature": 0.0 if strategy == "greedy" else plan.temperature,
        "tts": tts,
    }
    return Call(problem.id, problem.answer, "/v1/chat/completions", body)


def direct_call(plan: Plan, problem: Example, n: int, *, greedy: bool = False) -> Call:
    """The same request straight to vLLM: the prompt profile's messages (what the gateway
    renders for this model), the same sampling, `n` samples in one call."""
    messages = plan.profile.chat_messages([{"role": "user", "content": problem.question}])
    body = {
        "model": plan.model,
        "messages": messages,
        "n": n,
        "max_tokens": plan.max_tokens,
        "temperature": 0.0 if greedy else plan.temperature,
    }
    return Call(problem.id, problem.answer, "/v1/chat/completions", body)


def peer_call(plan: Plan, problem: Example, approach: str) -> Call:
    """optillm's request: the approach named in the body (`optillm_approach`), the same
    messages as the direct call (its prompt flattens the worked examples into its query)."""
    messages = plan.profile.chat_messages([{"role": "user", "content": problem.question}])
    body = {
        "model": plan.model,
        "messages": messages,
        "max_tokens": plan.max_tokens,
        "temperature": plan.temperature,
        "optillm_approach": approach,
    }
    return Call(problem.id, problem.answer, "/v1/chat/completions", body)


def _gateway(plan: Plan, cell: str, strategy: str, budget: int | None, c: int) -> CellSpec:
    calls = tuple(gateway_call(plan, p, strategy, budget) for p in plan.problems)
    name = strategy if budget is None else f"{strategy}@{budget}"
    return CellSpec(cell, "gateway", c, calls, read_gateway, f"gateway {name}")


def _direct(plan: Plan, cell: str, n: int, c: int, *, greedy: bool = False) -> CellSpec:
    calls = tuple(direct_call(plan, p, n, greedy=greedy) for p in plan.problems)
    return CellSpec(cell, "direct", c, calls, read_vote, f"vLLM n={n}")


def overhead_groups(plan: Plan) -> list[list[CellSpec]]:
    """Per concurrency, the cells measured in turns (`Runner.run_interleaved`): the gateway's
    and direct vLLM's latencies then see the same load, and their ratios mean something on a
    shared machine."""
    n = plan.budget
    groups = []
    for c in plan.concurrencies:
        groups.append(
            [
                _direct(plan, f"overhead/c{c}/direct-greedy", 1, c, greedy=True),
                _gateway(plan, f"overhead/c{c}/gateway-greedy", "greedy", None, c),
                _direct(plan, f"overhead/c{c}/direct-n{n}", n, c),
                _gateway(plan, f"overhead/c{c}/gateway-majority{n}", "majority", n, c),
                _gateway(plan, f"overhead/c{c}/gateway-best_of_n{n}", "best_of_n", n, c),
            ]
        )
    return groups


def overhead_cells(plan: Plan) -> list[CellSpec]:
    return [spec for group in overhead_groups(plan) for spec in group]


def saturation_cells(plan: Plan) -> list[CellSpec]:
    n, c, rounds = plan.budget, plan.saturation_concurrency, max(1, plan.saturation_rounds)
    cells = [
        _direct(plan, f"saturation/direct-n{n}", n, c),
        _gateway(plan, f"saturation/gateway-best_of_n{n}", "best_of_n", n, c),
        _gateway(plan, f"saturation/gateway-beam_search{n}", "beam_search", n, c),
        _gateway(plan, f"saturation/gateway-dvts{n}", "dvts", n, c),
    ]
    return [replace(cell, calls=cell.calls * rounds, steady=True) for cell in cells]


def peer_cells(plan: Plan) -> list[CellSpec]:
    """Ours and optillm's at equal N, at the same concurrency, on the same problems."""
    n, sc, c = plan.budget, plan.peer_self_consistency_n, plan.peer_concurrency
    problems = plan.problems

    def peer(cell: str, approach: str, label: str) -> CellSpec:
        calls = tuple(peer_call(plan, p, approach) for p in problems)
        return CellSpec(cell, "peer", c, calls, read_text, label)

    return [
        _gateway(plan, f"peer/gateway-majority{sc}", "majority", sc, c),
        peer(f"peer/optillm-self_consistency{sc}", "self_consistency", f"optillm SC@{sc}"),
        _gateway(plan, f"peer/gateway-best_of_n{n}", "best_of_n", n, c),
        peer(f"peer/optillm-bon{n}", "bon", f"optillm bon@{n}"),
    ]


class Runner:
    """Runs cells (or reads them back from the store), reading vLLM's counters around each."""

    def __init__(
        self,
        store: CellStore,
        client: httpx.AsyncClient,
        policy_url: str,
        urls: dict[Target, str],
        *,
        time_limit_s: float,
        advance: Callable[[int, str], None] = lambda done, label: None,
        sample_s: float = 1.0,
    ) -> None:
        self.sample_s = sample_s
        self.store = store
        self.client = client
        self.policy_url = policy_url
        self.urls = urls
        self.time_limit_s = time_limit_s
        self.advance = advance

    async def run(self, spec: CellSpec) -> dict[str, Any]:
        saved = self.store.get(spec.id)
        if saved is not None:
            self.advance(len(spec.calls), spec.id)
            return saved
        samples: list[tuple[float, dict[str, float]]] = []
        sampler = None
        if spec.steady:  # read before the first call and after the last, and every second
            samples.append((time.perf_counter(), await scrape(self.client, self.policy_url)))
            sampler = asyncio.create_task(self._sample(samples))
        try:
            records, wall, engine = await self._batch(spec, spec.calls, self.time_limit_s)
        finally:
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
        if sampler is not None:
            samples.append((time.perf_counter(), await scrape(self.client, self.policy_url)))
        # Calls not started within the time limit still count as done for the progress bar.
        self.advance(len(spec.calls) - len(records), spec.id)
        result = _result(spec, records, wall, engine)
        if spec.steady:
            result["steady"] = steady_rate(samples, records, spec.concurrency)
        self.store.put(spec.id, result)
        return result

    async def _sample(self, into: list[tuple[float, dict[str, float]]]) -> None:
        """vLLM's counters every `sample_s`, with the time they were read, until cancelled."""
        while True:
            with contextlib.suppress(httpx.HTTPError):
                counters = await scrape(self.client, self.policy_url)
                into.append((time.perf_counter(), counters))
            await asyncio.sleep(self.sample_s)

    async def run_interleaved(self, specs: list[CellSpec]) -> list[dict[str, Any]]:
        """Cells measured in turns, so that drift in the machine's load (other work starting or
        ending) weighs on all of them alike: each turn sends each cell's next `concurrency`
        calls (one closed-loop round), and the cells' order reverses every turn (A B C, C B A,
        ...). A cell's latencies, wall time and engine counters are those of its own rounds;
        its time limit counts its own rounds' wall time. Cells already saved are read back."""
        results: dict[str, dict[str, Any]] = {}
        todo = []
        for spec in specs:
            saved = self.store.get(spec.id)
            if saved is not None:
                self.advance(len(spec.calls), spec.id)
                results[spec.id] = saved
            else:
                todo.append(spec)
        state = {s.id: _Turns() for s in todo}
        turn = 0
        while True:
            ran = False
            for spec in todo if turn % 2 == 0 else list(reversed(todo)):
                done = state[spec.id]
                if done.next >= len(spec.calls) or done.wall >= self.time_limit_s:
                    continue
                calls = spec.calls[done.next : done.next + max(1, spec.concurrency)]
                records, wall, engine = await self._batch(
                    spec, calls, self.time_limit_s - done.wall
                )
                done.add(records, wall, engine, len(calls))
                self.advance(len(calls) - len(records), spec.id)
                ran = True
            if not ran:
                break
            turn += 1
        for spec in todo:
            done = state[spec.id]
            self.advance(len(spec.calls) - done.next, spec.id)  # never started: time limit
            result = _result(spec, done.records, done.wall, done.engine)
            result["interleaved_with"] = [s.id for s in todo if s is not spec]
            self.store.put(spec.id, result)
            results[spec.id] = result
        return [results[s.id] for s in specs]

    async def _batch(
        self, spec: CellSpec, calls: tuple[Call, ...], time_limit_s: float
    ) -> tuple[list[dict[str, Any]], float, dict[str, float]]:
        before = await scrape(self.client, self.policy_url)
        records, wall = await closed_loop(
            self.client,
            self.urls[spec.target],
            calls,
            spec.reader,
            concurrency=spec.concurrency,
            time_limit_s=time_limit_s,
            on_done=lambda record: self.advance(1, spec.id),
        )
        after = await scrape(self.client, self.policy_url)
        return records, wall, delta(before, after)


def steady_rate(
    samples: list[tuple[float, dict[str, float]]],
    records: list[dict[str, Any]],
    concurrency: int,
) -> dict[str, Any] | None:
    """vLLM's generation tokens/s while every loop of the closed loop was busy: from the first
    call's start to the last call's (when the queue ran dry; after it, the loops end one by one
    and the engine serves the tail's few slow answers). Counters are read every second or so
    and interpolated to both ends. None without such a window (no more calls than loops)."""
    starts = sorted(r["started_at"] for r in records if "started_at" in r)
    if len(starts) <= concurrency or len(samples) < 2:
        return None
    begin, end = starts[0], starts[-1]

    def generated(at: float) -> float | None:
        points = [(t, c["generation_tokens"]) for t, c in samples if "generation_tokens" in c]
        for (t0, g0), (t1, g1) in itertools.pairwise(points):
            if t0 <= at <= t1:
                return g0 + (g1 - g0) * ((at - t0) / (t1 - t0) if t1 > t0 else 0.0)
        return None

    first, last = generated(begin), generated(end)
    if first is None or last is None or end <= begin:
        return None
    return {
        "window_s": end - begin,
        "generation_tokens": last - first,
        "generation_tokens_per_s": (last - first) / (end - begin),
        "samples": len(samples),
    }


@dataclass
class _Turns:
    """What one interleaved cell's rounds gave so far, and its next call."""

    records: list[dict[str, Any]] = field(default_factory=list)
    wall: float = 0.0
    engine: dict[str, float] = field(default_factory=dict)
    next: int = 0

    def add(
        self, records: list[dict[str, Any]], wall: float, engine: dict[str, float], sent: int
    ) -> None:
        self.records += records
        self.wall += wall
        for key, value in engine.items():
            self.engine[key] = self.engine.get(key, 0.0) + value
        self.next += sent


def _result(
    spec: CellSpec, records: list[dict[str, Any]], wall: float, engine: dict[str, float]
) -> dict[str, Any]:
    return {
        "label": spec.label,
        "target": spec.target,
        "concurrency": spec.concurrency,
        **summarize(records, wall),
        "engine": engine,
        "engine_generation_tokens_per_s": engine.get("generation_tokens", 0.0) / wall
        if wall > 0
        else None,
        "records": records,
    }
