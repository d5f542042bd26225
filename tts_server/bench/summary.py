"""From the cells of one run to the ratios the issue asks for, and which targets they meet.
Every ratio compares two cells of the same run (this machine's speed drifts between runs)."""

from __future__ import annotations

from typing import Any

from tts_server.bench.prm import per_step_latency

Cells = dict[str, dict[str, Any]]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _engine_tokens_per_answer(cell: dict[str, Any]) -> float | None:
    engine, answers = cell.get("engine") or {}, cell.get("answers") or 0
    if not answers or "generation_tokens" not in engine:
        return None
    return float(engine.get("prompt_tokens", 0.0) + engine["generation_tokens"]) / answers


def overhead(cells: Cells, n: int, concurrencies: list[int]) -> list[dict[str, Any]]:
    rows = []
    for c in concurrencies:
        pairs = (
            ("greedy", "gateway-greedy", "direct-greedy"),
            (f"majority@{n} / vLLM n={n}", f"gateway-majority{n}", f"direct-n{n}"),
            (f"best_of_n@{n} / vLLM n={n}", f"gateway-best_of_n{n}", f"direct-n{n}"),
        )
        for name, ours, theirs in pairs:
            gw, direct = cells.get(f"overhead/c{c}/{ours}"), cells.get(f"overhead/c{c}/{theirs}")
            if gw is None or direct is None:
                continue
            rows.append(
                {
                    "concurrency": c,
                    "pair": name,
                    "p50_ratio": ratio(gw["p50_s"], direct["p50_s"]),
                    "p99_ratio": ratio(gw["p99_s"], direct["p99_s"]),
                    "gateway_p50_s": gw["p50_s"],
                    "direct_p50_s": direct["p50_s"],
                    "gateway_p99_s": gw["p99_s"],
                    "direct_p99_s": direct["p99_s"],
                    "answers": (gw["answers"], direct["answers"]),
                }
            )
    return rows


def _steady(cell: dict[str, Any] | None) -> float | None:
    steady = (cell or {}).get("steady") or {}
    rate = steady.get("generation_tokens_per_s")
    return float(rate) if rate is not None else None


def saturation(cells: Cells, n: int) -> list[dict[str, Any]]:
    """Each cell's engine rate over direct n=N's: the steady rates (every loop busy) where
    both cells have one, else the whole cells' (tail included)."""
    ceiling = cells.get(f"saturation/direct-n{n}")
    rows = []
    for strategy in (
        f"direct-n{n}",
        f"gateway-best_of_n{n}",
        f"gateway-beam_search{n}",
        f"gateway-dvts{n}",
    ):
        cell = cells.get(f"saturation/{strategy}")
        if cell is None:
            continue
        whole = cell.get("engine_generation_tokens_per_s")
        whole_ratio = ratio(whole, (ceiling or {}).get("engine_generation_tokens_per_s"))
        steady, steady_ceiling = _steady(cell), _steady(ceiling)
        both = steady is not None and steady_ceiling is not None
        rows.append(
            {
                "cell": strategy,
                "engine_generation_tokens_per_s": steady if both else whole,
                "steady": both,
                "ratio_to_direct": ratio(steady, steady_ceiling) if both else whole_ratio,
                "whole_cell_tokens_per_s": whole,
                "whole_cell_ratio": whole_ratio,
                "answers_per_s": cell.get("answers_per_s"),
                "accuracy": cell.get("accuracy"),
                "engine_prompt_tokens": (cell.get("engine") or {}).get("prompt_tokens"),
                "engine_tokens_per_answer": _engine_tokens_per_answer(cell),
            }
        )
    return rows


def _per_answer(cell: dict[str, Any], key: str) -> float | None:
    engine, answers = cell.get("engine") or {}, cell.get("answers") or 0
    return engine[key] / answers if answers and key in engine else None


def prefix_cache(cells: Cells, n: int) -> list[dict[str, Any]]:
    """The share of prompt tokens vLLM served from its prefix cache. "After the first step":
    best-of-N@N's prompt side is exactly a step search's first step (the same N requests of the
    bare prompt), so per answer it is taken off both the queries and the hits."""
    first = cells.get(f"saturation/gateway-best_of_n{n}")
    rows = []
    for strategy in ("beam_search", "dvts"):
        cell = cells.get(f"saturation/gateway-{strategy}{n}")
        if cell is None:
            continue
        q, h = _per_answer(cell, "cache_queries"), _per_answer(cell, "cache_hits")
        row: dict[str, Any] = {"strategy": strategy, "share_all_steps": ratio(h, q)}
        if first is not None and q is not None and h is not None:
            q1, h1 = _per_answer(first, "cache_queries"), _per_answer(first, "cache_hits")
            if q1 is not None and h1 is not None:
                row["share_after_first_step"] = ratio(h - h1, q - q1)
                row["queries_per_answer"], row["first_step_queries_per_answer"] = q, q1
        rows.append(row)
    return rows


def gateway_cost(cells: Cells) -> list[dict[str, Any]]:
    keys = (
        "strategy",
        "budget",
        "answers",
        "errors",
        "cpu_s_per_answer",
        "answers_per_s",
        "answers_per_cpu_s",
        "gateway_cpu_share",
        "peak_rss_mib",
        "first_error",
    )
    return [
        {k: cell.get(k) for k in keys}
        for cid, cell in sorted(cells.items())
        if cid.startswith("cost/") and "skipped" not in cell
    ]


