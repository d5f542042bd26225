"""`tts-server bench`, a small real run against the session's vLLM, PRM worker and gateway:
every cell measured, vLLM's own counters agree with the usage the responses report, the doc
and the plots written."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.conftest import Stack
from tts_server.bench.cli import main_bench
from tts_server.bench.options import add_bench_arguments

pytestmark = pytest.mark.integration


def test_a_small_real_run(stack: Stack, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    out, doc = tmp_path / "bench", tmp_path / "performance.md"
    args = parser.parse_args(
        [
            "--policy-url",
            stack.policy_url,
            "--prm-url",
            stack.prm_url,
            "--gateway-url",
            stack.gateway_url,
            "--scenarios",
            "overhead,saturation,prm",
            "--problems",
            "2",
            "--concurrencies",
            "2",
            "--saturation-concurrency",
            "2",
            "--saturation-rounds",
            "2",
            "--max-tokens",
            "32",
            "--out",
            str(out),
            "--doc",
            str(doc),
        ]
    )
    assert main_bench(args) == 0

    cells = {p.stem.replace("__", "/"): json.loads(p.read_text()) for p in out.glob("cells/*")}
    assert cells.pop("meta/machine")["vllm"]  # the version the cells were measured with
    assert len(cells) == 5 + 4 + 3
    for name, cell in cells.items():
        if name.startswith("prm/"):
            assert cell["steps_per_s"] > 0
            continue
        # A saturation cell sends each problem once per round.
        answers = 4 if name.startswith("saturation/") else 2
        assert cell["answers"] == answers and cell["errors"] == 0, (name, cell["first_error"])
        # Nothing else used this vLLM meanwhile: its counters moved by what the responses
        # say they cost (the gateway counts every sample of every step).
        completion = sum(r["usage"]["completion_tokens"] for r in cell["records"])
        assert cell["engine"]["generation_tokens"] == completion, name
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert {r["pair"].split(" /")[0] for r in summary["overhead"]} == {
        "greedy",
        "majority@8",
        "best_of_n@8",
    }
    assert all(r["p50_ratio"] > 0 for r in summary["overhead"])
    saturation = {r["cell"]: r["ratio_to_direct"] for r in summary["saturation"]}
    assert saturation["direct-n8"] == 1.0 and saturation["gateway-beam_search8"] > 0
    for row in summary["prefix_cache"]:
        assert 0 <= row["share_all_steps"] <= 1
    assert summary["prm_path"]["per_search_step"]["beam_search"]["steps"] > 0
    text = doc.read_text()
    assert "### Engine saturation" in text and "vLLM" in text
    assert (out / "overhead.png").stat().st_size > 0
