"""`tts-server calibrate` (collect, fit and resume), over a scripted gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tts_server.router import parse_table
from tts_server.strategies.auto import plan_budget
from tts_server.tools.calibrate import collect
from tts_server.tools.datasets import Example, load_dataset
from tts_server.tools.fit import fit
from tts_server.tools.options import PILOT

EXAMPLES = [Example(id=f"p{i}", question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(12)]


def hard_problems(
    count: int, pilot: tuple[float, float, float], options: dict[str, tuple[bool, float]]
) -> list[dict[str, Any]]:
    """Records of `count` problems whose pilot (FLOPs, mean score, agreement) found no right
    answer, each option being (correct, FLOPs) on every one of them."""
    flops, score, agreement = pilot
    records: list[dict[str, Any]] = []
    for i in range(count):
        records.append({"id": f"p{i}", "option": PILOT, "correct": False, "flops": flops,
                        "mean_score": score, "agreement": agreement, "pass_at_1": 0.0})  # fmt: skip
        for option, (correct, cost) in options.items():
            records.append({"id": f"p{i}", "option": option, "correct": correct, "flops": cost})
    return records


def scripted_gateway(calls: list[dict[str, Any]]) -> httpx.MockTransport:
    """Even problems are easy (the pilot agrees and is right), odd ones hard (only beam search
    finds the answer). FLOPs: pilot 100, best_of_n 100, beam_search 400."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        body = json.loads(request.content)
        calls.append({"headers": dict(request.headers), "body": body})
        i = int(body["messages"][0]["content"].split()[2])
        strategy, budget = request.headers["x-tts-strategy"], int(request.headers["x-tts-budget"])
        right, wrong = str(i + 1), "0"
        if strategy == "best_of_n" and budget == 4 and not calls[-1].get("routed"):
            answers = [right] * 4 if i % 2 == 0 else [wrong, "99", None, "98"]
            scores = [0.9] * 4 if i % 2 == 0 else [0.2] * 4
            answer, flops = answers[0], 100
        elif strategy == "beam_search":
            answers, scores, answer, flops = [right], [0.8], right, 400
        else:
            answer = right if i % 2 == 0 else wrong
            answers, scores, flops = [answer], [0.5], 100
        tts = {
            "answer": answer,
            "candidates_answers": answers,
            "candidate_scores": scores,
            "flops": {"total": flops},
        }
        return httpx.Response(200, json={"tts": tts})

    return httpx.MockTransport(handler)


