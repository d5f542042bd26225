"""`tts-server calibrate`: fit the router's difficulty bins and routes on a dataset, live.

For every problem it runs, through the gateway: the pilot (best-of-N with the pilot's k samples:
its candidates' answers and scores give the difficulty features, and the share of them that is
correct is the problem's pass@1), then each routed strategy with what a client budget B leaves
after the pilot (B - k). Every result is one JSON line in the records file, so an interrupted run
resumes where it stopped. Then:

1. thresholds on the pilot confidence are chosen so that the estimated bins agree best with the
   true pass@1 bins (easy >= 50%, medium >= 10%, hard below);
2. per bin, the route is chosen among the options (the pilot alone, or a strategy after it) by
   `--rule`; an option is scored as `auto` serves it: the answer is selected from the pilot's and
   the routed strategy's candidates together, so the pilot's samples count as they do live;
   "adaptive" options (rounds of best-of-N with a stopping rule, one option per rule of a small
   grid) are replayed from the recorded best-of-N samples in their order, their FLOPs the
   pilot's plus the drawn share of the best-of-N call's; k-fold cross-validation reports how well
   the choice generalises;
3. the table is written as JSON for `TTS_ROUTER_TABLE`, with the calibration report, which also
   sets the cross-validated `auto` against fixed strategies run at the whole budget (`--compare`),
   the comparison a router must win. When routing loses, or a fixed strategy costs less for as
   much accuracy (a reference, or a route's strategy measured alone with fewer samples, e.g.
   DVTS with 4 samples of a budget of 8), the table serves that strategy, no pilot, on its share
   of the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from tts_server.answers import answers_equal
from tts_server.router import (
    BINS,
    FIXED_STRATEGIES,
    Route,
    RouterTable,
    confidence_of,
    stops_sampling,
    true_bin,
)
from tts_server.selection import select
from tts_server.tools.datasets import DatasetError, Example, load_dataset
from tts_server.tools.evaluate import binomial_se, paired_difference
from tts_server.types import Candidate, SelectionRule

SEARCH_WIDTH = 4
SEARCHES = ("beam_search", "dvts")


def _width(strategy: str, n: int) -> int:
    """The beam width a calibrated strategy runs with N samples."""
    return min(SEARCH_WIDTH, n) if strategy in SEARCHES else 1


PILOT = "pilot"
ADAPTIVE = "adaptive"
# The stopping rules calibration tries for "adaptive": (round size, stop margin, give up after).
ADAPTIVE_RULES: tuple[tuple[int, int | None, int | None], ...] = tuple(
    (size, margin, give_up)
    for size in (1, 2)
    for margin in (2, 3, None)
    for give_up in (4, 5, 6, None)
    if margin is not None or give_up is not None
)
# Reference options: a fixed strategy at the whole client budget, no pilot ("fixed:dvts@8").
FIXED = "fixed:"


def adaptive_option(n: int, size: int, margin: int | None, give_up: int | None) -> str:
    """`adaptive@4:r2:m2:g4`: up to n samples after the pilot, rounds of 2, stop 2 ahead or
    after 4 samples with no two equal answers (`-`: that rule is off)."""

    def part(value: int | None) -> str:
        return "-" if value is None else str(value)

    return f"{ADAPTIVE}@{n}:r{size}:m{part(margin)}:g{part(give_up)}"


def _adaptive_route(option: str) -> tuple[int, Route]:
    """(n, route) of an `adaptive_option` name."""
    head, size, margin, give_up = option.split(":")

    def number(part: str) -> int | None:
        return None if part[1:] == "-" else int(part[1:])

    route = Route(
        ADAPTIVE,
        round_size=int(size[1:]),
        stop_margin=number(margin),
        give_up_after=number(give_up),
    )
    return int(head.partition("@")[2]), route


def _key(example_id: str, option: str) -> str:
    return f"{example_id}|{option}"


def _correct(answer: str | None, expected: str) -> bool:
    return answer is not None and answers_equal(answer, expected)


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
        headers["X-TTS-Beam-Width"] = str(_width(strategy, budget))
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
        "correct": _correct(tts.get("answer"), example.answer),
        "flops": flops.get("total"),
        # The candidates, so `fit` can select among the pilot's and a route's together.
        "answers": answers,
        "scores": scores,
        "selection": tts.get("selection"),
    }
    if option == PILOT:
        counts: dict[str, int] = {}
        for answer in answers:
            if answer is not None:
                counts[answer] = counts.get(answer, 0) + 1
        n = max(1, len(answers))
        record["mean_score"] = sum(scores) / max(1, len(scores))
        record["agreement"] = max(counts.values(), default=0) / n
        record["pass_at_1"] = sum(_correct(a, example.answer) for a in answers) / n
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


def fit_thresholds(pilots: list[dict[str, Any]]) -> tuple[float, float, float]:
    """(easy_min, medium_min, share of problems whose estimated bin is their true bin)."""
    grid = [i / 20 for i in range(21)]
    best = (0.75, 0.45, -1.0)
    for easy in grid:
        for medium in (m for m in grid if m <= easy):
            table = RouterTable(easy_min=easy, medium_min=medium)
            hits = sum(
                table.bin_of(confidence_of(p["mean_score"], p["agreement"]))
                == true_bin(p["pass_at_1"])
                for p in pilots
            )
            agreement = hits / len(pilots) if pilots else 0.0
            if agreement > best[2]:
                best = (easy, medium, agreement)
    return best


Costs = dict[str, dict[str, tuple[bool, float]]]


def _choose(
    ids: list[str],
    costs: Costs,
    options: list[str],
    rule: str = "one_se",
) -> tuple[str, float, float]:
    """The option `auto` should take over `ids`: (option, accuracy, mean FLOPs).

    "max": the most accurate (cheaper on ties). "one_se" (the default): the cheapest option whose
    accuracy is within one standard error of the most accurate one, the usual guard against
    picking noise when cross-validating on a few dozen problems; a dearer strategy must win by
    more than the measurement can tell apart to earn its FLOPs.
    """
    scored = []
    for option in options:
        rows = [costs[i][option] for i in ids]
        accuracy = sum(c for c, _ in rows) / len(rows)
        flops = sum(f for _, f in rows) / len(rows)
        scored.append((option, accuracy, flops))
    # On full ties (e.g. every problem exits early) the pilot alone, the plainest route.
    best = max(scored, key=lambda o: (o[1], -o[2], o[0] == PILOT))
    if rule == "max":
        return best
    margin = binomial_se(best[1], len(ids))
    near = [o for o in scored if o[1] >= best[1] - margin - 1e-12]
    return min(near, key=lambda o: (o[2], -o[1], o[0] != PILOT))


def _auto_cost(records: dict[str, dict[str, Any]], option: str) -> tuple[bool, float]:
    """What `auto` would get and spend on a problem if it took `option` after the pilot."""
    pilot = records[PILOT]
    pilot_flops = float(pilot["flops"] or 0)
    if option == PILOT:
        return bool(pilot["correct"]), pilot_flops
    if option.startswith(ADAPTIVE + "@"):
        return _adaptive_cost(records, option)
    routed = records[option]
    return _merged_correct(pilot, routed), pilot_flops + float(routed["flops"] or 0)


def _adaptive_cost(records: dict[str, dict[str, Any]], option: str) -> tuple[bool, float]:
    """Replay adaptive sampling on the recorded best-of-N samples, in their order, as the engine
    draws them: rounds until the stopping rule holds or the n samples are spent. The FLOPs of the
    drawn samples are their share of the best-of-N call's (per-sample counts are not recorded)."""
    n, route = _adaptive_route(option)
    pilot, samples = records[PILOT], records[f"best_of_n@{n}"]
    if "answers" not in pilot or "answers" not in samples:
        raise ValueError(
            f"problem {pilot['id']}: its records keep no candidates, so adaptive sampling cannot "
            "be replayed (measure it again, or leave adaptive out of --strategies)"
        )
    answers = list(pilot["answers"])
    drawn = 0
    while drawn < n and not stops_sampling(answers, route):
        step = min(route.round_size, n - drawn)
        answers.extend(samples["answers"][drawn : drawn + step])
        drawn += step
    flops = float(pilot["flops"] or 0) + float(samples["flops"] or 0) * drawn / n
    if drawn == 0:
        return bool(pilot["correct"]), flops
    drawn_part = {
        **samples,
        "answers": samples["answers"][:drawn],
        "scores": samples["scores"][:drawn],
    }
    return _merged_correct(pilot, drawn_part), flops


