"""`arith`: a deterministic step checker that scores steps by checking their arithmetic exactly.

Not a learned PRM: it verifies every arithmetic equation it can find, in well under 1 ms a step.

Equations. A step is cut into tokens: numbers (`1,234.5`, `$12`, `\\$3`), operators (`+ - * / x × ÷
· \\times \\cdot \\div`, Unicode minus), `=`, parentheses, words, punctuation and other symbols.
`x` is multiplication only between two numbers (`3 x 4`, `(2+1) x 4`), else it is a word (a
variable). A maximal run of numbers, operators, `=` and parentheses is split at `=` into
expressions, each evaluated exactly with `fractions.Fraction` (precedence, unary minus,
parentheses). So `a op b = c`, `a + b + c = d` and chains `a * b = c = d` are all found.
An expression is *unknown* (never judged) when it does not parse, divides by zero, or touches
something that is not arithmetic: a leading operator or `=` (`x + 3 = 5`, `y = 7`), a word glued to
the run (`2x = 10`, `7cm`), a one-letter variable before it (`x (3 + 4) = 7`) or a symbol next
to it (`2^3 = 8`, `50% = 0.5`, `\\frac{1}{2} = 0.5`).
Words separated by spaces are fine: `She has 16 - 3 = 13 eggs.`
Every pair of neighbouring known expressions in a chain is an equation. It is right when both
sides are equal; a side that is a single decimal literal with d places may be the other side
rounded (half up) or truncated to d places (`10 / 3 = 3.33`, `2 / 3 = 0.67`, `2 / 3 = 0.66`).
A running total is accepted too: `5 + 3 = 8 * 2 = 16` (the right side starts with the left
side's value).

Scores, per step, looking only at this step and the steps before it:
- a step with any wrong equation: `wrong` (0.05);
- a step stating a final answer (`\\boxed{14}`, "the answer is 14", "Answer: 14", "#### 14", as
  `tts_server.answers.has_final_answer` decides, the rule the gateway ends solutions by):
  `final_after_error` (0.1) if an earlier step had a wrong equation; else `final_supported`
  (0.95) if the answer equals a side of a right equation in this or an earlier step, or another
  number stated in this step; else `final_unsupported` (0.6) (also for non-numeric answers);
- a step whose equations are all right: `right` (0.9), or `ungrounded` (0.3) when the question is
  known and some operand of its computations is neither a number of the question (digits or a
  number word) nor a result shown in an earlier equation: a right sum of numbers the model made
  up is the typical wrong step of a small model on a word problem;
- a step with no equation: `neutral` (0.5).
Tokens reported: whitespace-separated words of the question and the steps.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, cast

from tts_server.answers import stated_answer
from tts_server.prm_worker.backends.base import PRMBackend, ScoreItem

Kind = Literal["num", "op", "eq", "lp", "rp", "word", "punct", "sym"]

_NUMBER = r"(?:\\?\$)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_TOKEN_RE = re.compile(
    rf"""
    (?P<space>\s+)
    | (?P<num>{_NUMBER})
    | (?P<latex>\\[A-Za-z]+|\\[()\[\],;!\s])
    | (?P<word>[^\W\d_]\w*)
    | (?P<punct>\*{{2,}}|\#+|\$|<<|>>|[.,;:!?](?=\s|$)|["'`\[\]])
    | (?P<op>[-+*/×÷·⋅−])
    | (?P<eq>=)
    | (?P<lp>\()
    | (?P<rp>\))
    | (?P<sym>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_OPS = {"+": "+", "-": "-", "−": "-", "*": "*", "×": "*", "·": "*", "⋅": "*", "/": "/", "÷": "/"}
_LATEX_OPS = {r"\times": "*", r"\cdot": "*", r"\div": "/"}
_LATEX_IGNORED = {r"\left", r"\right"}
_RUN_KINDS = frozenset({"num", "op", "eq", "lp", "rp"})


@dataclass(frozen=True)
class Token:
    kind: Kind
    text: str  # canonical for operators: + - * /
    spaced: bool  # whitespace right before it


@dataclass(frozen=True)
class ArithScores:
    wrong: float = 0.05
    right: float = 0.9
    neutral: float = 0.5
    final_supported: float = 0.95
    final_unsupported: float = 0.6
    final_after_error: float = 0.1
    ungrounded: float = 0.3


@dataclass(frozen=True)
class _Expr:
    value: Fraction
    places: int | None  # decimal places when the expression is one literal
    lead: tuple[Fraction, int] | None  # (value, places) of a leading literal before an operator


@dataclass
class StepCheck:
    """The equations of one step: how many were right, how many wrong, and the values shown."""

    right: int = 0
    wrong: int = 0
    values: list[Fraction] = field(default_factory=list)
    # Literal numbers on the computing side of right equations (`3 + 5` in `3 + 5 = 8`).
    operands: list[Fraction] = field(default_factory=list)


def tokenize(text: str) -> list[Token]:
    tokens: list[Token] = []
    spaced = True
    for match in _TOKEN_RE.finditer(text):
        kind = match.lastgroup
        raw = match.group()
        if kind == "space" or raw in _LATEX_IGNORED:
            spaced = True
            continue
        if kind == "latex":
            if raw in _LATEX_OPS:
                kind, raw = "op", _LATEX_OPS[raw]
            elif raw[1] in "()[]":
                kind = "punct"
            elif raw[1] in ",;! \t\n":
                spaced = True  # LaTeX spacing
                continue
            else:
                kind = "sym"
        elif kind == "op":
            raw = _OPS[raw]
        tokens.append(Token(cast(Kind, kind), raw, spaced))
        spaced = False
    # `x` multiplies only between two numbers (or parenthesized groups).
    for i in range(1, len(tokens) - 1):
        token = tokens[i]
        between = tokens[i - 1].kind in ("num", "rp") and tokens[i + 1].kind in ("num", "lp")
        if between and token.kind == "word" and token.text in ("x", "X"):
            tokens[i] = Token("op", "*", token.spaced)
    return tokens


def parse_number(text: str) -> tuple[Fraction, int]:
    """(value, decimal places) of a number token such as `$1,234.50`."""
    digits = text.lstrip("\\$").replace(",", "")
    places = len(digits.partition(".")[2])
    return Fraction(digits), places


class _Parser:
    """Recursive descent over + - * / with unary minus and parentheses; exact Fractions."""

    def __init__(self, tokens: Sequence[Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def parse(self) -> Fraction | None:
        try:
            value = self._sum()
        except (ValueError, ZeroDivisionError):
            return None
        return value if self.pos == len(self.tokens) else None

    def _peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _sum(self) -> Fraction:
        value = self._product()
        while (token := self._peek()) is not None and token.text in ("+", "-"):
            self.pos += 1
            right = self._product()
            value = value + right if token.text == "+" else value - right
        return value

    def _product(self) -> Fraction:
        value = self._unary()
        while (token := self._peek()) is not None and token.text in ("*", "/"):
            self.pos += 1
            right = self._unary()
            value = value * right if token.text == "*" else value / right
        return value

    def _unary(self) -> Fraction:
        token = self._peek()
        if token is not None and token.text == "-":
            self.pos += 1
            return -self._unary()
        return self._atom()

    def _atom(self) -> Fraction:
        token = self._peek()
        if token is None:
            raise ValueError("expected a number")
        self.pos += 1
        if token.kind == "num":
            return parse_number(token.text)[0]
        if token.kind == "lp":
            value = self._sum()
            closing = self._peek()
            if closing is None or closing.kind != "rp":
                raise ValueError("unbalanced parenthesis")
            self.pos += 1
            return value
        raise ValueError("expected a number")


def evaluate(tokens: Sequence[Token]) -> Fraction | None:
    return _Parser(tokens).parse() if tokens else None


def _expression(tokens: Sequence[Token]) -> _Expr | None:
    value = evaluate(tokens)
    if value is None:
        return None
    places = parse_number(tokens[0].text)[1] if len(tokens) == 1 else None
    lead = None
    if len(tokens) > 2 and tokens[0].kind == "num" and tokens[1].kind == "op":
        lead = parse_number(tokens[0].text)
    return _Expr(value, places, lead)


def _rounds_to(exact: Fraction, stated: Fraction, places: int) -> bool:
    """Whether `stated` (with `places` decimals) is `exact` rounded half up or truncated."""
    if exact == stated:
        return True
    if places <= 0:
        return False
    scale = 10**places
    target, scaled = stated * scale, abs(exact * scale)
    sign = 1 if exact >= 0 else -1
    return target in (sign * math.floor(scaled), sign * math.floor(scaled + Fraction(1, 2)))


def _equal(left: _Expr, right: _Expr) -> bool:
    for exact, stated in ((left, right), (right, left)):
        if _rounds_to(exact.value, stated.value, stated.places or 0):
            return True
    # A running total: `5 + 3 = 8 * 2 = 16` continues from 8.
    return right.lead is not None and _rounds_to(left.value, *right.lead)


def _unmatched(part: Sequence[Token]) -> tuple[list[int], list[int]]:
    """Indices of the opening and of the closing parentheses that have no partner in `part`."""
    opening: list[int] = []
    closing: list[int] = []
    for i, token in enumerate(part):
        if token.kind == "lp":
            opening.append(i)
        elif token.kind == "rp":
            if opening:
                opening.pop()
            else:
                closing.append(i)
    return opening, closing


def _trim_head(part: list[Token]) -> tuple[list[Token] | None, Token | None]:
    """The first expression of a run without parentheses that close or open outside it.

    `1) 3 + 4` keeps `3 + 4` (after the list marker); `(3 + 4` (as in `(3 + 4 = 7)`) keeps
    `3 + 4`. Returns the kept tokens (None if unusable) and the cut token next to them.
    """
    head: Token | None = None
    closing = _unmatched(part)[1]
    if closing:
        head, part = part[closing[-1]], part[closing[-1] + 1 :]
    opening = _unmatched(part)[0]
    if opening != list(range(len(opening))):
        return None, head
    if opening:
        head, part = part[opening[-1]], part[opening[-1] + 1 :]
    return part, head


def _trim_tail(part: list[Token]) -> tuple[list[Token] | None, Token | None]:
    """The last expression of a run, mirrored: `7 (which` keeps `7`, `2)` keeps `2`."""
    tail: Token | None = None
    opening = _unmatched(part)[0]
    if opening:
        tail, part = part[opening[0]], part[: opening[0]]
    closing = _unmatched(part)[1]
    if closing != list(range(len(part) - len(closing), len(part))):
        return None, tail
    if closing:
        tail, part = part[closing[0]], part[: closing[0]]
    return part, tail


def _is_variable(word: str) -> bool:
    return len(word) == 1 and word not in ("a", "A", "I")


def _head_dirty(before: Token | None, part: Sequence[Token]) -> bool:
    """Whether the first expression of a run may continue something that is not arithmetic."""
    if not part or (before is not None and before.kind == "sym"):
        return True
    first = part[0]
    if before is not None and before.kind in ("word", "rp") and not first.spaced:
        return True
    if before is not None and before.kind == "word" and _is_variable(before.text):
        return True  # `x (3 + 4) = 7`, `y -3 = 2`
    if first.kind != "op":
        return False
    # A leading minus is a sign after punctuation, an opening parenthesis or the start of the
    # text, or when it sticks to its number after a spaced word ("is -3"); else `x - 3`.
    boundary = before is None or before.kind in ("punct", "lp")
    sticky = len(part) > 1 and not part[1].spaced and first.spaced
    return not (first.text == "-" and (boundary or sticky))


def _tail_dirty(part: Sequence[Token], after: Token | None) -> bool:
    if not part or part[-1].kind == "op":
        return True
    if after is None:
        return False
    return after.kind == "sym" or (after.kind in ("word", "lp") and not after.spaced)


def _runs(tokens: Sequence[Token]) -> list[tuple[Token | None, list[Token], Token | None]]:
    """Maximal arithmetic runs with the tokens right before and after each."""
    runs: list[tuple[Token | None, list[Token], Token | None]] = []
    start = 0
    for is_run, group in itertools.groupby(tokens, key=lambda t: t.kind in _RUN_KINDS):
        run = list(group)
        end = start + len(run)
        if is_run:
            before = tokens[start - 1] if start > 0 else None
            runs.append((before, run, tokens[end] if end < len(tokens) else None))
        start = end
    return runs


def _check_run(
    before: Token | None, run: list[Token], after: Token | None, check: StepCheck
) -> None:
    parts: list[list[Token]] = [[]]
    for token in run:
        if token.kind == "eq":
            parts.append([])
        else:
            parts[-1].append(token)
    if len(parts) < 2:
        return
    first, head = _trim_head(parts[0])
    last, tail = _trim_tail(parts[-1])
    head_ok = first is not None and not _head_dirty(head or before, first)
    tail_ok = last is not None and not _tail_dirty(last, tail or after)
    exprs = [
        _expression(first) if head_ok and first is not None else None,
        *(_expression(part) for part in parts[1:-1]),
        _expression(last) if tail_ok and last is not None else None,
    ]
    for (k, left), (_, right) in itertools.pairwise(enumerate(exprs)):
        if left is None or right is None:
            continue
        if _equal(left, right):
            check.right += 1
            check.values += [left.value, right.value]
            if any(t.kind == "op" for t in parts[k]):
                check.operands += [parse_number(t.text)[0] for t in parts[k] if t.kind == "num"]
        else:
            check.wrong += 1


def check_step(text: str) -> StepCheck:
    """Find and check every equation in one step."""
    check = StepCheck()
    for before, run, after in _runs(tokenize(text)):
        _check_run(before, run, after, check)
    return check


def _answer_value(content: str) -> Fraction | None:
    """The number an answer states (`14`, `$1,234`, `\\frac{1}{2}`, `20\\%`, `12 apples`)."""
    content = re.sub(r"\\text\s*\{[^{}]*\}", " ", content).replace("\\%", "").replace("%", "")
    content = re.sub(r"\\d?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", content)
    tokens = [t for t in tokenize(content) if t.kind != "punct"]
    while tokens and tokens[-1].kind == "word":  # units
        tokens.pop()
    if any(t.kind not in _RUN_KINDS or t.kind == "eq" for t in tokens):
        return None
    return evaluate(tokens)


def find_final_answer(text: str) -> tuple[Fraction | None, str] | None:
    """The stated final answer (None if not a number) and the text without answer statements.

    None when the text states no final answer. Whether it does, and which answer it states, is
    the gateway's rule (`answers.stated_answer`), so a step is scored as a final step exactly
    when the gateway ends a solution with it; here the answer is only read as a number.
    """
    stated = stated_answer(text)
    if stated is None:
        return None
    rest = list(text)
    for start, end in stated.spans:
        rest[start:end] = " " * (end - start)
    return _answer_value(stated.answer), "".join(rest)


def _numbers(text: str) -> set[Fraction]:
    return {parse_number(t.text)[0] for t in tokenize(text) if t.kind == "num"}


_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "twenty": 20, "thirty": 30, "forty": 40,
    "fifty": 50, "hundred": 100, "thousand": 1000, "dozen": 12, "twice": 2, "double": 2,
    "half": 2, "triple": 3, "thrice": 3, "once": 1, "pair": 2, "week": 7, "hour": 60,
}  # fmt: skip


def question_numbers(question: str) -> set[Fraction]:
    """The numbers a word problem gives: digits and common number words."""
    words = re.findall(r"[a-z]+", question.lower())
    named = {
        Fraction(_NUMBER_WORDS[w.rstrip("s")]) for w in words if w.rstrip("s") in _NUMBER_WORDS
    }
    return _numbers(question) | named | {Fraction(1)}


def score_steps(
    steps: Sequence[str], scores: ArithScores = ArithScores(), question: str | None = None
) -> list[float]:
    """One score per step; a step's score depends only on it and the steps before it."""
    result: list[float] = []
    shown: set[Fraction] = set()
    given = question_numbers(question) if question else None
    earlier_wrong = False
    for step in steps:
        check = check_step(step)
        # Results shown before (or within) this step may be used as operands.
        known = (given or set()) | shown | set(check.values)
        grounded = given is None or all(n in known for n in check.operands)
        shown.update(check.values)
        final = find_final_answer(step)
        if check.wrong:
            result.append(scores.wrong)
        elif final is not None:
            value, rest = final
            if earlier_wrong:
                result.append(scores.final_after_error)
            elif value is not None and (value in shown or value in _numbers(rest)):
                result.append(scores.final_supported)
            else:
                result.append(scores.final_unsupported)
        elif check.right:
            result.append(scores.right if grounded else scores.ungrounded)
        else:
            result.append(scores.neutral)
        earlier_wrong = earlier_wrong or check.wrong > 0
    return result


class ArithBackend(PRMBackend):
    name = "arith"

    def __init__(self, *, scores: ArithScores | None = None) -> None:
        self.model_name = "arith-checker"
        self.scores = scores or ArithScores()

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        return [score_steps(steps, self.scores, question) for question, steps in items]
