"""`tts-server bench` / `make bench`: the flags, and one run from start to report."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import shlex
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from tts_server.bench import gateway_cost, machine, peer, plots, prm, report
from tts_server.bench.cells import CellStore
from tts_server.bench.options import PROFILES, SCENARIOS, add_bench_arguments
from tts_server.bench.scenarios import (
    CellSpec,
    Plan,
    Runner,
    overhead_cells,
    overhead_groups,
    peer_cells,
    saturation_cells,
)
from tts_server.bench.stack import Endpoints, StackError, bench_stack
from tts_server.bench.summary import summarize_run
from tts_server.prompting import load_profile
from tts_server.settings import Settings
from tts_server.tools.datasets import load_dataset


class Progress:
    """One bar over every request of the run (tqdm, the tools extra)."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def advance(self, done: int, label: str) -> None:
        self.bar.set_description(label, refresh=False)
        self.bar.update(done)

    def close(self) -> None:
        self.bar.close()


def _plan(args: argparse.Namespace, settings: Settings, model: str) -> Plan:
    profile = load_profile(settings.profile_for(model))
    temperature = args.temperature
    if temperature is None:
        temperature = profile.temperature or settings.default_temperature
    count = args.problems or PROFILES[args.profile]["problems"]
    problems = tuple(load_dataset(args.dataset)[args.offset : args.offset + count])
    return Plan(
        problems=problems,
        model=model,
        profile=profile,
        temperature=temperature,
        max_tokens=args.max_tokens,
        budget=args.budget,
        beam_width=args.beam_width,
        concurrencies=tuple(int(c) for c in args.concurrencies.split(",") if c.strip()),
        saturation_concurrency=args.saturation_concurrency,
        saturation_rounds=args.saturation_rounds,
        peer_concurrency=args.peer_concurrency,
        cell_time_limit_s=args.cell_time_limit,
    )


async def _cost(
    args: argparse.Namespace,
    store: CellStore,
    bar: Progress,
    logs: Path,
    requests: int,
    skipped: dict[str, str],
) -> None:
    todo = [s for s in gateway_cost.STRATEGIES if store.get(f"cost/{s}") is None]
    bar.advance(requests * (len(gateway_cost.STRATEGIES) - len(todo)), "gateway cost (saved)")
    if not todo:
        return
    why = gateway_cost.fakes_available()
    if why is not None:
        for s in todo:
            skipped[f"cost/{s}"] = why
        bar.advance(requests * len(todo), "gateway cost (skipped)")
        return
    with gateway_cost.fake_stack(logs) as (url, pid):
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as c:
            for strategy in todo:

                def advance(n: int, s: str = strategy) -> None:
                    bar.advance(n, f"cost/{s}")

                result = await gateway_cost.measure(
                    c,
                    url,
                    pid,
                    strategy,
                    budget=args.budget,
                    beam_width=args.beam_width,
                    requests=requests,
                    concurrency=32,
                    time_limit_s=min(60, args.cell_time_limit),
                    advance=advance,
                )
                store.put(f"cost/{strategy}", result)


async def _prm(
    store: CellStore, bar: Progress, ends: Endpoints, requests: int, skipped: dict[str, str]
) -> None:
    for c in (1, 8, 32):
        cell = f"prm/c{c}"
        if store.get(cell) is None:
            if ends.prm_url is None:
                skipped[cell] = "no PRM worker URL (give --prm-url with --gateway-url)"
            else:
                store.put(cell, await prm.throughput(ends.prm_url, c, requests))
        bar.advance(requests, cell)


async def _real(
    args: argparse.Namespace,
    plan: Plan,
    store: CellStore,
    bar: Progress,
    ends: Endpoints,
    scenarios: set[str],
    skipped: dict[str, str],
) -> None:
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=900, limits=limits) as client:
        urls: dict[Any, str] = {"direct": ends.policy_url, "gateway": ends.gateway_url}
        runner = Runner(
            store,
            client,
            ends.policy_url,
            urls,
            time_limit_s=plan.cell_time_limit_s,
            advance=bar.advance,
        )
        specs = _specs(plan, scenarios, peer_too=False)
        if any(store.get(s.id) is None for s in specs):  # warm up vLLM and the gateway
            bar.advance(0, "warm-up")
            for spec in (specs[0], specs[1]):
                await client.post(urls[spec.target] + spec.calls[0].path, json=spec.calls[0].body)
        if "prm" in scenarios:
            await _prm(store, bar, ends, PROFILES[args.profile]["prm_requests"], skipped)
        for spec in specs:
            if spec.id.split("/")[0] != "overhead":
                await runner.run(spec)
        if "overhead" in scenarios:
            for group in overhead_groups(plan):  # direct and gateway in turns
                await runner.run_interleaved(group)
        if "peer" in scenarios:
            await _peer(args, plan, runner, bar, ends, skipped)


async def _peer(
    args: argparse.Namespace,
    plan: Plan,
    runner: Runner,
    bar: Progress,
    ends: Endpoints,
    skipped: dict[str, str],
) -> None:
    specs = peer_cells(plan)
    ours = [s for s in specs if s.target != "peer"]
    theirs = [s for s in specs if s.target == "peer"]
    for spec in ours:
        await runner.run(spec)
    if all(runner.store.get(s.id) is not None for s in theirs):
        for spec in theirs:
            await runner.run(spec)
        return
    venv = args.optillm_venv or peer.default_venv()
    try:
        bar.advance(0, f"installing {peer.OPTILLM}")
        await asyncio.to_thread(peer.install, venv, args.out / "optillm-install.log")
        logs = args.out / "logs"
        with peer.optillm_server(venv, ends.policy_url, logs, best_of_n=plan.budget) as url:
            runner.urls["peer"] = url
            for spec in theirs:
                await runner.run(spec)
    except (peer.PeerUnavailable, StackError) as exc:
        for spec in theirs:
            skipped[spec.id] = f"optillm unavailable: {exc}"
            bar.advance(len(spec.calls), spec.id)


