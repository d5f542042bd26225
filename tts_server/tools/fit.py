"""Fit the router's difficulty bins and routes from calibration records (`tts-server calibrate`
measures them, or reads them back with `--refit`):

1. thresholds on the pilot confidence are chosen so that the estimated bins agree best with the
   true pass@1 bins (easy >= 50%, medium >= 10%, hard below);
2. per bin, the route is chosen among the options (the pilot alone, or a strategy after it) by
   `--rule`; an option is scored as `auto` serves it: the answer is selected from the pilot's and
   the routed strategy's candidates together, so the pilot's samples count as they do live;
   "adaptive" options (rounds of best-of-N with a stopping rule, one option per rule of a small
   grid) are replayed from the recorded best-of-N samples in their order, their FLOPs the
   pilot's plus the drawn share of the best-of-N call's (tools/options.py); k-fold
   cross-validation reports how well the choice generalises;
3. the table comes with the calibration report, which also sets the cross-validated `auto`
   against fixed strategies run at the whole budget (`--compare`), the comparison a router must
   win. When routing loses, or a fixed strategy costs less for as much accuracy (a reference, or
   a route's strategy measured alone with fewer samples, e.g. DVTS with 4 samples of a budget of
   8), the table serves that strategy, no pilot, on its share of the budget.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from tts_server.router import BINS, FIXED_STRATEGIES, RouterTable, confidence_of, true_bin
from tts_server.tools.options import (
    ADAPTIVE_RULES,
    FIXED,
    PILOT,
    SEARCHES,
    adaptive_option,
    auto_cost,
    is_replayed_adaptive,
    route_of,
    width_for,
)
from tts_server.tools.stats import binomial_se, paired_difference


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
        costs[problem] = {o: auto_cost(rows, PILOT if early else o) for o in options}
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
        routes={name: route_of(option, pilot, client_budget) for name, option in routes.items()},
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
                if is_replayed_adaptive(option) or strategy not in FIXED_STRATEGIES:
                    continue
                if int(measured) >= client_budget:
                    continue
                n = int(measured)
                width = width_for(strategy, n) if strategy in SEARCHES else None
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
