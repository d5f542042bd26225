"""The benchmark's pure parts: vLLM's counters, percentiles, answers, the cell store, the
summary's ratios and targets, the generated doc."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tts_server.bench.cells import CellStore
from tts_server.bench.engine_metrics import delta, parse_counters
from tts_server.bench.load import (
    Call,
    closed_loop,
    percentile,
    read_gateway,
    read_vote,
    summarize,
)
from tts_server.bench.report import BEGIN, END, render, write_doc
from tts_server.bench.summary import prefix_cache, summarize_run

METRICS = """# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 100.0
vllm:prompt_tokens_total{engine="1",model_name="m"} 20.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 7.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 64.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
"""


def test_counters_are_summed_over_label_sets_and_gauges_ignored() -> None:
    counters = parse_counters(METRICS)
    assert counters == {"prompt_tokens": 120.0, "generation_tokens": 7.0, "cache_hits": 64.0}
    after = {**counters, "prompt_tokens": 150.0}
    assert delta(counters, after) == {
        "prompt_tokens": 30.0,
        "generation_tokens": 0.0,
        "cache_hits": 0.0,
    }
    assert delta({}, after) == {}


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([4.0, 1.0, 2.0, 3.0], 0.5) == 2.5
    assert percentile([float(i) for i in range(101)], 0.99) == pytest.approx(99.0)


def test_answers_of_each_kind_of_response() -> None:
    gateway = {"choices": [{"message": {"content": "x"}}], "tts": {"answer": "7", "iterations": 3}}
    assert read_gateway(gateway)[0] == "7"
    assert read_gateway(gateway)[1]["iterations"] == 3
    choices = [{"message": {"content": f"The answer is {a}."}} for a in ("4", "5", "5", "x")]
    assert read_vote({"choices": choices})[0] == "5"  # the most common; no answer is no vote
    assert read_vote({"choices": []})[0] is None


def test_summarize_counts_errors_and_rates() -> None:
    records = [
        {"id": "a", "latency_s": 1.0, "correct": True},
        {"id": "b", "latency_s": 3.0, "correct": False},
        {"id": "c", "error": "HTTP 500: boom"},
    ]
    s = summarize(records, wall_s=4.0)
    assert (s["answers"], s["errors"], s["first_error"]) == (2, 1, "HTTP 500: boom")
    assert s["answers_per_s"] == 0.5 and s["accuracy"] == 0.5 and s["p50_s"] == 2.0


def test_cells_resume_and_start_afresh_when_the_settings_change(tmp_path: Path) -> None:
    store = CellStore(tmp_path, {"problems": ["a"]})
    store.put("overhead/c1/direct-greedy", {"p50_s": 1.0})
    (store.dir / "half.json").write_text('{"cell": "x", "p5')  # a kill mid-write elsewhere
    again = CellStore(tmp_path, {"problems": ["a"]})
    assert again.resumed == 2
    assert again.get("overhead/c1/direct-greedy") == {
        "cell": "overhead/c1/direct-greedy",
        "p50_s": 1.0,
    }
    assert list(again.all()) == ["overhead/c1/direct-greedy"]
    other = CellStore(tmp_path, {"problems": ["b"]})
    assert other.resumed == 0 and other.get("overhead/c1/direct-greedy") is None
    assert (tmp_path / "cells.previous").is_dir()  # moved aside, not deleted
    assert json.loads((tmp_path / "run.json").read_text()) == {"problems": ["b"]}
    fresh = CellStore(tmp_path, {"problems": ["b"]}, fresh=True)
    assert fresh.resumed == 0


def _cell(p50: float, p99: float, **extra: object) -> dict[str, object]:
    return {"p50_s": p50, "p99_s": p99, "answers": 10, **extra}


def test_summary_ratios_and_targets() -> None:
    engine_direct = {"generation_tokens": 1000.0, "prompt_tokens": 500.0}
    cells = {
        "overhead/c1/direct-greedy": _cell(1.0, 2.0),
        "overhead/c1/gateway-greedy": _cell(1.02, 2.4),
        "overhead/c1/direct-n8": _cell(2.0, 3.0),
        "overhead/c1/gateway-majority8": _cell(2.2, 3.0),
        "saturation/direct-n8": _cell(
            1, 1, engine_generation_tokens_per_s=200.0, engine=engine_direct
        ),
        "saturation/gateway-beam_search8": _cell(1, 1, engine_generation_tokens_per_s=150.0),
        "cost/best_of_n": {"strategy": "best_of_n", "answers_per_s": 120.0},
        "peer/optillm-bon8": {"skipped": "optillm unavailable: pip said no"},
    }
    settings = {"budget": 8, "concurrencies": [1]}
    summary = summarize_run(cells, settings)
    greedy, majority = summary["overhead"]
    assert greedy["p50_ratio"] == pytest.approx(1.02) and greedy["p99_ratio"] == pytest.approx(1.2)
    assert majority["p50_ratio"] == pytest.approx(1.1)
    saturation = {r["cell"]: r for r in summary["saturation"]}
    assert saturation["gateway-beam_search8"]["ratio_to_direct"] == pytest.approx(0.75)
    assert saturation["direct-n8"]["engine_tokens_per_answer"] == pytest.approx(150.0)
    met = {t["target"]: t["met"] for t in summary["targets"]}
    assert met["gateway/vLLM p50 greedy c1"] is True
    assert met["gateway/vLLM p99 greedy c1"] is False
    assert met["gateway/vLLM p50 majority@8 c1"] is False
    assert met["engine saturation beam_search8 c16"] is False
    assert met["gateway answers/s, best_of_n@8, one worker on one CPU"] is True
    assert summary["skipped"] == {"peer/optillm-bon8": "optillm unavailable: pip said no"}


def test_prefix_share_after_the_first_step_takes_best_of_n_off_both_sides() -> None:
    # Per answer: best-of-N queried 800 prompt tokens, 640 hits (its one step); beam search
    # queried 3000 with 2400 hits, so after its first step 2200 queried, 1760 hits: 80%.
    cells = {
        "saturation/gateway-best_of_n8": {
            "answers": 2,
            "engine": {"cache_queries": 1600.0, "cache_hits": 1280.0},
        },
        "saturation/gateway-beam_search8": {
            "answers": 4,
            "engine": {"cache_queries": 12000.0, "cache_hits": 9600.0},
        },
    }
    [row] = prefix_cache(cells, 8)
    assert row["share_all_steps"] == pytest.approx(0.8)
    assert row["share_after_first_step"] == pytest.approx(1760 / 2200)


def test_the_doc_keeps_what_was_written_around_the_generated_part(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    write_doc(doc, f"{BEGIN}\nfirst\n{END}")
    text = doc.read_text()
    assert text.startswith("# Performance") and "first" in text
    doc.write_text(text + "\n## Changes\n\nbeam search: 0.67 -> 0.9\n")
    write_doc(doc, f"{BEGIN}\nsecond\n{END}")
    text = doc.read_text()
    assert "second" in text and "first" not in text and "beam search: 0.67 -> 0.9" in text


def _meta() -> dict[str, object]:
    return {
        "finished": "now",
        "profile": "short",
        "command": "tts-server bench --problems 2",
        "machine": {
            "nproc": 2,
            "cpu_model": "CPU X",
            "memory_gib": 24,
            "os": "Linux",
            "python": "3.11",
            "vllm": "0.32.0",
            "tts_server": "0.1.0",
            "commit": "abc",
            "load_average": [1, 1, 1],
        },
        "note": "shared machine",
        "problems": 2,
        "dataset": "mawps_singleop",
        "budget": 8,
        "beam_width": 4,
        "temperature": 0.4,
        "max_tokens": 64,
        "out": "reports/bench",
    }


def test_render_names_the_machine_the_command_and_every_target() -> None:
    summary = summarize_run(
        {"overhead/c8/direct-greedy": _cell(1, 1), "overhead/c8/gateway-greedy": _cell(2, 2)},
        {"budget": 8, "concurrencies": [8]},
    )
    text = render(summary, _meta())
    assert "CPU X" in text and "tts-server bench --problems 2" in text and "0.32.0" in text
    assert "| gateway/vLLM p50 greedy c8 | ≤ 1.05 | 2.00 | **missed** |" in text


async def test_a_closed_loop_checks_answers_unless_told_not_to() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [], "tts": {"answer": "8"}})

    call = Call("p0", "8", "/v1/chat/completions", {})
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        scored, _ = await closed_loop(
            client, "http://gw", [call] * 3, read_gateway, concurrency=2, time_limit_s=10
        )
        unscored, _ = await closed_loop(
            client,
            "http://gw",
            [call] * 3,
            read_gateway,
            concurrency=2,
            time_limit_s=10,
            score=False,
        )
    assert [(r["answer"], r["correct"]) for r in scored] == [("8", True)] * 3
    assert [r["answer"] for r in unscored] == ["8"] * 3
    assert all("correct" not in r for r in unscored)


def test_free_ports_come_from_the_allowed_range(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from tts_server.bench.stack import StackError, free_port

    monkeypatch.setenv("TTS_BENCH_PORTS", "9290-9293")
    ports = {free_port() for _ in range(20)}
    assert ports and ports <= {9290, 9291, 9292, 9293}
    held = []
    try:
        for port in range(9290, 9294):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        with pytest.raises(StackError, match="no free port"):
            free_port()
    finally:
        for sock in held:
            sock.close()
    monkeypatch.delenv("TTS_BENCH_PORTS")
    assert free_port() > 0


def test_the_steady_rate_runs_from_the_first_start_to_the_last() -> None:
    from tts_server.bench.scenarios import steady_rate

    samples = [
        (0.0, {"generation_tokens": 0.0}),
        (10.0, {"generation_tokens": 100.0}),
        (20.0, {"generation_tokens": 300.0}),
    ]
    records = [{"started_at": t} for t in (2.0, 2.0, 7.0, 12.0)]
    rate = steady_rate(samples, records, concurrency=2)
    assert rate is not None
    # 20 tokens at t=2 (interpolated), 140 at t=12: 120 tokens in 10 s.
    assert rate["window_s"] == pytest.approx(10.0)
    assert rate["generation_tokens"] == pytest.approx(120.0)
    assert rate["generation_tokens_per_s"] == pytest.approx(12.0)
    assert steady_rate(samples, records[:2], concurrency=2) is None  # no more calls than loops
    assert steady_rate(samples[:1], records, concurrency=2) is None


def test_saturation_ratios_are_the_steady_ones_where_both_cells_have_them() -> None:
    def cell(whole: float, steady: float | None) -> dict[str, object]:
        extra = {} if steady is None else {"steady": {"generation_tokens_per_s": steady}}
        return _cell(1, 1, engine_generation_tokens_per_s=whole, **extra)

    settings = {"budget": 8, "concurrencies": []}
    cells = {
        "saturation/direct-n8": cell(100.0, 200.0),
        "saturation/gateway-beam_search8": cell(50.0, 180.0),
        "saturation/gateway-dvts8": cell(80.0, None),
    }
    rows = {r["cell"]: r for r in summarize_run(cells, settings)["saturation"]}
    beam, dvts = rows["gateway-beam_search8"], rows["gateway-dvts8"]
    assert beam["steady"] is True and beam["ratio_to_direct"] == pytest.approx(0.9)
    assert beam["whole_cell_ratio"] == pytest.approx(0.5)
    assert dvts["steady"] is False and dvts["ratio_to_direct"] == pytest.approx(0.8)
    text = render(summarize_run(cells, settings), _meta())
    assert "every client loop was busy" in text and "50.0, 0.50" in text


def test_saturation_cells_send_every_problem_once_per_round_and_read_the_steady_rate() -> None:
    from tts_server.bench.scenarios import Plan, overhead_cells, saturation_cells
    from tts_server.prompting import load_profile
    from tts_server.tools.datasets import load_dataset

    problems = tuple(load_dataset("mawps_singleop")[:3])
    plan = Plan(problems, "m", load_profile("chat-default"), 0.4, 64, saturation_rounds=2)
    for cell in saturation_cells(plan):
        assert cell.steady
        assert [c.id for c in cell.calls] == [p.id for p in problems] * 2
    assert not any(cell.steady for cell in overhead_cells(plan))
    assert plan.settings()["saturation_rounds"] == 2
