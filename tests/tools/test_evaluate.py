from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack
from tts_server.tools.datasets import load_dataset
from tts_server.tools.evaluate import run_eval

SINGLEOP = load_dataset("mawps_singleop")


def fake_gateway(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": "m"}]})
    question = json.loads(request.content)["messages"][0]["content"]
    index = next(i for i, e in enumerate(SINGLEOP) if e.question == question)
    if index == 2:
        return httpx.Response(502, json={"error": {"message": "down"}})
    expected = SINGLEOP[index].answer
    # Problem 0 right; problem 1 wrong but one candidate right; problem 3 wrong everywhere.
    answer = expected if index == 0 else "-1"
    candidates = [answer, expected if index == 1 else "-2"]
    body = {
        "choices": [{"message": {"role": "assistant", "content": f"The answer is {answer}."}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20},
        "tts": {"answer": answer, "candidates_answers": candidates, "strategy": "best_of_n"},
    }
    return httpx.Response(200, json=body)


async def test_report_counts_accuracy_pass_at_n_and_errors() -> None:
    report = await run_eval(
        "http://gw",
        "mawps_singleop",
        strategy="best_of_n",
        budget=2,
        limit=4,
        progress=False,
        transport=httpx.MockTransport(fake_gateway),
    )
    assert report["n"] == 4
    assert report["errors"] == 1
    assert report["accuracy"] == pytest.approx(1 / 4)
    assert report["pass_at_n"] == pytest.approx(2 / 3)
    assert report["mean_completion_tokens"] == 20
    assert [r.get("correct") for r in report["records"]] == [True, False, None, False]


async def test_a_selection_rule_goes_in_the_tts_object() -> None:
    sent: list[dict[str, object]] = []

    def recording(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/models":
            sent.append(json.loads(request.content)["tts"])
        return fake_gateway(request)

    report = await run_eval(
        "http://gw",
        "mawps_singleop",
        strategy="majority",
        budget=4,
        limit=1,
        selection="filtered",
        progress=False,
        transport=httpx.MockTransport(recording),
    )
    assert sent == [{"strategy": "majority", "budget": 4, "selection": "filtered"}]
    assert report["selection"] == "filtered"


@pytest.mark.integration
def test_eval_command_against_the_real_stack(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    argv = [sys.executable, "-m", "tts_server.cli", "eval", "--url", stack.gateway_url]
    argv += [
        "--dataset",
        "mawps_singleop",
        "--strategy",
        "greedy",
        "--limit",
        "2",
        "--out",
        str(out),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout
    report = json.loads(out.read_text())
    assert report["n"] == 2 and report["errors"] == 0
    assert all(r["completion_tokens"] > 0 for r in report["records"])


def test_unknown_dataset_is_a_clear_error() -> None:
    argv = [sys.executable, "-m", "tts_server.cli", "eval", "--dataset", "nope"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no dataset 'nope'" in result.stderr
