"""Adaptive stopping rules replayed on an `eval` report's recorded samples (best-of-N runs):
how many samples each rule would draw, and the accuracy of its vote, against the whole budget.
A sample's cost is taken as its share of the run's samples (the few-shot prompt is cached).

    .venv/bin/python scripts/stop_rules.py reports/i16/singleop-bon.json [more reports...]
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from tts_server.router import stops_sampling
from tts_server.selection import select
from tts_server.tools.datasets import is_correct
from tts_server.tools.revote import recorded_candidates
from tts_server.tools.stats import paired_difference
from tts_server.types import StopRule


def drawn(answers: list[str | None], rule: StopRule, budget: int) -> int:
    k = rule.round_size
    while k < budget and not stops_sampling(answers[:k], rule):
        k += rule.round_size
    return min(k, budget)


def main(paths: list[str]) -> None:
    records = [
        r for p in paths for r in json.loads(Path(p).read_text())["records"] if "error" not in r
    ]
    budget = max(len(r["candidates_answers"]) for r in records)
    base = [bool(r["correct"]) for r in records]
    rules = (
        [("whole budget", None)]
        + [(f"beta {t}", StopRule(2, None, None, t)) for t in (0.95, 0.9, 0.8, 0.7)]
        + [
            (f"margin {m}, give up after {g}", StopRule(2, m, g, None))
            for m, g in itertools.product((2, 3), (4, 6, None))
        ]
    )
    print(
        f"{len(records)} problems, budget {budget}; against the run's own answers "
        f"({100 * sum(base) / len(base):.1f}%)"
    )
    print("| rule | samples drawn (share) | vote | accuracy | difference ± paired SE |")
    print("|---|---|---|---|---|")
    for name, rule in rules:
        for vote in ("majority", "weighted"):
            correct, used = [], 0
            for r in records:
                answers = r["candidates_answers"]
                k = budget if rule is None else drawn(answers, rule, budget)
                used += k
                chosen = select(
                    recorded_candidates(
                        {
                            **r,
                            "candidates_answers": answers[:k],
                            "candidate_scores": r["candidate_scores"][:k],
                            "candidate_confidences": None,
                        }
                    ),
                    vote,
                    "last",
                )
                correct.append(is_correct(chosen.answer, r["expected"]))
            d, se = paired_difference(correct, base)
            share = used / (budget * len(records))
            print(
                f"| {name} | {used / len(records):.2f} ({share:.2f}) | {vote} "
                f"| {100 * sum(correct) / len(correct):.1f}% | {100 * d:+.1f} ± {100 * se:.1f} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