def peer(cells: Cells, n: int, sc_n: int) -> list[dict[str, Any]]:
    rows = []
    for name, ours, theirs in (
        (
            f"majority@{sc_n} / optillm self_consistency@{sc_n}",
            f"gateway-majority{sc_n}",
            f"optillm-self_consistency{sc_n}",
        ),
        (f"best_of_n@{n} / optillm bon@{n}", f"gateway-best_of_n{n}", f"optillm-bon{n}"),
    ):
        a, b = cells.get(f"peer/{ours}"), cells.get(f"peer/{theirs}")
        if a is None or b is None:
            continue
        rows.append(
            {
                "pair": name,
                "answers_per_s_ratio": ratio(a.get("answers_per_s"), b.get("answers_per_s")),
                "ours": _peer_side(a),
                "optillm": _peer_side(b),
            }
        )
    return rows


def _peer_side(cell: dict[str, Any]) -> dict[str, Any]:
    return {
        "answers_per_s": cell.get("answers_per_s"),
        "p50_s": cell.get("p50_s"),
        "p99_s": cell.get("p99_s"),
        "accuracy": cell.get("accuracy"),
        "engine_tokens_per_answer": _engine_tokens_per_answer(cell),
        "errors": cell.get("errors"),
        "first_error": cell.get("first_error"),
    }


def prm_path(cells: Cells, n: int) -> dict[str, Any]:
    throughput = {
        cid.split("/")[1]: cell.get("steps_per_s")
        for cid, cell in sorted(cells.items())
        if cid.startswith("prm/") and "steps_per_s" in cell
    }
    per_step = {}
    for strategy in ("beam_search", "dvts"):
        cell = cells.get(f"saturation/gateway-{strategy}{n}")
        if cell is not None:
            per_step[strategy] = per_step_latency(cell.get("records") or [])
    return {"worker_steps_per_s": throughput, "per_search_step": per_step}


def summarize_run(cells: Cells, settings: dict[str, Any]) -> dict[str, Any]:
    n = int(settings["budget"])
    sc_n = int(settings.get("peer_self_consistency_n", 5))
    summary = {
        "overhead": overhead(cells, n, list(settings["concurrencies"])),
        "saturation": saturation(cells, n),
        "prefix_cache": prefix_cache(cells, n),
        "gateway_cost": gateway_cost(cells),
        "prm_path": prm_path(cells, n),
        "peer": peer(cells, n, sc_n),
        "skipped": {cid: c["skipped"] for cid, c in cells.items() if "skipped" in c},
    }
    summary["targets"] = targets(summary, n)
    return summary


def _target(name: str, measured: float | None, limit: float, *, at_most: bool) -> dict[str, Any]:
    met = None if measured is None else (measured <= limit if at_most else measured >= limit)
    return {"target": name, "limit": limit, "at_most": at_most, "measured": measured, "met": met}


def targets(summary: dict[str, Any], n: int) -> list[dict[str, Any]]:
    out = []
    for row in summary["overhead"]:
        if row["pair"].startswith(("greedy", "majority")):
            where = f"{row['pair'].split(' /')[0]} c{row['concurrency']}"
            out.append(_target(f"gateway/vLLM p50 {where}", row["p50_ratio"], 1.05, at_most=True))
            out.append(_target(f"gateway/vLLM p99 {where}", row["p99_ratio"], 1.10, at_most=True))
    limits = {
        f"gateway-best_of_n{n}": 0.95,
        f"gateway-beam_search{n}": 0.9,
        f"gateway-dvts{n}": 0.9,
    }
    for row in summary["saturation"]:
        if row["cell"] in limits:
            name = f"engine saturation {row['cell'].removeprefix('gateway-')} c16"
            out.append(_target(name, row["ratio_to_direct"], limits[row["cell"]], at_most=False))
    for row in summary["prefix_cache"]:
        if row["strategy"] == "beam_search":
            share = row.get("share_after_first_step")
            out.append(
                _target("prefix cache share, beam search after step 1", share, 0.85, at_most=False)
            )
    for row in summary["peer"]:
        out.append(
            _target(
                f"answers/s vs optillm: {row['pair']}",
                row["answers_per_s_ratio"],
                2.0,
                at_most=False,
            )
        )
        ours, theirs = row["ours"], row["optillm"]
        if ours["accuracy"] is not None and theirs["accuracy"] is not None:
            out.append(
                _target(
                    f"accuracy minus optillm's: {row['pair']}",
                    ours["accuracy"] - theirs["accuracy"],
                    0.0,
                    at_most=False,
                )
            )
        mine, peer_tokens = ours["engine_tokens_per_answer"], theirs["engine_tokens_per_answer"]
        out.append(
            _target(
                f"engine tokens/answer over optillm's: {row['pair']}",
                ratio(mine, peer_tokens),
                1.0,
                at_most=True,
            )
        )
    for row in summary["gateway_cost"]:
        if row["strategy"] == "best_of_n":
            out.append(
                _target(
                    f"gateway answers/s, best_of_n@{n}, one worker on one CPU",
                    row["answers_per_s"],
                    100.0,
                    at_most=False,
                )
            )
    return out
