"""`tts-server export`: search traces (tts_server/traces.py) into training sets that TRL's
trainers read unchanged (its documented dataset formats):

- sft.jsonl: the selected solution as the assistant's turn, `{"messages": [...]}` for a chat
  request, `{"prompt", "completion"}` for a completions one (SFTTrainer);
- preference.jsonl: `{"prompt", "chosen", "rejected"}`: the selected solution against the
  lowest-scored candidate with another (or, with a reference, a wrong) answer; conversational
  for chat requests (prompt: the messages; chosen/rejected: one assistant message), plain text
  for completions (DPOTrainer, RewardTrainer);
- step_rewards.jsonl: TRL's stepwise supervision, `{"prompt", "completions", "labels"}`, one row
  per candidate whose steps all have PRM scores: a step's label is its score at or above the
  threshold; with a reference answer, the last step's label is whether the candidate's final
  answer is right (PRMTrainer).

Filters, applied to every output: the selected answer's share of the vote at least
`--min-agreement`; with `--dataset`, only questions the dataset knows (joined by the question's
text) whose reference the selected answer matches."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tts_server.tools.datasets import DatasetError, is_correct, load_dataset
from tts_server.traces import read_traces, trace_files

FORMATS = ("sft", "preference", "steps")
FILES = {"sft": "sft.jsonl", "preference": "preference.jsonl", "steps": "step_rewards.jsonl"}
NO_PROMPTS = (
    "the traces were written without prompts (TTS_TRACE_PROMPTS was off), and training data "
    "needs them: set TTS_TRACE_PROMPTS=true on the gateway and collect traces again"
)


class ExportError(ValueError):
    pass


def _key(question: str) -> str:
    return " ".join(question.split())


@dataclass
class Export:
    """Rows per format and why records were left out."""

    rows: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {name: [] for name in FORMATS}
    )
    read: int = 0
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def _messages(record: dict[str, Any]) -> list[dict[str, str]] | None:
    messages = record.get("messages")
    return [dict(m) for m in messages] if isinstance(messages, list) else None


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _rejected(
    record: dict[str, Any], chosen: dict[str, Any], reference: str | None
) -> dict[str, Any] | None:
    """The lowest-scored candidate whose answer is wrong: another than the selected one's, or,
    with a reference, not the reference (no answer counts as wrong)."""
    selected = chosen["answer"]

    def wrong(candidate: dict[str, Any]) -> bool:
        answer = candidate.get("answer")
        if reference is not None:
            return not is_correct(answer, reference)
        return answer is None or not is_correct(answer, selected)

    pool = [
        c
        for c in record["candidates"]
        if c["index"] != chosen["index"] and c.get("text", "").strip() and wrong(c)
    ]
    if not pool:
        return None
    rejected: dict[str, Any] = min(pool, key=lambda c: (c.get("score") or 0.0, c["index"]))
    return rejected


def _step_rows(
    record: dict[str, Any], reference: str | None, threshold: float
) -> list[dict[str, Any]]:
    rows = []
    for candidate in record["candidates"]:
        steps, scores = candidate.get("steps") or [], candidate.get("step_scores") or []
        if not steps or len(scores) != len(steps):
            continue  # unscored (majority, greedy) or cut short: no label for every step
        labels = [float(s) >= threshold for s in scores]
        if reference is not None:
            labels[-1] = is_correct(candidate.get("answer"), reference)
        rows.append({"prompt": record["question"], "completions": list(steps), "labels": labels})
    return rows


def export(
    records: list[dict[str, Any]],
    *,
    references: dict[str, str] | None = None,
    min_agreement: float = 0.0,
    step_threshold: float = 0.5,
) -> Export:
    """The training rows of `records`. `references`: reference answers by question (`_key`)."""
    out = Export()
    for record in records:
        out.read += 1
        if not record.get("prompt_included"):
            out.skipped["no_prompt"] += 1
            continue
        candidates = record.get("candidates") or []
        chosen = next((c for c in candidates if c["index"] == record.get("selected")), None)
        if chosen is None or not chosen.get("text", "").strip() or chosen.get("answer") is None:
            out.skipped["no_answer"] += 1
            continue
        if (record.get("agreement") or 0.0) < min_agreement:
            out.skipped["low_agreement"] += 1
            continue
        reference = None
        if references is not None:
            reference = references.get(_key(record["question"]))
            if reference is None:
                out.skipped["unknown_question"] += 1
                continue
            if not is_correct(chosen["answer"], reference):
                out.skipped["wrong_answer"] += 1
                continue
        out.kept += 1
        messages = _messages(record)
        text = chosen["text"]
        if messages is not None:
            out.rows["sft"].append({"messages": [*messages, *_assistant(text.strip())]})
        else:
            out.rows["sft"].append({"prompt": record["prompt"], "completion": text})
        rejected = _rejected(record, chosen, reference)
        if rejected is not None:
            if messages is not None:
                pair: dict[str, Any] = {
                    "prompt": messages,
                    "chosen": _assistant(text.strip()),
                    "rejected": _assistant(rejected["text"].strip()),
                }
            else:
                pair = {"prompt": record["prompt"], "chosen": text, "rejected": rejected["text"]}
            out.rows["preference"].append(pair)
        out.rows["steps"].extend(_step_rows(record, reference, step_threshold))
    return out


def load_references(dataset: str) -> dict[str, str]:
    return {_key(example.question): example.answer for example in load_dataset(dataset)}


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    """Read, filter and write; the summary printed as JSON. Raises ExportError."""
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"--formats: unknown {unknown or formats}; use some of {FORMATS}")
    missing = [str(p) for p in args.traces if not p.exists()]
    if missing:
        raise ExportError(f"no such trace file or folder: {', '.join(missing)}")
    if not trace_files(args.traces):
        raise ExportError("no trace files (*.jsonl) in the given folders")
    records = list(read_traces(args.traces))
    if not records:
        raise ExportError("the trace files hold no trace records")
    if not any(r.get("prompt_included") for r in records):
        raise ExportError(NO_PROMPTS)
    try:
        references = load_references(args.dataset) if args.dataset else None
    except DatasetError as exc:
        raise ExportError(str(exc)) from None
    result = export(
        records,
        references=references,
        min_agreement=args.min_agreement,
        step_threshold=args.step_threshold,
    )
    written = {}
    for name in formats:
        path = args.out / FILES[name]
        write_rows(result.rows[name], path)
        written[str(path)] = len(result.rows[name])
    return {
        "records": result.read,
        "kept": result.kept,
        "skipped": dict(result.skipped),
        "rows": written,
    }


def main_export(args: argparse.Namespace) -> int:
    try:
        summary = run_export(args)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if summary["skipped"].get("no_prompt"):
        print(
            f"note: {summary['skipped']['no_prompt']} records left out: {NO_PROMPTS}",
            file=sys.stderr,
        )
    return 0