def _merged_correct(pilot: dict[str, Any], routed: dict[str, Any]) -> bool:
    """Whether the answer `auto` serves is right: like the engine, it selects among the pilot's
    and the routed strategy's candidates together (majority vote after a majority route). Records
    written before candidates were kept fall back to the routed strategy's own answer."""
    if "answers" not in pilot or "answers" not in routed or "expected" not in routed:
        return bool(routed["correct"])
    strategy = str(routed["option"]).partition("@")[0]
    recorded = routed.get("selection")
    rule: SelectionRule = "weighted"
    if strategy == "majority":
        rule = "majority"
    elif recorded in ("naive", "weighted", "majority"):
        rule = recorded
    candidates = [
        # Scores are already aggregated: one "step" holding the score keeps it under "last".
        Candidate(step_scores=[float(score)], finished=True, answer=answer)
        for part in (pilot, routed)
        for answer, score in zip(part["answers"], part["scores"], strict=False)
    ]
    if not candidates:
        return False
    return _correct(select(candidates, rule, "last").answer, str(routed["expected"]))


def fit(
    records: list[dict[str, Any]],
    *,
    pilot: int,
    folds: int = 5,
    seed: int = 0,
    source: str = "calibrated",
    client_budget: int | None = None,
    rule: str = "one_se",
    adaptive: bool = False,
) -> tuple[RouterTable, dict[str, Any]]:
    """Fit the bins and routes. `client_budget` is the budget the table is written for (the
    largest calibrated one); a route measured with fewer samples keeps that share of it.
    `adaptive`: also try adaptive sampling, replayed from every best-of-N route."""
    by_id: dict[str, dict[str, dict[str, Any]]] = {}
    for record in records:
        by_id.setdefault(record["id"], {})[record["option"]] = record
    measured = sorted({r["option"] for r in records})
    # Only problems with every option measured (an interrupted run may leave a partial one).
    incomplete = [p for p, rows in by_id.items() if set(rows) != set(measured)]
    for problem in incomplete:
        del by_id[problem]
    if not by_id:
        raise ValueError("no problem has every option measured yet")
    options = [o for o in measured if not o.startswith(FIXED)]
    references = [o for o in measured if o.startswith(FIXED)]
    if adaptive:
        # Replayed from best-of-N routes (no request runs "adaptive" itself).
        options += [
            adaptive_option(int(o.partition("@")[2]), *rule)
            for o in options
            if o.startswith("best_of_n@")
            for rule in ADAPTIVE_RULES
        ]
    # Each (problem, route) once: merging candidates runs answer equivalence. A pilot that meets
    # the early exit is served alone whatever the route, as the engine does.
    exits = RouterTable()
    costs: Costs = {}
    for problem, rows in by_id.items():
        pilot_row = rows[PILOT]
        early = exits.exits_early(pilot_row.get("mean_score", 0.0), pilot_row.get("agreement", 0.0))
        costs[problem] = {o: _auto_cost(rows, PILOT if early else o) for o in options}
    pilots = [rows[PILOT] for rows in by_id.values()]
    easy_min, medium_min, bin_agreement = fit_thresholds(pilots)
    table = RouterTable(easy_min=easy_min, medium_min=medium_min)

    def bin_of(problem: str) -> str:
        p = by_id[problem][PILOT]
        return table.bin_of(confidence_of(p["mean_score"], p["agreement"]))

    def choose_routes(ids: list[str]) -> dict[str, str]:
        routes: dict[str, str] = {}
        for name in BINS:
            members = [i for i in ids if bin_of(i) == name] or ids  # empty bin: all problems
            routes[name] = _choose(members, costs, options, rule)[0]
        return routes

    problems = sorted(by_id)
    shuffled = problems[:]
    random.Random(seed).shuffle(shuffled)
    # Per problem: what the cross-validated `auto` served and spent on it (held out).
    held: dict[str, tuple[bool, float]] = {}
    k = max(2, min(folds, len(problems)))
    for fold in range(k):
        test = shuffled[fold::k]
        train = [p for p in shuffled if p not in set(test)]
        routes = choose_routes(train or test)
        for problem in test:
            held[problem] = costs[problem][routes[bin_of(problem)]]
    routing = _Measured.of({p: held[p] for p in problems})
    routes = choose_routes(problems)
    table = RouterTable(
        pilot_samples=pilot,
        easy_min=easy_min,
        medium_min=medium_min,
        routes={name: _route(option, pilot, client_budget) for name, option in routes.items()},
        source=source,
    )
    # An option as `auto` would serve it: pilot included, candidates merged.
    per_option = {
        option: _Measured.of({p: costs[p][option] for p in problems}).summary()
        for option in options
    }

    def alone(option: str, share: float = 1.0, width: int | None = None) -> _Measured:
        """An option's own records: what it answered and spent with no pilot."""
        rows = {p: by_id[p][option] for p in problems}
        outcomes = {p: (bool(r["correct"]), float(r["flops"] or 0)) for p, r in rows.items()}
        return _Measured.of(outcomes, share, width)

    references_alone = {option.removeprefix(FIXED): alone(option) for option in references}
    fixed = {name: option.summary() for name, option in references_alone.items()}
    against = _against_best(routing, references_alone, rule)
    served = None
    if references:
        # What `auto` serves: routing, or a fixed strategy (a reference on the whole budget, or a
        # route's strategy measured alone on fewer samples) when that costs less for as much.
        pool = dict(references_alone)
        if client_budget is not None:
            for option in options:
                strategy, _, measured = option.partition("@")
                if strategy not in FIXED_STRATEGIES or int(measured) >= client_budget:
                    continue
                n = int(measured)
                width = _width(strategy, n) if strategy in SEARCHES else None
                pool[option] = alone(option, round(n / client_budget, 4), width)
        served = _serve(routing, pool, rule)
        choice = pool.get(served["choice"])
        if choice is not None:
            # Routing by difficulty did not pay on these problems: serve the fixed strategy.
            table = dataclasses.replace(
                table,
                fixed_strategy=served["choice"].partition("@")[0],
                fixed_budget_share=choice.share,
                fixed_beam_width=choice.width,
            )
    report = {
        "problems": len(problems),
        "incomplete_problems_skipped": len(incomplete),
        "bin_agreement": bin_agreement,
        "bins": {name: sum(bin_of(p) == name for p in problems) for name in BINS},
        "routes": routes,
        "rule": rule,
        "cv_folds": k,
        "cv_auto_accuracy": routing.accuracy,
        "cv_auto_mean_flops": routing.mean_flops,
        "options": per_option,
        "fixed": fixed,
        "auto_vs_best_fixed": against,
        "served": served,
        "fixed_strategy": table.fixed_strategy,
    }
    return table, report


