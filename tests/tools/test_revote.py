"""`tts-server revote`: the selection rules replayed on an eval report's recorded samples."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tts_server.tools.cli import add_revote_arguments
from tts_server.tools.revote import agreement, main_revote, revote
from tts_server.types import ConfidenceConfig


def conf(value: float) -> dict[str, float | int]:
    return {"mean": value, "lowest_group": value, "tail": value, "bottom_10": value, "tokens": 9}


def record(
    problem: str,
    expected: str,
    served: str,
    answers: list[str],
    scores: list[float],
    confidences: list[float],
) -> dict[str, Any]:
    return {
        "id": problem,
        "expected": expected,
        "answer": served,
        "correct": served == expected,
        "flops": 100,
        "candidates_answers": answers,
        "candidate_scores": scores,
        "candidate_confidences": [conf(c) for c in confidences],
    }


# Problem a: two low-scored "3"s outvote one high-scored "4" by count, not by score; the "3"s are
# unsure, so the confidence vote follows the sure "4". Problem b: everything agrees on "7".
REPORT = {
    "dataset": "d",
    "strategy": "best_of_n",
    "budget": 3,
    "selection": None,
    "n": 2,
    "records": [
        record("a", "4", "4", ["3", "3", "4"], [0.3, 0.3, 0.9], [1.0, 1.0, 5.0]),
        record("b", "7", "7", ["7", "7", "7"], [0.5, 0.6, 0.7], [2.0, 2.0, 2.0]),
        {"id": "c", "expected": "1", "error": "timeout", "correct": False},
    ],
}


def test_each_rule_rechooses_from_the_same_samples_at_the_same_flops() -> None:
    config = ConfidenceConfig(metric="bottom_10", keep=0.5)
    chosen = {
        rule: [r.get("answer") for r in revote(REPORT, rule, config)["records"][:2]]
        for rule in ("naive", "weighted", "majority", "confidence", "filtered")
    }
    assert chosen["naive"] == ["4", "7"]
    assert chosen["weighted"] == ["4", "7"]  # 0.9 against 0.6
    assert chosen["majority"] == ["3", "7"]
    assert chosen["confidence"] == ["4", "7"]  # 5 against 2
    assert chosen["filtered"] == ["4", "7"]  # keeps the sure half: the "4" and one "3"
    majority = revote(REPORT, "majority", config)
    assert majority["accuracy"] == 1 / 3 and majority["selection"] == "majority"
    assert majority["records"][2]["error"] == "timeout"  # failed requests stay failed
    assert [r.get("flops") for r in majority["records"]] == [100, 100, None]


def test_the_servers_own_rule_reproduces_its_answers(tmp_path: Path, capsys: Any) -> None:
    config = ConfidenceConfig()
    assert agreement(REPORT, revote(REPORT, "weighted", config)) == (2, 2)
    assert agreement(REPORT, revote(REPORT, "majority", config)) == (1, 2)
    source = tmp_path / "run.json"
    source.write_text(json.dumps(REPORT))
    parser = argparse.ArgumentParser()
    add_revote_arguments(parser)
    args = parser.parse_args([str(source), "--rules", "weighted,majority", "--out", str(tmp_path)])
    assert main_revote(args) == 0
    out = capsys.readouterr().out
    assert "weighted: accuracy 66.7% over 3" in out and "same answer on 2/2" in out
    written = json.loads((tmp_path / "run-majority.json").read_text())
    assert written["replayed_from"] == "server default" and written["accuracy"] == 1 / 3
    bad = parser.parse_args([str(source), "--rules", "loudest", "--out", str(tmp_path)])
    assert main_revote(bad) == 2
