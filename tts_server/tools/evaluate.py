"""`tts-server eval`: run a dataset through a running gateway and report accuracy and cost."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import httpx

from tts_server.answers import extract_answer
from tts_server.tools.datasets import DatasetError, Example, is_correct, load_dataset
from tts_server.tools.stats import flops_summary


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _one(
    client: httpx.AsyncClient,
    base_url: str,
    model: str,
    example: Example,
    strategy: str,
    budget: int,
    temperature: float | None = None,
    selection: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": example.question}],
        "tts": {"strategy": strategy, "budget": budget},
    }
    if selection is not None:
        body["tts"]["selection"] = selection
    if temperature is not None:
        body["temperature"] = temperature
    headers = {"X-TTS-Strategy": strategy, "X-TTS-Budget": str(budget)}
    started = time.perf_counter()
    record: dict[str, Any] = {"id": example.id, "expected": example.answer}
    try:
        response = await client.post(f"{base_url}/v1/chat/completions", json=body, headers=headers)
    except httpx.HTTPError as exc:
        return {**record, "error": type(exc).__name__}
    record["latency_s"] = time.perf_counter() - started
    if response.status_code != 200:
        return {**record, "error": f"HTTP {response.status_code}"}
    data = response.json()
    tts = data.get("tts", {})
    answer = tts.get("answer")
    if answer is None:
        answer = extract_answer(data["choices"][0]["message"]["content"] or "")
    candidates = tts.get("candidates_answers")
    usage = data.get("usage", {})
    flops = tts.get("flops") or {}
    difficulty = tts.get("difficulty") or {}
    return {
        **record,
        "answer": answer,
        "correct": is_correct(answer, example.answer),
        "any_correct": (
            any(is_correct(a, example.answer) for a in candidates)
            if candidates is not None
            else None
        ),
        "prompt_tokens": usage.get("prompt_tokens", 0),
        "completion_tokens": usage.get("completion_tokens", 0),
        "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
        "strategy": tts.get("strategy"),
        "flops": flops.get("total"),
        "flops_policy": flops.get("policy"),
        "flops_prm": flops.get("prm"),
        "difficulty": difficulty.get("bin"),
        "routed": (tts.get("route") or {}).get("strategy"),
        "candidates_answers": candidates,
        "candidate_scores": tts.get("candidate_scores"),
        "candidate_confidences": tts.get("candidate_confidences"),
    }


async def run_eval(
    base_url: str,
    dataset: str,
    *,
    strategy: str,
    budget: int,
    limit: int | None = None,
    offset: int = 0,
    concurrency: int = 2,
    temperature: float | None = None,
    selection: str | None = None,
    model: str | None = None,
    progress: bool = True,
    timeout_s: float = 900.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> dict[str, Any]:
    from tqdm import tqdm  # the tools extra: needed to run, not to import this module

    examples = load_dataset(dataset)[offset:]
    if limit is not None:
        examples = examples[:limit]
    base_url = base_url.rstrip("/")
    async with httpx.AsyncClient(timeout=timeout_s, transport=transport) as client:
        if model is None:
            model = (await client.get(f"{base_url}/v1/models")).json()["data"][0]["id"]
        semaphore = asyncio.Semaphore(concurrency)
        bar = tqdm(
            total=len(examples), desc=f"{strategy}@{budget}", disable=not progress, file=sys.stderr
        )
        done: list[dict[str, Any]] = []

        async def bounded(example: Example) -> dict[str, Any]:
            async with semaphore:
                record = await _one(
                    client, base_url, model, example, strategy, budget, temperature, selection
                )
            done.append(record)
            bar.update(1)
            bar.set_postfix(acc=f"{sum(bool(r.get('correct')) for r in done) / len(done):.1%}")
            return record

        started = time.perf_counter()
        records = await asyncio.gather(*(bounded(e) for e in examples))
        bar.close()
    ok = [r for r in records if "error" not in r]
    passes = [r["any_correct"] for r in ok if r["any_correct"] is not None]
    latencies = [r["latency_s"] for r in ok]
    n = len(records)
    return {
        "dataset": dataset,
        "strategy": strategy,
        "budget": budget,
        # None: the server's default sampling temperature and selection rule.
        "temperature": temperature,
        "selection": selection,
        "n": n,
        "offset": offset,
        "accuracy": sum(bool(r.get("correct")) for r in records) / n if n else 0.0,
        "pass_at_n": sum(passes) / len(passes) if passes else None,
        "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in ok) if ok else None,
        "mean_completion_tokens": (
            statistics.mean(r["completion_tokens"] for r in ok) if ok else None
        ),
        "latency_p50_s": _percentile(latencies, 0.5),
        "latency_p95_s": _percentile(latencies, 0.95),
        "errors": n - len(ok),
        "wall_time_s": time.perf_counter() - started,
        **flops_summary(ok),
        "by_difficulty": {
            name: {"n": len(group), **flops_summary(group)}
            for name, group in _by(ok, "difficulty").items()
        },
        "records": records,
    }


def _by(records: list[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record.get(key) is not None:
            groups.setdefault(str(record[key]), []).append(record)
    return groups


def main_eval(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(
            run_eval(
                args.url,
                args.dataset,
                strategy=args.strategy,
                budget=args.budget,
                limit=args.limit,
                offset=args.offset,
                concurrency=args.concurrency,
                temperature=args.temperature,
                selection=args.selection,
            )
        )
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(
            f"error: the gateway at {args.url} is unreachable ({type(exc).__name__})",
            file=sys.stderr,
        )
        return 2
    pass_at_n = report["pass_at_n"]
    print(
        f"{report['dataset']} {report['strategy']}@{report['budget']}: "
        f"accuracy {report['accuracy']:.1%} over {report['n']}"
        + (f", pass@{report['budget']} {pass_at_n:.1%}" if pass_at_n is not None else "")
        + f", {report['errors']} errors, p50 {report['latency_p50_s'] or 0:.1f} s"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"report: {args.out}")
    return 0
