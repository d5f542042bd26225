"""`tts-server bench` as a command: a rerun whose cells are all saved starts no server (the
URLs below serve nothing) and writes the summary, the plots and the doc from the saved cells."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tts_server.bench import cli
from tts_server.bench.cells import CellStore
from tts_server.bench.options import PROFILES, add_bench_arguments
from tts_server.bench.scenarios import saturation_cells
from tts_server.settings import Settings


def _cell(rate: float, hits: float) -> dict[str, object]:
    return {
        "answers": 2,
        "errors": 0,
        "answers_per_s": 0.5,
        "p50_s": 1.0,
        "p99_s": 2.0,
        "accuracy": 0.5,
        "engine_generation_tokens_per_s": rate,
        "records": [],
        "engine": {
            "generation_tokens": rate * 10,
            "prompt_tokens": 1000.0,
            "cache_queries": 1000.0,
            "cache_hits": hits,
        },
    }


def test_a_finished_run_is_reported_again_without_servers(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    nowhere = "http://127.0.0.1:9"  # discard port: nothing answers there
    args = parser.parse_args(
        [
            "--scenarios",
            "saturation",
            "--problems",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--doc",
            str(tmp_path / "performance.md"),
            "--policy-url",
            nowhere,
            "--gateway-url",
            nowhere,
            "--note",
            "a note for the reader",
        ]
    )
    settings = Settings()
    plan = cli._plan(args, settings, settings.policy_model)
    fingerprint = {**plan.settings(), "dataset": args.dataset, **PROFILES[args.profile]}
    store = CellStore(args.out, fingerprint)
    rates = {
        "direct-n8": 200.0,
        "gateway-best_of_n8": 190.0,
        "gateway-beam_search8": 120.0,
        "gateway-dvts8": 150.0,
    }
    for spec in saturation_cells(plan):
        name = spec.id.split("/")[1]
        store.put(spec.id, _cell(rates[name], 800.0 if "search" in name else 500.0))

    assert cli.main_bench(args) == 0

    summary = json.loads((args.out / "summary.json").read_text())["summary"]
    ratio = {r["cell"]: r["ratio_to_direct"] for r in summary["saturation"]}
    assert ratio["gateway-beam_search8"] == 0.6
    doc = (tmp_path / "performance.md").read_text()
    assert "a note for the reader" in doc and "| engine saturation beam_search8 c16 |" in doc
    assert (args.out / "saturation.png").stat().st_size > 0


def test_the_run_leaves_the_signal_handlers_as_it_found_them(tmp_path: Path) -> None:
    import signal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--scenarios", "nonsense", "--out", str(tmp_path)])
    assert cli.main_bench(args) == 2  # an unknown scenario, named
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_report_only_writes_what_was_measured_and_names_the_rest(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    argv = [
        "--scenarios",
        "saturation",
        "--problems",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--doc",
        str(tmp_path / "performance.md"),
        "--report-only",
    ]
    args = parser.parse_args(argv)
    assert cli.main_bench(args) == 2  # nothing measured with these settings: says so
    settings = Settings()
    plan = cli._plan(args, settings, settings.policy_model)
    fingerprint = {**plan.settings(), "dataset": args.dataset, **PROFILES[args.profile]}
    store = CellStore(args.out, fingerprint)
    store.put("saturation/direct-n8", _cell(200.0, 500.0))
    assert cli.main_bench(args) == 0
    doc = (tmp_path / "performance.md").read_text()
    assert "`saturation/gateway-dvts8`: not measured: the run stopped before it" in doc
    assert store.get("saturation/direct-n8") is not None  # nothing moved aside
