"""`tts-server plot`: the PNG, its ticks, and the tables it prints from eval reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tts_server.tools.plots import bin_table, flops_ticks, markdown_table, plot, versus_table


def test_plot_writes_a_png(tmp_path: Path) -> None:
    reports = [
        {"dataset": "d", "strategy": s, "budget": b, "n": 10, "accuracy": a, "mean_flops": f}
        for s, b, a, f in [
            ("best_of_n", 4, 0.2, 1e11),
            ("best_of_n", 8, 0.25, 2e11),
            ("beam_search", 8, 0.3, 4e11),
            ("auto", 8, 0.3, 1.5e11),
        ]
    ]
    out = plot(reports, tmp_path / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (1.1e11, 2.9e11, [1.2e11, 1.5e11, 2e11, 2.5e11]),  # a third of a decade: fine steps
        (8e10, 4.5e11, [1e11, 1.5e11, 2e11, 3e11]),
        (3e9, 4e12, [5e9, 2e10, 1e11, 5e11, 2e12]),  # decades: 1-2-5, every other one kept
    ],
)
def test_flops_ticks_are_few_and_inside_the_axis(
    low: float, high: float, expected: list[float]
) -> None:
    ticks = flops_ticks(low, high)
    assert ticks == pytest.approx(expected)


def test_markdown_table_has_one_row_per_report_with_its_figures() -> None:
    base = {"budget": 8, "latency_p50_s": 1.25, "latency_p95_s": 3.5, "errors": 0}
    reports = [
        {
            **base,
            "dataset": "d",
            "strategy": "auto",
            "n": 80,
            "offset": 281,
            "accuracy": 0.125,
            "pass_at_n": 0.25,
            "mean_flops": 1.5e11,
            "flops_per_correct": 1.2e12,
        },
        {
            **base,
            "dataset": "d",
            "strategy": "greedy",
            "n": 100,
            "accuracy": 0.08,
            "mean_flops": None,
        },
    ]
    rows = markdown_table(reports).splitlines()
    assert len(rows) == 4
    # SE: sqrt(0.08 * 0.92 / 100) = 2.7 points; sqrt(0.125 * 0.875 / 80) = 3.7.
    assert rows[2].startswith("| d | 0-99 | greedy | 8.0% ± 2.7 | 0.0% | n/a | n/a |")
    assert rows[3] == (
        "| d | 281-360 | auto@8 | 12.5% ± 3.7 | 25.0% | 1.5e+11 | 1.2e+12 | 1.2 / 3.5 | 0 |"
    )


def test_versus_table_pairs_auto_with_each_fixed_strategy_on_shared_problems() -> None:
    def report(strategy: str, outcomes: list[tuple[str, bool, float]]) -> dict[str, Any]:
        return {
            "dataset": "d",
            "strategy": strategy,
            "budget": 8,
            "records": [{"id": i, "correct": c, "flops": f} for i, c, f in outcomes],
        }

    auto = report("auto", [("a", True, 10), ("b", True, 10), ("c", False, 20), ("x", True, 5)])
    dvts = report("dvts", [("a", True, 40), ("b", False, 40), ("c", True, 40)])
    rows = versus_table([dvts, auto]).splitlines()
    # On a, b, c: differences 0, +1, -1: mean 0, sd 1, paired SE 1 / sqrt(3) = 57.7 points.
    assert rows[2] == "| d | 3 | auto@8 | dvts@8 | +0.0 ± 57.7 points | 0.33 |"
    assert versus_table([dvts]) == "no `auto` report among these reports"


def test_bin_table_scores_fixed_strategies_on_the_bins_auto_estimated() -> None:
    def rec(problem: str, correct: bool, flops: float, bin_: str | None = None) -> dict[str, Any]:
        return {"id": problem, "correct": correct, "flops": flops, "difficulty": bin_}

    auto = {
        "dataset": "d",
        "strategy": "auto",
        "budget": 8,
        "records": [rec("a", True, 10, "easy"), rec("b", False, 30, "hard"), rec("c", True, 20)],
    }
    fixed = {
        "dataset": "d",
        "strategy": "dvts",
        "budget": 8,
        "records": [rec("a", False, 40), rec("b", True, 60), rec("c", True, 50)],
    }
    rows = bin_table([fixed, auto]).splitlines()
    assert rows[2] == "| d | auto@8 | 100% / 10 (n=1) | 0% / n/a (n=0) | 0% / 30 (n=1) |"
    assert rows[3] == "| d | dvts@8 | 0% / 40 (n=1) | 0% / n/a (n=0) | 100% / 60 (n=1) |"
    assert "no `auto` report" in bin_table([fixed])


def test_versus_against_pairs_every_report_with_the_named_one() -> None:
    def report(selection: str | None, outcomes: list[bool], flops: float) -> dict[str, Any]:
        return {
            "dataset": "d",
            "strategy": "best_of_n",
            "budget": 8,
            "selection": selection,
            "records": [{"id": i, "correct": c, "flops": flops} for i, c in enumerate(outcomes)],
        }

    base = report(None, [True, True, False, False], 10)
    majority = report("majority", [True, False, False, False], 10)
    adaptive = {**report(None, [True, True, True, False], 4), "strategy": "adaptive"}
    rows = versus_table([majority, base, adaptive], against="best_of_n@8").splitlines()
    assert rows[0].startswith("| dataset | problems | report | against |")
    # majority: differences 0, -1, 0, 0: mean -0.25, sd 0.5, SE 0.25.
    assert "| d | 4 | best_of_n@8 [majority] | best_of_n@8 | -25.0 ± 25.0 points | 1.00 |" in rows
    assert "| d | 4 | adaptive@8 | best_of_n@8 | +25.0 ± 25.0 points | 0.40 |" in rows
    assert len(rows) == 4
    assert versus_table([majority], against="best_of_n@8") == (
        "no report labelled 'best_of_n@8' among these reports"
    )
