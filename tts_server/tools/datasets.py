"""Benchmarks shipped in tts_server/tools/data/, or any JSON-lines file in their formats."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tts_server.answers import answers_equal

DATA_DIR = Path(__file__).parent / "data"
PACKAGED = {
    "mawps_singleop": "mawps_singleop.jsonl",
    "mawps_addsub": "mawps_addsub.jsonl",
    "mawps_multiarith": "mawps_multiarith.jsonl",
    "gsm8k": "gsm8k_test.jsonl",
    "math500": "math500.jsonl",
}


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    answer: str


class DatasetError(ValueError):
    pass


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text[:-2] if text.endswith(".0") and text[:-2].lstrip("-").isdigit() else text


def _example(row: dict[str, object], index: int, stem: str) -> Example:
    ident = str(row.get("unique_id") or row.get("id") or f"{stem}-{index}")
    if "input" in row and "target" in row:
        return Example(ident, str(row["input"]), _number(row["target"]))
    if "problem" in row and "answer" in row:
        return Example(ident, str(row["problem"]), str(row["answer"]))
    if "question" in row and "answer" in row:
        answer = str(row["answer"])
        final = answer.split("####")[-1].strip().replace(",", "") if "####" in answer else answer
        return Example(ident, str(row["question"]), final)
    raise DatasetError(
        f"row {index} of {stem}: expected input/target, problem/answer or question/answer"
    )


def resolve(name_or_path: str) -> Path:
    if name_or_path in PACKAGED:
        return DATA_DIR / PACKAGED[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        known = ", ".join(PACKAGED)
        raise DatasetError(f"no dataset {name_or_path!r}: give one of {known}, or a .jsonl path")
    return path


def load_dataset(name_or_path: str) -> list[Example]:
    path = resolve(name_or_path)
    examples = []
    with path.open() as lines:
        for index, line in enumerate(lines):
            if line.strip():
                examples.append(_example(json.loads(line), index, path.stem))
    return examples


def is_correct(answer: str | None, expected: str) -> bool:
    """Whether an extracted answer (None: none found) is the example's expected one."""
    return answer is not None and answers_equal(answer, expected)