@dataclasses.dataclass(frozen=True)
class _Measured:
    """One way of answering, measured on the calibration problems."""

    correct: dict[str, bool]  # by problem
    mean_flops: float
    share: float = 1.0  # of the client budget, when served as a fixed strategy
    width: int | None = None  # beam width; None: the server's

    @classmethod
    def of(
        cls, outcomes: dict[str, tuple[bool, float]], share: float = 1.0, width: int | None = None
    ) -> _Measured:
        """From (correct, FLOPs) per problem."""
        flops = sum(f for _, f in outcomes.values()) / len(outcomes)
        return cls({p: c for p, (c, _) in outcomes.items()}, flops, share, width)

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / len(self.correct)

    def summary(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "mean_flops": self.mean_flops}


def _loses(option: _Measured, best: _Measured, rule: str) -> tuple[bool, float, float]:
    """(loses, accuracy difference, paired SE) of one option against the best on the same
    problems: less accurate, or as accurate and dearer. With `rule` "one_se", "less accurate"
    means by more than one paired standard error of the difference (the same problems, so their
    luck is shared) and "as accurate" within it; with "max", any difference counts."""
    problems = list(best.correct)
    difference, paired_se = paired_difference(
        [option.correct[p] for p in problems], [best.correct[p] for p in problems]
    )
    tolerance = paired_se if rule == "one_se" else 0.0
    dearer = option.mean_flops > best.mean_flops
    loses = difference < -tolerance - 1e-12 or (difference <= tolerance and dearer)
    return loses, difference, paired_se


