"""The PRM registry (`prm_worker/registry.toml`): families and the checkpoints of each, checked on
load so that a typo fails at start with the file, the entry and the key in the message."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from tts_server.prm_worker.backends.base import BackendError
from tts_server.prm_worker.backends.formats import (
    LAYOUTS,
    MODEL_BACKENDS,
    SCORE_KINDS,
    TAG_IN_TEXT,
    Family,
    ScoreReading,
    StepFormat,
)


class RegistryError(BackendError):
    """The registry file is malformed, or names something that does not exist."""


# Per layout: the format keys it needs, and those it may also set.
_LAYOUT_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "chat_tagged": ({"step_tag"}, {"system_prompt", "tag_in_text"}),
    "chat_turns": ({"reply"}, {"question_sep", "system_prompt"}),
    "text_tagged": ({"step_tag", "question_sep", "step_sep"}, {"tag_in_text"}),
    "token_pieces": ({"step_tag", "question_sep"}, {"tag_in_text"}),
}
_SCORE_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "class_head": (set(), {"positive_class"}),
    "token_pair": ({"good_token", "bad_token"}, set()),
    "value_head": ({"head"}, set()),
}
_SCORE_TYPES: dict[str, type] = {"positive_class": int}  # the others are strings


@dataclass(frozen=True)
class Entry:
    name: str
    model: str  # a hub id; `--model PATH` may point the entry at a local copy
    family: Family


@dataclass(frozen=True)
class Registry:
    families: dict[str, Family]
    entries: tuple[Entry, ...]
    default: Entry

    def find(self, key: str) -> Entry | None:
        """The entry named `key`, or serving model id `key`."""
        return next((e for e in self.entries if key in (e.name, e.model)), None)

    def family(self, name: str) -> Family:
        found = self.families.get(name)
        if found is None:
            known = ", ".join(self.families)
            raise RegistryError(f"unknown PRM family {name!r} (known: {known})")
        return found

    def listing(self) -> str:
        """One line per entry: name, family, score kind, backends, model."""
        rows = [("NAME", "FAMILY", "SCORE", "BACKENDS", "MODEL")]
        for e in self.entries:
            default = " (default)" if e is self.default else ""
            backends = ",".join(e.family.backends)
            rows.append((e.name + default, e.family.name, e.family.score.kind, backends, e.model))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in rows]
        return "\n".join(line + "  " + row[-1] for line, row in zip(lines, rows, strict=True))


@dataclass(frozen=True)
class Selection:
    family: Family
    model: str | None  # None: the caller gave none and no entry was named
    entry: Entry | None


def select(
    registry: Registry, *, prm: str | None, family: str | None, model: str | None
) -> Selection:
    """What `--prm` / `--family` / `--model` ask for. `--family` is for a model not in the
    registry (it needs `--model`); `--prm` names an entry (by name or model id) whose model
    `--model` may replace by a local copy; with neither, an entry whose model id is `--model`,
    else the default entry's family (the Qwen2.5-Math-PRM format)."""
    if family is not None:
        if prm is not None:
            raise BackendError("give --prm or --family, not both")
        if model is None:
            raise BackendError(f"--family {family} needs --model (the PRM's folder or name)")
        return Selection(registry.family(family), model, None)
    if prm is not None:
        entry = registry.find(prm)
        if entry is None:
            names = ", ".join(e.name for e in registry.entries)
            raise BackendError(
                f"no PRM {prm!r} in the registry (entries: {names}); for a model of a known "
                "family, give --model and --family"
            )
        return Selection(entry.family, model or entry.model, entry)
    entry = (registry.find(model) if model else None) or registry.default
    return Selection(entry.family, model, entry)


def shipped_text() -> str:
    """The text of the registry shipped in the package."""
    return resources.files("tts_server.prm_worker").joinpath("registry.toml").read_text("utf-8")


@cache
def shipped() -> Registry:
    """The registry shipped in the package."""
    return parse(shipped_text(), "registry.toml")


def load(path: Path) -> Registry:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegistryError(f"cannot read the PRM registry {path}: {exc}") from exc
    return parse(text, str(path))


