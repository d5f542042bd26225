"""Final answers: extracting them from solutions, comparing them (math-verify), grouping them.

Comparison runs math-verify with its timeouts off: they use `signal.alarm`, which works only in
the main thread. Long answers skip math-verify (string comparison only) so that a pathological
answer cannot stall a worker.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from math_verify import parse, verify


class _KnownTimeoutWarning(logging.Filter):
    """Drops math-verify's one-off "Timeout is disabled" warning: the timeouts are off on
    purpose (see above), and the warning reached calibrate's and the gateway's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_KnownTimeoutWarning())

# Longest answer handed to math-verify; longer ones compare as normalised strings only.
MAX_VERIFIED_CHARS = 200

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_LAST_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}(?:/\d+)?")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_PHRASE_RE = re.compile(r"(?:final answer|the answer)\s+is\b", re.IGNORECASE)
_NUMBER_WITH_UNIT_RE = re.compile(rf"({_NUMBER}(?:/\d+)?)\s+[A-Za-z][A-Za-z\s]*")
_MATHLIKE_RE = re.compile(r"[\d\\=+*/^<>()\[\]{}]")
_SENTENCE_END_RE = re.compile(r"[.;!?](?=\s|$)|,\s+(?=[A-Za-z])")
_DELIMITED_RE = re.compile(r"\$\$?(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_GROUPED_NUMBER_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL_RE = re.compile(r"[-+]?\d+\.\d*")
_LATEX_SPACING_RE = re.compile(r"\\[,;:! ]|\\left(?![A-Za-z])|\\right(?![A-Za-z])")
# Numbers and operators only, e.g. "7 + 7" or "16 - 3 = 13" (chains: "2 * 3 = 6 + 1").
_ARITHMETIC_RE = re.compile(r"[\d\s.,+\-*/×÷()=]+")
_SPACE_RE = re.compile(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])|\s+")


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the last `\\boxed{}`, else a stated answer ("#### 5",
    "the answer is 5"), else the last number in the text. None if there is none."""
    explicit = _explicit_answer(text)
    if explicit is not None:
        return explicit
    numbers = _LAST_NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def has_final_answer(step: str) -> bool:
    """Whether a step states a final answer explicitly (the last-number fallback does not count)."""
    return _explicit_answer(step) is not None


def _explicit_answer(text: str) -> str | None:
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES_RE, _PHRASE_RE):
        matches = list(pattern.finditer(text))
        if matches:
            last = matches[-1]
            rest = last.group(1) if pattern is _HASHES_RE else text[last.end() :]
            stated = _stated_answer(rest)
            if stated:
                return stated
    return None


def _last_boxed(text: str) -> str | None:
    found: str | None = None
    for match in _BOXED_RE.finditer(text):
        content = _boxed_content(text, match.end())
        if content:
            found = content
    return found


def _boxed_content(text: str, start: int) -> str | None:
    """The argument of a `\\boxed` ending at `start`: `{...}` with nested braces, or `\\boxed 5`."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            char = text[j]
            if char == "\\":
                j += 2  # an escaped character, e.g. `\{`, never delimits
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return _tidy(text[i + 1 : j])
            j += 1
        return None  # unbalanced: the solution was cut off inside the box
    if i == start:
        return None
    token = re.match(r"[^\s$]+", text[i:])
    return _tidy(token.group(0)) if token else None


def _stated_answer(rest: str) -> str | None:
    """What follows "the answer is": up to the end of the sentence, or the first `$...$`."""
    line = rest.lstrip().lstrip(":").lstrip().split("\n", 1)[0].replace("**", "")
    delimited = _DELIMITED_RE.match(line)
    if delimited:
        content = next(g for g in delimited.groups() if g is not None)
    else:
        content = _SENTENCE_END_RE.split(line, maxsplit=1)[0]
    content = _tidy(content)
    if content.startswith("\\boxed"):
        content = _boxed_content(content, len("\\boxed")) or ""
    content = _right_hand_side(content)
    with_unit = _NUMBER_WITH_UNIT_RE.fullmatch(content)
    if with_unit:
        content = with_unit.group(1)
    # Prose ("what the answer is going to be") is no answer: want math or a single word.
    if not _MATHLIKE_RE.search(content) and not re.fullmatch(r"\S+", content):
        return None
    return content or None


def _right_hand_side(content: str) -> str:
    """The value an answer states: "7 + 7 = 14" states 14 and "x = 2" states 2 (what follows the
    last `=` when what precedes it is arithmetic or a variable's name); a real equation
    ("2x + 3 = 7") or an inequality stays whole."""
    left, sign, right = content.rpartition("=")
    right = right.strip()
    if not sign or not right or "<" in left or ">" in left or "!" in left[-1:]:
        return content
    left = left.strip()
    if _ARITHMETIC_RE.fullmatch(left) or re.fullmatch(r"[A-Za-z]\w?", left):
        return right
    return content


def _tidy(content: str) -> str:
    content = content.strip().replace("\\$", "").strip("$ \t")
    return content.rstrip(".").strip()


@lru_cache(maxsize=8192)
def canonical_answer(answer: str) -> str:
    """A tidy display form: no `$`, `\\boxed`, spacing or trailing period; plain numbers
    without grouping commas or trailing zeros ("1,000.50" -> "1000.5", "14.0" -> "14")."""
    text = _tidy(answer)
    if text.startswith("\\boxed"):
        text = _boxed_content(text, len("\\boxed")) or text
    text = text.replace("$", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _LATEX_SPACING_RE.sub(" ", text)
    text = _SPACE_RE.sub(lambda m: f"{m.group(1)} " if m.group(1) else "", text.strip())
    text = text.rstrip(".")
    if _GROUPED_NUMBER_RE.fullmatch(text):
        text = text.replace(",", "")
    if _DECIMAL_RE.fullmatch(text):
        text = text.rstrip("0").rstrip(".")
    text = text.removeprefix("+")
    return "0" if text == "-0" else text


def answers_equal(a: str, b: str) -> bool:
    """Whether two answers are mathematically equal, as math-verify judges."""
    first, second = canonical_answer(a), canonical_answer(b)
    if first == second:
        return True
    if not first or not second:
        return False
    low, high = sorted((first, second))
    return _verified_equal(low, high)


@lru_cache(maxsize=65536)
def _verified_equal(a: str, b: str) -> bool:
    parsed_a, parsed_b = _parsed(a), _parsed(b)
    if not parsed_a or not parsed_b:
        return False
    return bool(
        verify(parsed_a, parsed_b, timeout_seconds=None)
        or verify(parsed_b, parsed_a, timeout_seconds=None)
    )


@lru_cache(maxsize=8192)
def _parsed(answer: str) -> list[Any]:
    if len(answer) > MAX_VERIFIED_CHARS:
        return []
    try:
        return list(parse(f"${answer}$", parsing_timeout=None))
    except Exception:  # math-verify reports failures as an empty parse; be as lenient
        return []


def group_answers(answers: Sequence[str | None]) -> list[int | None]:
    """Equivalence-class ids, numbered in order of first appearance; None stays None.

    Equal canonical strings share a class without math-verify; a new string is compared only
    with one representative per class.
    """
    class_of: dict[str, int] = {}
    representatives: list[str] = []
    ids: list[int | None] = []
    for answer in answers:
        if answer is None:
            ids.append(None)
            continue
        key = canonical_answer(answer)
        if key not in class_of:
            match = next(
                (i for i, rep in enumerate(representatives) if answers_equal(rep, key)), None
            )
            if match is None:
                match = len(representatives)
                representatives.append(key)
            class_of[key] = match
        ids.append(class_of[key])
    return ids