def _serve(routing: _Measured, pool: dict[str, _Measured], rule: str) -> dict[str, Any]:
    """What `auto` should serve: the cheapest of the cross-validated routing ("auto") and the
    fixed options that do not lose to the most accurate of them all (cheaper on ties, routing
    on full ties)."""
    rows = {"auto": routing, **pool}
    best_name = max(rows, key=lambda n: (rows[n].accuracy, -rows[n].mean_flops, n == "auto"))
    table: dict[str, dict[str, Any]] = {}
    for name, option in rows.items():
        loses, difference, _ = _loses(option, rows[best_name], rule)
        table[name] = {
            **option.summary(),
            "budget_share": option.share,
            "difference_vs_best": difference,
            "loses": loses,
        }
    choice = min(
        (n for n, row in table.items() if not row["loses"]),
        key=lambda n: (table[n]["mean_flops"], n != "auto"),
    )
    return {"choice": choice, "best": best_name, "options": table}


def _against_best(
    routing: _Measured, references: dict[str, _Measured], rule: str
) -> dict[str, Any] | None:
    """The cross-validated routing against the most accurate fixed strategy on the whole budget
    (cheaper on ties): the comparison a router must win (`_loses` says what losing is)."""
    if not references:
        return None
    name, best = max(references.items(), key=lambda kv: (kv[1].accuracy, -kv[1].mean_flops))
    loses, difference, paired_se = _loses(routing, best, rule)
    return {
        "best_fixed": name,
        "accuracy_difference": difference,
        "paired_se": paired_se,
        "flops_ratio": routing.mean_flops / best.mean_flops if best.mean_flops else None,
        "auto_loses": loses,
    }