def test_collect_fit_and_resume(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    records_path = tmp_path / "records.jsonl"
    options = [("best_of_n", 4), ("beam_search", 4)]
    records = asyncio.run(
        collect(
            "http://gw",
            EXAMPLES,
            options,
            4,
            records_path,
            progress=False,
            transport=scripted_gateway(calls),
        )
    )
    assert len(records) == len(calls) == 12 * 3
    beam_calls = [c for c in calls if c["headers"]["x-tts-strategy"] == "beam_search"]
    assert all(c["headers"]["x-tts-beam-width"] == "4" for c in beam_calls)

    # Interrupted runs resume: drop the last 5 lines, and only those 5 are redone.
    lines = records_path.read_text().splitlines()
    records_path.write_text("\n".join(lines[:-5]) + "\n")
    calls.clear()
    again = asyncio.run(
        collect(
            "http://gw",
            EXAMPLES,
            options,
            4,
            records_path,
            progress=False,
            transport=scripted_gateway(calls),
        )
    )
    assert len(calls) == 5
    assert sorted(json.dumps(r, sort_keys=True) for r in again) == sorted(
        json.dumps(r, sort_keys=True) for r in records
    )

    table, report = fit(again, pilot=4)
    # Easy problems: the pilot alone is right and cheapest; hard ones need beam search.
    assert table.routes["easy"].strategy == "pilot"
    assert table.routes["hard"].strategy == "beam_search"
    assert report["bin_agreement"] == 1.0
    assert report["cv_auto_accuracy"] == 1.0
    # Auto spends 100 on easy and 500 on hard problems: 300 on average, vs 500 for always-beam.
    assert report["cv_auto_mean_flops"] == pytest.approx(300)
    assert parse_table(table.to_json()) == table
    pilot_record = next(r for r in again if r["option"] == PILOT and r["id"] == "p1")
    assert pilot_record["pass_at_1"] == 0.0 and pilot_record["agreement"] == 0.25


def test_fit_skips_problems_an_interrupted_run_left_incomplete() -> None:
    def pilot(problem: str, correct: bool) -> dict[str, Any]:
        return {
            "id": problem,
            "option": PILOT,
            "correct": correct,
            "flops": 10,
            "mean_score": 0.9,
            "agreement": 1.0,
            "pass_at_1": 1.0 if correct else 0.0,
        }

    records = [
        pilot("a", True),
        {"id": "a", "option": "beam_search@4", "correct": True, "flops": 30},
        pilot("b", False),
        {"id": "b", "option": "beam_search@4", "correct": True, "flops": 30},
        pilot("c", False),  # its beam_search run never happened
    ]
    _, report = fit(records, pilot=4)
    assert report["problems"] == 2 and report["incomplete_problems_skipped"] == 1
    with pytest.raises(ValueError, match="every option"):
        fit([pilot("c", False), {"id": "d", "option": "beam_search@4", "correct": 1}], pilot=4)


def test_a_dearer_route_must_win_by_more_than_one_standard_error() -> None:
    """20 hard problems: dvts is right on 5 for 300 FLOPs, the pilot alone on 4 for 100. The
    difference (5%) is under one standard error (about 9.7%), so one_se takes the pilot; max
    takes dvts."""
    records: list[dict[str, Any]] = []
    for i in range(20):
        problem = f"p{i}"
        records += [
            {"id": problem, "option": PILOT, "correct": i < 4, "flops": 100,
             "mean_score": 0.1, "agreement": 0.25, "pass_at_1": 0.0},
            {"id": problem, "option": "dvts@4", "correct": i < 5, "flops": 200},
        ]  # fmt: skip
    cheap, report = fit(records, pilot=4)
    assert cheap.routes["hard"].strategy == "pilot" and report["rule"] == "one_se"
    dear, _ = fit(records, pilot=4, rule="max")
    assert dear.routes["hard"].strategy == "dvts"


def test_a_route_measured_with_fewer_samples_keeps_that_share_of_the_budget() -> None:
    """Calibrated at budgets 6 and 8 with a pilot of 2: best_of_n@4 (2 + 4 of 8) is as right as
    best_of_n@6 and cheaper, so it is the route, and it must be served with 6 of 8, not 8."""
    records = hard_problems(
        6, (20, 0.1, 0.5), {"best_of_n@4": (True, 40), "best_of_n@6": (True, 60)}
    )
    table, _ = fit(records, pilot=2, client_budget=8)
    route = table.routes["hard"]
    assert (route.strategy, route.budget_share) == ("best_of_n", 0.75)
    assert plan_budget(route, 8, 2) == (4, 1)
    assert parse_table(table.to_json()).routes["hard"].budget_share == 0.75


def test_refit_uses_only_the_problems_and_options_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A records file from a wider run (another option on some problems, other problems) refits
    to what the command names, without sending a request."""
    from tts_server.tools.calibrate import main_calibrate
    from tts_server.tools.cli import add_calibrate_arguments

    ids = [e.id for e in load_dataset("mawps_singleop")[:3]]
    lines = []
    for problem in ids:
        lines.append(
            {"id": problem, "option": PILOT, "correct": False, "flops": 10,
             "mean_score": 0.1, "agreement": 0.25, "pass_at_1": 0.0}
        )  # fmt: skip
        lines.append({"id": problem, "option": "dvts@4", "correct": True, "flops": 20})
    lines.append({"id": ids[0], "option": "majority@4", "correct": True, "flops": 5})
    lines.append({"id": "elsewhere", "option": PILOT, "correct": True, "flops": 1})
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(line) + "\n" for line in lines))
    parser = argparse.ArgumentParser()
    add_calibrate_arguments(parser)
    out = tmp_path / "table.json"
    args = parser.parse_args(
        ["--dataset", "mawps_singleop", "--limit", "3", "--strategies", "dvts", "--refit",
         "--url", "http://127.0.0.1:9", "--records", str(records), "--out", str(out)]
    )  # fmt: skip
    assert main_calibrate(args) == 0
    written = json.loads(out.read_text())
    assert written["calibration"]["problems"] == 3
    assert written["routes"]["hard"]["strategy"] == "dvts"
    assert "auto serves: a pilot of 4 samples, then easy: dvts" in capsys.readouterr().out


def test_a_route_is_scored_on_the_answer_auto_serves_from_pilot_and_route_together() -> None:
    """Problem a: the pilot says 7 three times (score 0.5 each) and the route once says 9 (0.9):
    weighted selection over all candidates serves 7 (1.5 against 0.9), right, although the
    route's own answer is wrong. Problem b: the reverse, the merged answer is wrong."""

    def pilot(problem: str, answers: list[str], score: float, expected: str) -> dict[str, Any]:
        return {"id": problem, "option": PILOT, "expected": expected, "correct": False,
                "flops": 10, "answers": answers, "scores": [score] * len(answers),
                "selection": "weighted", "mean_score": score, "agreement": 0.75,
                "pass_at_1": 0.0}  # fmt: skip

    def routed(problem: str, answer: str, expected: str) -> dict[str, Any]:
        return {"id": problem, "option": "dvts@4", "expected": expected,
                "correct": answer == expected, "flops": 20, "answers": [answer],
                "scores": [0.9], "selection": "weighted"}  # fmt: skip

    records = [
        pilot("a", ["7", "7", "7", "3"], 0.5, "7"),
        routed("a", "9", "7"),
        pilot("b", ["5", "5", "5", "3"], 0.5, "9"),
        routed("b", "9", "9"),
    ]
    _, report = fit(records, pilot=4)
    assert report["options"]["dvts@4"] == {"accuracy": 0.5, "mean_flops": 30}
    # Records from before candidates were kept: the route's own answer decides.
    old = [{k: v for k, v in r.items() if k != "answers"} for r in records]
    _, report = fit(old, pilot=4)
    assert report["options"]["dvts@4"]["accuracy"] == 0.5
    assert fit(old[2:], pilot=4)[1]["options"]["dvts@4"]["accuracy"] == 1.0


def test_fixed_references_run_at_the_whole_budget_and_are_never_routes(tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []
    records = asyncio.run(
        collect(
            "http://gw",
            EXAMPLES,
            [("beam_search", 4)],
            4,
            tmp_path / "records.jsonl",
            compare=[("beam_search", 8), ("best_of_n", 8)],
            progress=False,
            transport=scripted_gateway(calls),
        )
    )
    assert len(calls) == 12 * 4
    fixed_beam = [
        c for c in calls
        if c["headers"]["x-tts-strategy"] == "beam_search" and c["headers"]["x-tts-budget"] == "8"
    ]  # fmt: skip
    # A reference runs as a client asks for it: the server's own beam width.
    assert len(fixed_beam) == 12 and all("x-tts-beam-width" not in c["headers"] for c in fixed_beam)
    table, report = fit(records, pilot=4)
    assert {r.strategy for r in table.routes.values()} <= {"pilot", "beam_search"}
    # The scripted fixed beam search is always right for 400; best_of_n@8 right on even ones.
    assert report["fixed"]["beam_search@8"] == {"accuracy": 1.0, "mean_flops": 400}
    assert report["fixed"]["best_of_n@8"]["accuracy"] == 0.5
    against = report["auto_vs_best_fixed"]
    assert against["best_fixed"] == "beam_search@8"
    assert against["accuracy_difference"] == 0.0
    assert against["flops_ratio"] == pytest.approx(300 / 400)


def test_a_pilot_that_exits_early_is_scored_alone_whatever_the_route() -> None:
    """As served: a pilot agreeing fully with mean score >= 0.9 answers at once, so the route's
    FLOPs and answer do not count on that problem."""
    records = [
        {"id": "a", "option": PILOT, "correct": True, "flops": 10, "mean_score": 0.95,
         "agreement": 1.0, "pass_at_1": 1.0},
        {"id": "a", "option": "dvts@4", "correct": False, "flops": 50},
        {"id": "b", "option": PILOT, "correct": False, "flops": 10, "mean_score": 0.5,
         "agreement": 0.5, "pass_at_1": 0.0},
        {"id": "b", "option": "dvts@4", "correct": True, "flops": 50},
    ]  # fmt: skip
    _, report = fit(records, pilot=4)
    assert report["options"]["dvts@4"] == {"accuracy": 1.0, "mean_flops": (10 + 60) / 2}


def test_when_no_routing_beats_the_best_fixed_strategy_the_table_serves_it() -> None:
    """dvts@8 alone is right on every problem; pilot + best_of_n on none: `auto` loses to the
    reference, so the table names dvts as the fixed strategy (no pilot, no routes)."""
    records = hard_problems(
        6, (10, 0.2, 0.25), {"best_of_n@4": (False, 10), "fixed:dvts@8": (True, 80)}
    )
    table, report = fit(records, pilot=4)
    assert table.fixed_strategy == "dvts" and report["fixed_strategy"] == "dvts"
    assert report["auto_vs_best_fixed"]["auto_loses"] is True
    assert parse_table(table.to_json()).fixed_strategy == "dvts"


def test_a_strategy_as_accurate_on_fewer_samples_is_served_on_that_share_of_the_budget() -> None:
    """dvts@4 (alone, 40 FLOPs) is right exactly where dvts@8 (80 FLOPs) is, as is routing
    (pilot + dvts@4, 50 FLOPs): `auto` serves DVTS on half the budget, no pilot, with the width it
    was measured with. With no budget to relate 4 samples to, dvts@4 cannot be served alone, and
    routing, cheaper than dvts@8, is kept."""
    records = hard_problems(6, (10, 0.2, 0.25), {"dvts@4": (True, 40), "fixed:dvts@8": (True, 80)})
    table, report = fit(records, pilot=4, client_budget=8)
    served = report["served"]
    assert served["choice"] == "dvts@4" and served["best"] == "dvts@4"
    assert served["options"]["dvts@8"]["loses"] is True  # as accurate, dearer
    assert served["options"]["auto"]["loses"] is True
    assert (table.fixed_strategy, table.fixed_budget_share, table.fixed_beam_width) == (
        "dvts",
        0.5,
        4,
    )
    assert parse_table(table.to_json()) == table
    # The comparison the router must win stays the one against the whole budget.
    assert report["auto_vs_best_fixed"]["best_fixed"] == "dvts@8"
    table, report = fit(records, pilot=4)
    assert set(report["served"]["options"]) == {"auto", "dvts@8"}
    assert report["served"]["choice"] == "auto" and table.fixed_strategy is None


def test_a_cheaper_strategy_that_loses_by_more_than_the_paired_se_is_not_served() -> None:
    """best_of_n@4 costs a quarter of dvts@8 but is right on 2 of 20 problems where dvts@8 is
    right on 12: far outside one paired SE, so the whole-budget DVTS is served."""
    records = []
    for i in range(20):
        records.append({"id": f"p{i}", "option": PILOT, "correct": False, "flops": 10,
                        "mean_score": 0.2, "agreement": 0.25, "pass_at_1": 0.0})  # fmt: skip
        records.append({"id": f"p{i}", "option": "best_of_n@4", "correct": i < 2, "flops": 20})
        records.append({"id": f"p{i}", "option": "fixed:dvts@8", "correct": i < 12, "flops": 80})
    table, report = fit(records, pilot=4, client_budget=8)
    assert report["served"]["options"]["best_of_n@4"]["loses"] is True
    assert report["served"]["choice"] == "dvts@8"
    assert (table.fixed_strategy, table.fixed_budget_share) == ("dvts", 1.0)


def test_routing_more_accurate_than_every_fixed_option_is_served_under_max() -> None:
    """Routing (the pilot alone) is right on 12 of 20 problems for 60 FLOPs, best_of_n@8 on 11 for
    40: with `max`, the more accurate routing is served even though it costs more; with
    `one_se`, best-of-N, cheaper and within one paired SE."""
    records = []
    for i in range(20):
        records.append({"id": f"p{i}", "option": PILOT, "correct": i < 12, "flops": 60,
                        "mean_score": 0.2, "agreement": 0.25, "pass_at_1": 0.0})  # fmt: skip
        records.append({"id": f"p{i}", "option": "fixed:best_of_n@8", "correct": i < 11,
                        "flops": 40})  # fmt: skip
    table, report = fit(records, pilot=4, client_budget=8, rule="max")
    assert report["served"]["best"] == report["served"]["choice"] == "auto"
    assert table.fixed_strategy is None
    table, report = fit(records, pilot=4, client_budget=8)
    assert report["served"]["choice"] == "best_of_n@8" and table.fixed_strategy == "best_of_n"


def test_adaptive_options_replay_the_recorded_best_of_n_samples_in_order() -> None:
    """Problem a: the pilot says 7 7 3 4 (one ahead), the best-of-N samples 9 7 9 9: with rounds
    of 2 and a margin of 2 the replay stops after 9 7 (7 leads 3 to 1) and serves 7, right, for
    the pilot's FLOPs and half the best-of-N call's; all four samples serve 9 (scored higher).
    Problem b: no two pilot answers agree, so giving up after 4 draws nothing."""
    from tts_server.tools.options import adaptive_option, adaptive_route

    def record(problem: str, option: str, answers: list[str], score: float) -> dict[str, Any]:
        return {"id": problem, "option": option, "expected": "7" if problem == "a" else "5",
                "correct": False, "flops": 40 if option == PILOT else 80, "answers": answers,
                "scores": [score] * len(answers), "selection": "weighted", "mean_score": 0.5,
                "agreement": 0.5, "pass_at_1": 0.0}  # fmt: skip

    records = [
        record("a", PILOT, ["7", "7", "3", "4"], 0.5),
        record("a", "best_of_n@4", ["9", "7", "9", "9"], 0.9),
        record("b", PILOT, ["1", "2", "3", "4"], 0.5),
        record("b", "best_of_n@4", ["7", "7", "7", "7"], 0.9),
    ]
    _, report = fit(records, pilot=4, adaptive=True)
    options = report["options"]
    # b, margin only: 7 7 (one ahead of each), 7 7: stops with all four drawn.
    settles = adaptive_option(4, 2, 2, None)
    assert options[settles] == {"accuracy": 0.5, "mean_flops": ((40 + 40) + (40 + 80)) / 2}
    gives_up = adaptive_option(4, 2, 2, 4)
    assert options[gives_up] == {"accuracy": 0.5, "mean_flops": ((40 + 40) + 40) / 2}
    # The plain route spends everything and serves 9 on a.
    assert options["best_of_n@4"] == {"accuracy": 0.0, "mean_flops": 120}
    assert fit(records, pilot=4)[1]["options"].keys() == {"pilot", "best_of_n@4"}
    # The table carries the rule the option names.
    table, report = fit(records, pilot=4, adaptive=True, client_budget=8)
    assert all(report["routes"][b].startswith("adaptive@4:") for b in report["routes"])
    route = table.routes["hard"]
    assert route.strategy == "adaptive" and route.budget_share == 1.0
    assert report["routes"]["hard"] == adaptive_option(
        4, route.round_size, route.stop_margin, route.give_up_after, route.beta_threshold
    )
    # The Beta rule, problem a: the pilot's 7 7 3 4 gives P(7 beats the second) = 11/16; after
    # 9 7 it is 3 against 1, P = 13/16 >= 0.8: stop and serve 7 (right) for half the call; at
    # 0.9 it draws all four (3 against 3) and serves 9. Problem b draws all four either way
    # (1 1 1 1, then 7 7 leads 2 to 1: 11/16) and is wrong either way.
    assert options[adaptive_option(4, 2, None, None, 0.8)] == {
        "accuracy": 0.5,
        "mean_flops": (80 + 120) / 2,
    }
    assert options[adaptive_option(4, 2, None, None, 0.9)] == {"accuracy": 0.0, "mean_flops": 120}
    _, beta_route = adaptive_route(adaptive_option(4, 2, None, None, 0.95))
    assert (beta_route.stop_margin, beta_route.beta_threshold) == (None, 0.95)


def test_early_stopping_strategies_are_fixed_options_auto_can_serve() -> None:
    """`adaptive` and `deepconf` named by a client are measured live, as references and as
    routes: 20 problems where fixed adaptive@8 is as right as best-of-N@8 for 30 FLOPs, not 80,
    is what `auto` serves, and its table loads again."""
    records = []
    for i in range(20):
        records.append({"id": f"p{i}", "option": PILOT, "correct": False, "flops": 10,
                        "mean_score": 0.2, "agreement": 0.25, "pass_at_1": 0.0})  # fmt: skip
        records.append({"id": f"p{i}", "option": "deepconf@4", "correct": i < 2, "flops": 20})
        records.append({"id": f"p{i}", "option": "fixed:adaptive@8", "correct": i < 12,
                        "flops": 30})  # fmt: skip
        records.append({"id": f"p{i}", "option": "fixed:deepconf@8", "correct": i < 11,
                        "flops": 50})  # fmt: skip
        records.append({"id": f"p{i}", "option": "fixed:best_of_n@8", "correct": i < 12,
                        "flops": 80})  # fmt: skip
    table, report = fit(records, pilot=4, client_budget=8, adaptive=True)
    assert report["served"]["choice"] == "adaptive@8"
    assert (table.fixed_strategy, table.fixed_budget_share) == ("adaptive", 1.0)
    assert parse_table(table.to_json()) == table


def test_auto_falls_back_only_when_it_loses_by_more_than_the_paired_standard_error() -> None:
    """20 problems: the pilot alone (10 FLOPs) is right on 5, DVTS@8 (80 FLOPs) on 6, three of
    them others than the pilot's two extra: 1 point of 20 down, well inside one paired standard
    error, at an eighth of the FLOPs. `one_se` keeps routing; `max` falls back to DVTS."""
    records = []
    for i in range(20):
        pilot = {"id": f"p{i}", "option": PILOT, "correct": i in (0, 1, 2, 10, 11), "flops": 10}
        records.append({**pilot, "mean_score": 0.5, "agreement": 0.5, "pass_at_1": 0.0})
        records.append({"id": f"p{i}", "option": "fixed:dvts@8", "correct": i < 6, "flops": 80})
    table, report = fit(records, pilot=4)
    against = report["auto_vs_best_fixed"]
    assert against["accuracy_difference"] == pytest.approx(-0.05)
    # Differences: three -1, two +1, fifteen 0; sample sd sqrt(4.95 / 19) = 0.5104, / sqrt(20).
    assert against["paired_se"] == pytest.approx(0.11413, abs=1e-5)
    assert against["flops_ratio"] == pytest.approx(10 / 80)
    assert against["auto_loses"] is False and table.fixed_strategy is None
    table, report = fit(records, pilot=4, rule="max")
    assert report["auto_vs_best_fixed"]["auto_loses"] is True and table.fixed_strategy == "dvts"


def test_adaptive_replay_needs_recorded_candidates() -> None:
    """Records written before candidates were kept cannot replay adaptive sampling: a clear
    error (calibrate prints it), not a KeyError; without adaptive they still fit."""
    records = hard_problems(3, (10, 0.2, 0.25), {"best_of_n@4": (False, 10)})
    with pytest.raises(ValueError, match="adaptive sampling cannot be replayed"):
        fit(records, pilot=4, adaptive=True)
    assert fit(records, pilot=4)[1]["problems"] == 3
