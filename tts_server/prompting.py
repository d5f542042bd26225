"""Prompt profiles: how a question is put to a given policy model.

A profile is JSON (packaged under tts_server/prompts/, or a path): style "plain" renders worked
examples and the question as raw text (no chat template), style "chat" renders them as prior
chat turns through the model's own template (applied once, by vLLM's /tokenize).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from tts_server.errors import JobError

PROFILE_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class Example:
    question: str
    solution: str


@dataclass(frozen=True)
class PromptProfile:
    name: str
    style: Literal["plain", "chat"]
    system: str | None = None
    examples: tuple[Example, ...] = ()
    question_template: str = "Question: {question}\nAnswer:"
    example_separator: str = "\n\n\n"
    solution_stops: tuple[str, ...] = ()
    # The sampling temperature when the client sets none (None: the server's default): a
    # small model's best temperature is lower than a large one's.
    temperature: float | None = None
    notes: str = ""

    def plain_text(self, question: str) -> str:
        shots = [
            self.question_template.format(question=e.question) + " " + e.solution
            for e in self.examples
        ]
        shots.append(self.question_template.format(question=question))
        text = self.example_separator.join(shots)
        return f"{self.system}\n\n{text}" if self.system else text

    def chat_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        has_system = any(m["role"] in ("system", "developer") for m in messages)
        if self.system and not has_system:
            out.append({"role": "system", "content": self.system})
        # The client's own system prompt stays first.
        leading = [m for m in messages[:1] if m["role"] in ("system", "developer")]
        out.extend(leading)
        for e in self.examples:
            out.append({"role": "user", "content": e.question})
            out.append({"role": "assistant", "content": e.solution})
        out.extend(messages[len(leading) :])
        return out


@dataclass
class RenderedPrompt:
    question: str
    prompt_ids: list[int]
    solution_stops: list[str] = field(default_factory=list)
    temperature: float | None = None


class Tokenizer(Protocol):
    async def tokenize_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        affinity: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]: ...

    async def tokenize_text(self, text: str, *, affinity: str | None = None) -> list[int]: ...


class ProfileError(ValueError):
    pass


class ToolsNotRendered(JobError):
    """A request's tools, and a profile that renders no chat template."""


@lru_cache(maxsize=32)
def load_profile(name_or_path: str) -> PromptProfile:
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
        raise ProfileError(f"unknown prompt profile {name_or_path!r}; packaged: {known}")
    raw = json.loads(path.read_text())
    return PromptProfile(
        name=raw.get("name", path.stem),
        style=raw.get("style", "chat"),
        system=raw.get("system"),
        examples=tuple(Example(e["question"], e["solution"]) for e in raw.get("examples", [])),
        question_template=raw.get("question_template", "Question: {question}\nAnswer:"),
        example_separator=raw.get("example_separator", "\n\n\n"),
        solution_stops=tuple(raw.get("solution_stops", [])),
        temperature=_temperature(raw.get("temperature"), path.name),
        notes=raw.get("notes", ""),
    )


def _temperature(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 2:
        raise ProfileError(f"{where}: temperature must be a number from 0 to 2")
    return float(value)


def last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message["role"] == "user":
            return str(message["content"])
    return ""


async def render_chat(
    profile: PromptProfile,
    messages: list[dict[str, Any]],
    tokenizer: Tokenizer,
    *,
    affinity: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> RenderedPrompt:
    """`affinity`: the request's key, so the tokenizer call goes where its generations will.
    `tools`: OpenAI tool definitions for the chat template (a "plain" profile has no template
    to render them: ToolsNotRendered)."""
    question = last_user_text(messages)
    if profile.style == "plain":
        if tools:
            raise ToolsNotRendered(
                f"'tools' cannot be rendered: the prompt profile {profile.name!r} writes plain "
                "text, without the model's chat template"
            )
        ids = await tokenizer.tokenize_text(profile.plain_text(question), affinity=affinity)
    elif tools:
        chat = profile.chat_messages(messages)
        ids = await tokenizer.tokenize_chat(chat, affinity=affinity, tools=tools)
    else:
        ids = await tokenizer.tokenize_chat(profile.chat_messages(messages), affinity=affinity)
    return RenderedPrompt(question, ids, list(profile.solution_stops), profile.temperature)