def _route(option: str, pilot: int, client_budget: int | None) -> Route:
    if option == PILOT:
        return Route("pilot")
    if option.startswith(ADAPTIVE + "@"):
        n, route = _adaptive_route(option)
    else:
        strategy, _, measured = option.partition("@")
        n = int(measured)
        route = Route(strategy, _width(strategy, n))
    share = 1.0 if client_budget is None else min(1.0, (pilot + n) / client_budget)
    return dataclasses.replace(route, budget_share=round(share, 4))


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="gateway base URL")
    parser.add_argument("--dataset", required=True, help="packaged name or .jsonl path")
    parser.add_argument(
        "--strategies",
        default="adaptive,best_of_n,beam_search,dvts,majority",
        help="comma-separated; adaptive is replayed from best-of-N samples (which it runs)",
    )
    parser.add_argument(
        "--budgets", default="8", help="client budgets B (comma-separated); routes run B - pilot"
    )
    parser.add_argument("--pilot", type=int, default=4, help="pilot samples k")
    parser.add_argument(
        "--compare",
        default=None,
        help="fixed strategies to run at the largest budget, no pilot, as the reference `auto` "
        "must beat (comma-separated; default: --strategies; 'none' to skip)",
    )
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--records", type=Path, default=Path("reports/calibration-records.jsonl"))
    parser.add_argument(
        "--rule",
        choices=("one_se", "max"),
        default="one_se",
        help="per bin: the cheapest option within one standard error of the most accurate "
        "(one_se), or the most accurate (max)",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="fit from the records file only, sending no request",
    )
    parser.add_argument("--out", type=Path, default=Path("reports/router-table.json"))


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
            options.append((strategy, left - left % _width(strategy, left)))
    names = (
        [s for s in strategies if s != ADAPTIVE]
        if args.compare is None
        else args.compare.split(",")
    )
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
