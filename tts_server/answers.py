"""Final answers: extracting them from solutions, comparing them (math-verify), grouping them.

Comparison runs math-verify with its timeouts off: they use `signal.alarm`, which works only in
the main thread. Long answers skip math-verify (string comparison only) so that a pathological
answer cannot stall a worker.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any


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
# "the answer is 5", "The correct answer equals 5"; and a label opening a line or a sentence
# ("Answer: 5", "**Final Answer:** 5", "7 apples. So, answer: 7"), not mid-sentence, where
# "to get the answer: we add 3 and 4" is prose.
_PHRASE_RE = re.compile(
    r"\banswer\s+(?:is|equals)\b"
    r"|(?:^|(?<=[.!?;,])[ \t]+)[ \t*#]*(?:(?:so|thus|therefore|hence),?\s+)?"
    r"(?:the\s+)?(?:final\s+)?answer\**\s*[:=]",
    re.IGNORECASE | re.MULTILINE,
)
# A markdown heading, not GSM8K's "#### 72": a capitalised word and more ("#### Step 2: add").
_HEADING_RE = re.compile(r"[A-Z][a-z]+\s+\S")
# What "the answer is" may be followed by without stating one: a negation, a verdict.
_NOT_STATED_RE = re.compile(r"(?:not\b.*|right|correct|wrong|incorrect)", re.IGNORECASE)
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
    "the answer is 5", "Answer: 5"), else the last number in the text. None if there is none."""
    explicit = _explicit_answer(text)
    if explicit is not None:
        return explicit
    numbers = _LAST_NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def has_final_answer(step: str) -> bool:
    """Whether a step states a final answer explicitly (the last-number fallback does not count).

    The one rule for "this step states its final answer": the gateway ends a solution there and
    the arith PRM scores the step as a final step (`stated_answer` gives what it states)."""
    return stated_answer(step) is not None


@dataclass(frozen=True)
class StatedAnswer:
    """The final answer a text states, and every span of the text that states an answer."""

    answer: str
    spans: tuple[tuple[int, int], ...]


def stated_answer(text: str) -> StatedAnswer | None:
    """The explicitly stated final answer: the last `\\boxed{}`, else the last "#### 5", else the
    last "the answer is 5" / "Answer: 5". None if the text states none."""
    boxed: list[tuple[int, int, str]] = []
    for match in _BOXED_RE.finditer(text):
        argument = _boxed_argument(text, match.end())
        if argument is not None and argument[0]:
            boxed.append((match.start(), argument[1], argument[0]))
    hashes: list[tuple[int, int, str]] = []
    for match in _HASHES_RE.finditer(text):
        if _HEADING_RE.match(match.group(1)):
            continue
        # Only the rest of the "####" line: `text` cut at its end.
        found = _stated_answer(text[: match.end()], match.start(1))
        if found is not None:
            hashes.append((match.start(), found[1], found[0]))
    phrases: list[tuple[int, int, str]] = []
    for match in _PHRASE_RE.finditer(text):
        found = _stated_answer(text, match.end())
        if found is not None:
            phrases.append((match.start(), found[1], found[0]))
    chosen = next((kind[-1] for kind in (boxed, hashes, phrases) if kind), None)
    if chosen is None:
        return None
    spans = tuple(sorted((start, end) for start, end, _ in boxed + hashes + phrases))
    return StatedAnswer(chosen[2], spans)


def _explicit_answer(text: str) -> str | None:
    found = stated_answer(text)
    return found.answer if found is not None else None


def _boxed_content(text: str, start: int) -> str | None:
    argument = _boxed_argument(text, start)
    return argument[0] if argument is not None else None


def _boxed_argument(text: str, start: int) -> tuple[str, int] | None:
    """The argument of a `\\boxed` ending at `start`, `{...}` with nested braces or `\\boxed 5`,
    and where it ends."""
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
                    return _tidy(text[i + 1 : j]), j + 1
            j += 1
        return None  # unbalanced: the solution was cut off inside the box
    if i == start:
        return None
    token = re.match(r"[^\s$]+", text[i:])
    return (_tidy(token.group(0)), i + token.end()) if token else None


def _stated_answer(text: str, pos: int) -> tuple[str, int] | None:
    """What a phrase ending at `pos` states ("the answer is" ...): up to the end of the
    sentence, or the first `$...$`; and where that sentence ends in `text`."""
    after = text[pos:]
    i = pos + len(after) - len(after.lstrip().lstrip(":").lstrip())
    raw = text[i:].split("\n", 1)[0]
    line = raw.replace("**", "")
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
    if not content or _NOT_STATED_RE.fullmatch(content):
        return None
    math = _DELIMITED_RE.search(raw) if delimited else None
    sentence_end = _SENTENCE_END_RE.search(raw, math.end() if math else 0)
    return content, i + (sentence_end.end() if sentence_end else len(raw))


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
    from math_verify import verify  # imported late: the arith PRM uses this module, not sympy

    return bool(
        verify(parsed_a, parsed_b, timeout_seconds=None)
        or verify(parsed_b, parsed_a, timeout_seconds=None)
    )


@lru_cache(maxsize=8192)
def _parsed(answer: str) -> list[Any]:
    if len(answer) > MAX_VERIFIED_CHARS:
        return []
    from math_verify import parse

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