def parse(text: str, where: str) -> Registry:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"{where}: not valid TOML: {exc}") from exc
    _keys(data, where, required={"families", "prm"}, optional={"default"})
    raw_families = _table(data["families"], f"{where}: families")
    families = {
        name: _family(name, _table(body, f"{where}: family {name}"), f"{where}: family {name}")
        for name, body in raw_families.items()
    }
    if not isinstance(data["prm"], list) or not data["prm"]:
        raise RegistryError(f"{where}: [[prm]] must list at least one entry")
    entries: list[Entry] = []
    for i, raw in enumerate(data["prm"]):
        body = _table(raw, f"{where}: prm entry {i + 1}")
        label = f"{where}: prm entry {body.get('name', i + 1)!s}"
        _keys(body, label, required={"name", "model", "family"}, optional=set())
        name, model, family = (_text(body, key, label) for key in ("name", "model", "family"))
        if family not in families:
            known = ", ".join(families)
            raise RegistryError(f"{label}: unknown family {family!r} (families: {known})")
        if any(name in (e.name, e.model) or model in (e.name, e.model) for e in entries):
            raise RegistryError(f"{label}: its name or model repeats an earlier entry's")
        entries.append(Entry(name, model, families[family]))
    default_name = data.get("default", entries[0].name)
    default = next((e for e in entries if e.name == default_name), None)
    if default is None:
        raise RegistryError(f"{where}: the default {default_name!r} is not an entry's name")
    return Registry(families, tuple(entries), default)


def _family(name: str, body: dict[str, Any], label: str) -> Family:
    _keys(body, label, required={"backends", "source", "format", "score"}, optional=set())
    backends = body["backends"]
    if not (isinstance(backends, list) and backends and all(isinstance(b, str) for b in backends)):
        raise RegistryError(f"{label}: backends must be a non-empty list of names")
    for backend in backends:
        if backend not in MODEL_BACKENDS:
            known = ", ".join(MODEL_BACKENDS)
            raise RegistryError(f"{label}: unknown backend {backend!r} (known: {known})")
    step_format = _format(_table(body["format"], f"{label}: format"), f"{label}: format")
    score = _score(_table(body["score"], f"{label}: score"), f"{label}: score")
    vllm_ready = step_format.layout == "chat_tagged" and score.kind == "class_head"
    if "vllm" in backends and not vllm_ready:
        raise RegistryError(
            f"{label}: the vllm backend serves only chat_tagged + class_head families "
            f"(vLLM's pooling runner scores a class head at a step tag), not "
            f"{step_format.layout} + {score.kind}"
        )
    source = _text(body, "source", label)
    return Family(name, step_format, score, tuple(backends), source)


def _format(body: dict[str, Any], label: str) -> StepFormat:
    layout = body.get("layout")
    if layout not in LAYOUTS:
        raise RegistryError(f"{label}: layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    required, optional = _LAYOUT_KEYS[layout]
    _keys(body, f"{label} ({layout})", required=required | {"layout"}, optional=optional)
    values: dict[str, Any] = {key: _text(body, key, label) for key in body}  # checked below
    if values.get("tag_in_text", "remove") not in TAG_IN_TEXT:
        raise RegistryError(f"{label}: tag_in_text must be one of {', '.join(TAG_IN_TEXT)}")
    if "step_tag" in values and not values["step_tag"]:
        raise RegistryError(f"{label}: step_tag must not be empty")
    if values.get("tag_in_text") == "space" and values["step_tag"].strip():
        raise RegistryError(f"{label}: tag_in_text = 'space' is for a whitespace step_tag")
    if values.get("tag_in_text") == "remove_word" and not values["step_tag"].strip():
        raise RegistryError(f"{label}: tag_in_text = 'remove_word' needs a tag with a word in it")
    return StepFormat(**values)


def _score(body: dict[str, Any], label: str) -> ScoreReading:
    kind = body.get("kind")
    if kind not in SCORE_KINDS:
        raise RegistryError(f"{label}: bad score kind {kind!r} (known: {', '.join(SCORE_KINDS)})")
    required, optional = _SCORE_KEYS[kind]
    _keys(body, f"{label} ({kind})", required=required | {"kind"}, optional=optional)
    values: dict[str, Any] = {}
    for key, value in body.items():
        wanted = _SCORE_TYPES.get(key, str)
        if type(value) is not wanted or value == "":
            raise RegistryError(f"{label}: {key} must be a non-empty {wanted.__name__}")
        values[key] = value
    if values.get("positive_class", 1) not in (0, 1):
        raise RegistryError(f"{label}: positive_class is 0 or 1 (a 2-way head)")
    return ScoreReading(**values)


def _keys(body: dict[str, Any], label: str, *, required: set[str], optional: set[str]) -> None:
    missing = sorted(required - body.keys())
    if missing:
        raise RegistryError(f"{label}: missing {', '.join(missing)}")
    unknown = sorted(body.keys() - required - optional)
    if unknown:
        allowed = ", ".join(sorted(required | optional))
        raise RegistryError(f"{label}: unknown key {', '.join(unknown)} (allowed: {allowed})")


def _table(value: Any, label: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RegistryError(f"{label} must be a table")
    return value


def _text(body: dict[str, Any], key: str, label: str) -> str:
    value = body[key]
    if not isinstance(value, str):
        raise RegistryError(f"{label}: {key} must be a string")
    return value
