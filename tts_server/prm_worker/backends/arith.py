"""`arith`: a deterministic step checker that scores steps by checking their arithmetic exactly.

Not a learned PRM: it verifies every arithmetic equation it can find, in well under 1 ms a step.

Equations are found and judged by `backends.equations` (its docstring says how).

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

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from tts_server.answers import stated_answer
from tts_server.prm_worker.backends.base import PRMBackend, ScoreItem
from tts_server.prm_worker.backends.equations import (
    RUN_KINDS,
    check_step,
    evaluate,
    parse_number,
    tokenize,
)


@dataclass(frozen=True)
class ArithScores:
    wrong: float = 0.05
    right: float = 0.9
    neutral: float = 0.5
    final_supported: float = 0.95
    final_unsupported: float = 0.6
    final_after_error: float = 0.1
    ungrounded: float = 0.3


def _answer_value(content: str) -> Fraction | None:
    """The number an answer states (`14`, `$1,234`, `\\frac{1}{2}`, `20\\%`, `12 apples`)."""
    content = re.sub(r"\\text\s*\{[^{}]*\}", " ", content).replace("\\%", "").replace("%", "")
    content = re.sub(r"\\d?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", content)
    tokens = [t for t in tokenize(content) if t.kind != "punct"]
    while tokens and tokens[-1].kind == "word":  # units
        tokens.pop()
    if any(t.kind not in RUN_KINDS or t.kind == "eq" for t in tokens):
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
