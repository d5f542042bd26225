"""`tts-server export` on trace records: the filters, which candidate a pair rejects, the step
labels, and the errors a user can act on (traces without prompts above all)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.support.trl_rows import check_preference, check_sft, check_stepwise
from tts_server.cli import main
from tts_server.tools.export import export

QUESTION = "Ann has 2 pens and gets 2 more. How many?"


def _candidate(index: int, answer: str | None, scores: list[float]) -> dict[str, Any]:
    steps = ["Ann adds.\n\n", f"2 + 2 = {answer}\n\n", f"The answer is {answer}."]
    return {
        "index": index,
        "text": "".join(steps),
        "steps": steps,
        "step_scores": scores,
        "answer": answer,
        "score": scores[-1] if scores else None,
        "finished": True,
        "finish_reason": "stop",
        "confidence": None,
    }


def _record(*, prompts: bool = True, agreement: float = 0.75) -> dict[str, Any]:
    record: dict[str, Any] = {
        "version": 1,
        "id": "chatcmpl-1",
        "prompt_included": prompts,
        "candidates": [
            _candidate(0, "4", [0.9, 0.9, 0.8]),
            _candidate(1, "5", [0.9, 0.3, 0.4]),
            _candidate(2, "5", [0.9, 0.2, 0.1]),
            _candidate(3, "4", [0.9, 0.9, 0.9]),
        ],
        "selected": 3,
        "answer": "4",
        "votes": {"4": 1.7, "5": 0.5},
        "agreement": agreement,
    }
    if prompts:
        record["messages"] = [{"role": "user", "content": QUESTION}]
        record["question"] = QUESTION
    return record


def test_a_pair_rejects_the_lowest_scored_wrong_answer_and_steps_are_thresholded() -> None:
    result = export([_record()], step_threshold=0.5)
    assert result.kept == 1
    (sft,) = result.rows["sft"]
    check_sft(sft)
    assert sft["messages"][-1] == {
        "role": "assistant",
        "content": "Ann adds.\n\n2 + 2 = 4\n\nThe answer is 4.",
    }
    (pair,) = result.rows["preference"]
    check_preference(pair)
    assert pair["rejected"][0]["content"].endswith("is 5.")
    assert "2 + 2 = 5" in pair["rejected"][0]["content"]
    rows = result.rows["steps"]
    assert len(rows) == 4
    for row in rows:
        check_stepwise(row)
    assert [row["labels"] for row in rows] == [
        [True, True, True],
        [True, False, False],
        [True, False, False],
        [True, True, True],
    ]


def test_with_a_reference_the_last_label_is_the_final_answers_correctness() -> None:
    record = _record()
    record["candidates"][1]["step_scores"] = [0.9, 0.9, 0.9]  # the PRM missed this wrong one
    result = export([record], references={QUESTION: "4"})
    assert result.rows["steps"][1]["labels"] == [True, True, False]
    wrong = export([record], references={QUESTION: "5"})
    assert wrong.kept == 0 and wrong.skipped == {"wrong_answer": 1}
    unknown = export([record], references={"another question": "4"})
    assert unknown.skipped == {"unknown_question": 1}


def test_agreement_below_the_threshold_is_left_out() -> None:
    result = export([_record(agreement=0.5), _record(agreement=0.8)], min_agreement=0.75)
    assert result.kept == 1 and result.skipped == {"low_agreement": 1}


def _write(folder: Path, records: list[dict[str, Any]]) -> None:
    folder.mkdir()
    (folder / "traces-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_traces_without_prompts_are_refused_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "t", [_record(prompts=False)])
    assert main(["export", str(tmp_path / "t"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "written without prompts" in err and "TTS_TRACE_PROMPTS=true" in err
    assert not (tmp_path / "out").exists()


def test_the_command_writes_the_three_files_and_names_its_mistakes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "t", [_record(), _record(prompts=False)])
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "t"), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] == 1 and summary["skipped"] == {"no_prompt": 1}
    assert sorted(p.name for p in out.iterdir()) == [
        "preference.jsonl",
        "sft.jsonl",
        "step_rewards.jsonl",
    ]
    assert main(["export", str(tmp_path / "t"), "--formats", "sft,dpo"]) == 2
    assert "--formats" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert "no such trace file" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "t"), "--dataset", "nope"]) == 2
    assert "no dataset 'nope'" in capsys.readouterr().err