def _pending(plan: Plan, store: CellStore, scenarios: set[str]) -> bool:
    """Whether a cell that needs the real stack is still to measure (else none is started:
    a rerun of a finished run only writes the report again)."""
    cells = [s.id for s in _specs(plan, scenarios)]
    cells += [f"prm/c{c}" for c in (1, 8, 32)] if "prm" in scenarios else []
    return any(store.get(cell) is None for cell in cells)


def _specs(plan: Plan, scenarios: set[str], *, peer_too: bool = True) -> list[CellSpec]:
    specs: list[CellSpec] = []
    # Saturation first: the headline ratio, measured even if a slow run is cut short.
    if "saturation" in scenarios:
        specs += saturation_cells(plan)
    if "overhead" in scenarios:
        specs += overhead_cells(plan)
    if peer_too and "peer" in scenarios:
        specs += peer_cells(plan)
    return specs


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main_bench(args: argparse.Namespace) -> int:
    # SIGTERM, and SIGINT even where a background shell ignores it, end the run through the
    # `finally` blocks that stop the servers it started (the saved cells stay: resume later).
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace) -> int:
    scenarios = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    unknown = scenarios - set(SCENARIOS)
    if unknown:
        print(f"error: unknown scenarios {sorted(unknown)}; known: {SCENARIOS}", file=sys.stderr)
        return 2
    settings = Settings()
    model = args.model or settings.policy_model
    plan = _plan(args, settings, model)
    sizes = PROFILES[args.profile]
    fingerprint = {**plan.settings(), "dataset": args.dataset, **sizes}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only and CellStore.saved_settings(args.out) != fingerprint:
        print(f"error: no cells in {args.out} measured with these settings", file=sys.stderr)
        return 2
    store = CellStore(args.out, fingerprint, fresh=args.fresh)
    if store.resumed:
        print(f"resuming: {store.resumed} cells already measured in {args.out}", file=sys.stderr)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    total = sum(len(s.calls) for s in _specs(plan, scenarios))
    total += sizes["cost_requests"] * len(gateway_cost.STRATEGIES) * ("cost" in scenarios)
    total += sizes["prm_requests"] * 3 * ("prm" in scenarios)
    bar = Progress(total)
    skipped: dict[str, str] = {}
    started = machine.describe()
    if args.report_only:
        bar.close()
        saved = store.get("meta/machine") or {}
        started = {**started, **{k: v for k, v in saved.items() if k != "cell"}}
        for spec in _specs(plan, scenarios):
            if store.get(spec.id) is None:
                skipped[spec.id] = "not measured: the run stopped before it"
        return _write(args, plan, store, started, skipped)
    try:
        if "cost" in scenarios:
            asyncio.run(_cost(args, store, bar, logs, sizes["cost_requests"], skipped))
        if _pending(plan, store, scenarios):
            with bench_stack(
                logs,
                model,
                policy_url=args.policy_url,
                prm_url=args.prm_url,
                gateway_url=args.gateway_url,
            ) as ends:
                started["vllm"] = machine.vllm_version(ends.policy_url)
                store.put("meta/machine", started)
                asyncio.run(_real(args, plan, store, bar, ends, scenarios, skipped))
        else:  # the machine the measured cells ran on, as saved then
            saved = store.get("meta/machine") or {}
            started = {**started, **{k: v for k, v in saved.items() if k != "cell"}}
    except StackError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    return _write(args, plan, store, started, skipped)


def _write(
    args: argparse.Namespace,
    plan: Plan,
    store: CellStore,
    started: dict[str, Any],
    skipped: dict[str, str],
) -> int:
    import json

    cells = store.all()
    for cell, why in skipped.items():
        cells.setdefault(cell, {"skipped": why})
    summary = summarize_run(cells, {**plan.settings(), "peer_self_consistency_n": 5})
    drawn = plots.draw_all(summary, args.out)
    end = machine.describe()
    meta = {
        "finished": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "profile": args.profile,
        "command": "tts-server bench " + shlex.join(sys.argv[2:])
        if len(sys.argv) > 2
        else "tts-server bench",
        "machine": started,
        "load_average_end": end["load_average"],
        "note": args.note,
        "problems": len(plan.problems),
        "dataset": args.dataset,
        "budget": plan.budget,
        "beam_width": plan.beam_width,
        "temperature": plan.temperature,
        "max_tokens": plan.max_tokens,
        "out": str(args.out),
        "plots": [str(p) for p in drawn],
    }
    (args.out / "summary.json").write_text(
        json.dumps({"meta": meta, "summary": summary}, indent=1) + "\n"
    )
    if not args.no_doc:
        report.write_doc(args.doc, report.render(summary, meta))
    for target in summary["targets"]:
        state = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        value = "n/a" if target["measured"] is None else f"{target['measured']:.3f}"
        print(f"{state:7} {target['target']}: {value}")
    print(f"summary: {args.out / 'summary.json'}" + ("" if args.no_doc else f"; doc: {args.doc}"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    sys.exit(main_bench(parser.parse_args()))
