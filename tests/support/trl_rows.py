"""The dataset rows TRL's trainers read, checked field by field against TRL's documented formats
("Dataset formats and types": language modeling, prompt-completion, preference and stepwise
supervision, each standard or conversational), without installing TRL."""

from __future__ import annotations

from typing import Any


def _messages(value: Any, *, roles: tuple[str, ...] = ("system", "user", "assistant")) -> None:
    assert isinstance(value, list) and value, value
    for message in value:
        assert set(message) == {"role", "content"}, message
        assert message["role"] in roles and isinstance(message["content"], str), message


def check_sft(row: dict[str, Any]) -> None:
    """Conversational language modeling ({"messages"}) or standard prompt-completion."""
    if "messages" in row:
        assert set(row) == {"messages"}, row
        _messages(row["messages"])
        assert row["messages"][-1]["role"] == "assistant"
        assert row["messages"][-1]["content"].strip()
    else:
        assert set(row) == {"prompt", "completion"}, row
        assert isinstance(row["prompt"], str) and isinstance(row["completion"], str)


def check_preference(row: dict[str, Any]) -> None:
    """Preference with an explicit prompt, conversational or standard."""
    assert set(row) == {"prompt", "chosen", "rejected"}, row
    if isinstance(row["prompt"], list):
        _messages(row["prompt"])
        for side in ("chosen", "rejected"):
            _messages(row[side], roles=("assistant",))
            assert len(row[side]) == 1
    else:
        assert all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected")), row
    assert row["chosen"] != row["rejected"]


def check_stepwise(row: dict[str, Any]) -> None:
    """Stepwise supervision (standard only in TRL): a label per step, booleans."""
    assert set(row) == {"prompt", "completions", "labels"}, row
    assert isinstance(row["prompt"], str)
    assert isinstance(row["completions"], list) and row["completions"]
    assert all(isinstance(step, str) for step in row["completions"])
    assert isinstance(row["labels"], list) and len(row["labels"]) == len(row["completions"])
    assert all(isinstance(label, bool) for label in row["labels"])
