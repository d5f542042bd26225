"""`tts-server revote`: the selection rules replayed on the samples an `eval` run recorded.

Every rule (`naive`, `weighted`, `majority`, `confidence`, `filtered`) chooses among the same
candidates; replaying them on one run's records compares them on exactly the same samples (a
paired comparison with no sampling noise between rules) at exactly the same FLOPs, which is what
each rule would have cost: sampling is the same, and choosing costs nothing. The replay runs the
server's own `select` on each problem's recorded answers, final scores and confidences, so it
checks itself: the rule the run was served with must choose the recorded answer again.

Needs a run whose candidates carry confidences for `confidence` and `filtered`
(`TTS_CONFIDENCE_ALWAYS=true` on the server, or `eval --selection confidence`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from tts_server.answers import answers_equal
from tts_server.confidence import Confidence
from tts_server.selection import select
from tts_server.settings import Settings
from tts_server.tools.datasets import is_correct
from tts_server.tools.stats import flops_summary
from tts_server.types import Candidate, ConfidenceConfig, SelectionRule

RULES: tuple[SelectionRule, ...] = ("naive", "weighted", "majority", "confidence", "filtered")


def recorded_candidates(record: dict[str, Any]) -> list[Candidate] | None:
    answers = record.get("candidates_answers")
    scores = record.get("candidate_scores")
    if not answers or scores is None or len(scores) != len(answers):
        return None
    confidences = record.get("candidate_confidences") or [None] * len(answers)
    return [
        Candidate(
            step_scores=[] if score is None else [float(score)],
            finished=True,
            answer=answer,
            confidence=None
            if conf is None
            else Confidence(
                **{k: v for k, v in conf.items() if k in Confidence.__dataclass_fields__}
            ),
        )
        for answer, score, conf in zip(answers, scores, confidences, strict=True)
    ]


def revote(report: dict[str, Any], rule: SelectionRule, config: ConfidenceConfig) -> dict[str, Any]:
    """`report` as if its run had been served with `rule`: each record's answer re-chosen."""
    records = []
    for record in report["records"]:
        candidates = recorded_candidates(record) if "error" not in record else None
        if candidates is None:
            records.append(dict(record))
            continue
        chosen = select(candidates, rule, "last", config)
        answer = chosen.answer
        records.append(
            {**record, "answer": answer, "correct": is_correct(answer, record["expected"])}
        )
    ok = [r for r in records if "error" not in r]
    n = len(records)
    return {
        **{k: v for k, v in report.items() if k != "records"},
        "selection": rule,
        "replayed_from": report.get("selection") or "server default",
        "n": n,
        "accuracy": sum(bool(r.get("correct")) for r in records) / n if n else 0.0,
        **flops_summary(ok),
        "records": records,
    }


def agreement(report: dict[str, Any], replayed: dict[str, Any]) -> tuple[int, int]:
    """On how many answered problems the replay chose the answer the server chose."""
    same = total = 0
    for mine, theirs in zip(replayed["records"], report["records"], strict=True):
        if "error" in theirs or theirs.get("candidates_answers") is None:
            continue
        total += 1
        a, b = mine.get("answer"), theirs.get("answer")
        same += (a is None and b is None) or (
            a is not None and b is not None and answers_equal(a, b)
        )
    return same, total


def main_revote(args: argparse.Namespace) -> int:
    report = json.loads(args.report.read_text())
    settings = Settings()
    config = dataclasses.replace(
        settings.confidence(),
        metric=args.metric or settings.confidence_metric,
        keep=args.keep if args.keep is not None else settings.confidence_keep,
    )
    served = report.get("selection") or args.served
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.report.stem
    for rule in args.rules.split(","):
        if rule not in RULES:
            print(f"error: unknown rule {rule!r} (one of {', '.join(RULES)})")
            return 2
        replayed = revote(report, rule, config)
        path = args.out / f"{stem}-{rule}.json"
        path.write_text(json.dumps(replayed, indent=2))
        line = f"{rule}: accuracy {replayed['accuracy']:.1%} over {replayed['n']} -> {path}"
        if rule == served:
            same, total = agreement(report, replayed)
            line += f" (the server's rule: same answer on {same}/{total})"
        print(line)
    return 0
