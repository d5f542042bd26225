"""The equations of a step, found and judged exactly: the arithmetic under the `arith` step
checker (`backends.arith` scores steps from them; the `--veto arith` wrapper reads them too).

A step is cut into tokens: numbers (`1,234.5`, `$12`, `\\$3`), operators (`+ - * / x × ÷
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
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, cast

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
RUN_KINDS = frozenset({"num", "op", "eq", "lp", "rp"})


@dataclass(frozen=True)
class Token:
    kind: Kind
    text: str  # canonical for operators: + - * /
    spaced: bool  # whitespace right before it


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
    for is_run, group in itertools.groupby(tokens, key=lambda t: t.kind in RUN_KINDS):
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
