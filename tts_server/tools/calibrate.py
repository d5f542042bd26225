"""`tts-server calibrate`: fit the router's difficulty bins and routes on a dataset, live.

For every problem it runs, through the gateway: the pilot (best-of-N with the pilot's k samples:
its candidates' answers and scores give the difficulty features, and the share of them that is
correct is the problem's pass@1), then each routed strategy with what a client budget B leaves
after the pilot (B - k), and the references (`--compare`). Every result is one JSON line in the
records file, so an interrupted run resumes where it stopped. Then `fit` (tools/fit.py) chooses
the bins and routes, and the table is written as JSON for `TTS_ROUTER_TABLE` with the
calibration report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx

from tts_server.tools.datasets import DatasetError, Example, is_correct, load_dataset
from tts_server.tools.fit import fit
from tts_server.tools.options import ADAPTIVE, FIXED, PILOT, SEARCHES, width_for


def _key(example_id: str, option: str) -> str:
    return f"{example_id}|{option}"


async def _request(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    question: str,
    strategy: str,
    budget: int,
    *,
    server_width: bool = False,
) -> dict[str, Any]:
    headers = {"X-TTS-Strategy": strategy, "X-TTS-Budget": str(budget)}
    if strategy in SEARCHES and not server_width:
        headers["X-TTS-Beam-Width"] = str(width_for(strategy, budget))
    body = {"model": model, "messages": [{"role": "user", "content": question}]}
    response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
    tts: dict[str, Any] = response.json()["tts"]
    return tts


def _record(example: Example, option: str, tts: dict[str, Any]) -> dict[str, Any]:
    flops = tts.get("flops") or {}
    answers = tts.get("candidates_answers") or []
    scores = [s or 0.0 for s in tts.get("candidate_scores") or []]
    record: dict[str, Any] = {
        "id": example.id,
        "option": option,
        "expected": example.answer,
        "correct": is_correct(tts.get("answer"), example.answer),
        "flops": flops.get("total"),
        # The candidates, so `fit` can select among the pilot's and a route's together.
        "answers": answers,
        "scores": scores,
        "selection": tts.get("selection"),
    }
    if tts.get("candidate_confidences") is not None:
        record["confidences"] = tts["candidate_confidences"]
    if option == PILOT:
        counts: dict[str, int] = {}
        for answer in answers:
            if answer is not None:
                counts[answer] = counts.get(answer, 0) + 1
        n = max(1, len(answers))
        record["mean_score"] = sum(scores) / max(1, len(scores))
        record["agreement"] = max(counts.values(), default=0) / n
        record["pass_at_1"] = sum(is_correct(a, example.answer) for a in answers) / n
    return record


def _read_records(path: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                done[_key(record["id"], record["option"])] = record
    return done


async def collect(
    url: str,
    examples: list[Example],
    options: list[tuple[str, int]],
    pilot: int,
    records_path: Path,
    *,
    compare: list[tuple[str, int]] | None = None,
    concurrency: int = 2,
    progress: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[dict[str, Any]]:
    """Run what is missing from the records file; return every record."""
    from tqdm import tqdm  # the tools extra: only measuring needs it, not `--refit` or `fit`

    done = _read_records(records_path)
    # Problem by problem: an interrupted run leaves whole problems, which `fit` can use.
    jobs = [
        job
        for e in examples
        for job in [
            (e, PILOT, "best_of_n", pilot),
            *((e, f"{s}@{b}", s, b) for s, b in options),
            *((e, f"{FIXED}{s}@{b}", s, b) for s, b in compare or []),
        ]
    ]
    todo = [j for j in jobs if _key(j[0].id, j[1]) not in done]
    records_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        desc="calibrate",
        disable=not progress,
        file=sys.stderr,
    )
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=900.0, transport=transport) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        with records_path.open("a") as out:

            async def run(job: tuple[Example, str, str, int]) -> None:
                example, option, strategy, budget = job
                async with semaphore:
                    tts = await _request(
                        client,
                        url,
                        model,
                        example.question,
                        strategy,
                        budget,
                        # A reference runs as a client would ask for it: the server's width.
                        server_width=option.startswith(FIXED),
                    )
                record = _record(example, option, tts)
                out.write(json.dumps(record) + "\n")
                out.flush()  # a record on disk is a record never redone
                done[_key(example.id, option)] = record
                bar.update(1)

            await asyncio.gather(*(run(j) for j in todo))
    bar.close()
    return [done[_key(e.id, o)] for e, o, _, _ in jobs]


def main_calibrate(args: argparse.Namespace) -> int:
    try:
        examples = load_dataset(args.dataset)[args.offset :]
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        examples = examples[: args.limit]
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    adaptive = ADAPTIVE in strategies
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    options = []
    for budget in budgets:
        left = budget - args.pilot
        # Adaptive sampling is replayed from best-of-N: that is what runs.
        for strategy in {"best_of_n" if s == ADAPTIVE else s: None for s in strategies}:
            if left < 1:
                continue
            # A search runs a whole number of beam widths.
            options.append((strategy, left - left % width_for(strategy, left)))
    # `adaptive` is also a strategy a client names: measured as a reference (the server's
    # Beta rule), while its routes are replayed from best-of-N.
    names = strategies if args.compare is None else args.compare.split(",")
    compare = [(s.strip(), max(budgets)) for s in names if s.strip() not in ("", "none")]
    try:
        if args.refit:
            # Only what this command would have measured: its problems and its options.
            ids = {e.id for e in examples}
            wanted = {
                PILOT,
                *(f"{s}@{b}" for s, b in options),
                *(f"{FIXED}{s}@{b}" for s, b in compare),
            }
            records = [
                r
                for r in _read_records(args.records).values()
                if r["id"] in ids and r["option"] in wanted
            ]
        else:
            records = asyncio.run(
                collect(
                    args.url,
                    examples,
                    sorted(set(options)),
                    args.pilot,
                    args.records,
                    compare=compare,
                    concurrency=args.concurrency,
                )
            )
    except (httpx.HTTPError, RuntimeError) as exc:
        print(f"error: {exc} (finished problems are kept in {args.records})", file=sys.stderr)
        return 2
    try:
        table, report = fit(
            records,
            pilot=args.pilot,
            source=f"calibrated on {args.dataset}[{args.offset}:{args.offset + len(examples)}]",
            client_budget=max(budgets),
            rule=args.rule,
            adaptive=adaptive,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**table.to_json(), "calibration": report}, indent=2))
    print(json.dumps(report, indent=2))
    print(f"auto serves: {table.summary()}")
    print(f"router table: {args.out} (serve it with TTS_ROUTER_TABLE={args.out})")
    return 0
