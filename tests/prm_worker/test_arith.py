"""The `arith` step checker: equations found and judged (`backends.equations`), and the per-step
scoring rules (`backends.arith`)."""

from __future__ import annotations

from fractions import Fraction

import pytest

from tts_server.answers import has_final_answer
from tts_server.prm_worker.backends import load_backend
from tts_server.prm_worker.backends.arith import (
    ArithBackend,
    ArithScores,
    find_final_answer,
    score_steps,
)
from tts_server.prm_worker.backends.equations import check_step

S = ArithScores()


@pytest.mark.parametrize(
    "text",
    [
        "3 + 4 = 7",
        "She has 16 - 3 - 4 = 9 eggs left.",
        "2 + 3 + 4 = 9",
        "2 * 3 = 6 = 6",
        "1,234 + 766 = 2,000",
        "She pays $12 x 3 = $36.",
        "12 × 3 = 36",
        "12 X 3 = 36",
        "12 ÷ 4 = 3",
        "12 / 4 = 3",
        "7 − 2 = 5",
        "$1,234.50 + $0.50 = $1,235",
        "0.1 + 0.2 = 0.3",
        "10 / 3 = 3.33",
        "(3 + 4) x 2 = 14",
        "2 * (3 + 4) = 14 = (10 + 4)",
        "(-3 + 5 = 2)",
        "The result is -3 + 5 = 2",
        "\\( 3 \\times 4 = 12 \\)",
        "\\( 12 \\div 4 = 3 \\)",
        "Step 1: 3 + 4 = 7.",
        "1) 3 + 4 = 7",
        "**3 + 4 = 7**",
        "5 + 3 = 8 * 2 = 16",
        "x = 5 + 3 = 8",
        "3 x 4 x 5 = 60",
        "16 - 3 - 4 = <<16-3-4=9>>9 eggs",
    ],
)
def test_right_equations(text: str) -> None:
    check = check_step(text)
    assert check.right >= 1 and check.wrong == 0
    assert score_steps([text]) == [S.right]


@pytest.mark.parametrize(
    "text",
    [
        "3 + 4 = 8",
        "She has 16 - 3 - 4 = 8 eggs left.",
        "2 + 3 + 4 = 10",
        "2 * 3 = 6 = 7",
        "1,234 + 766 = 2,100",
        "She pays $12 x 3 = $35.",
        "12 × 3 = 38",
        "12 ÷ 4 = 4",
        "0.1 + 0.2 = 0.4",
        "10 / 3 = 3.4",
        "(3 + 4) x 2 = 10",
        "4 - 1 = 3 and 3 * 2 = 5",
        "2 + 3 = 2 * 3 = 6",
    ],
)
def test_wrong_equations(text: str) -> None:
    assert check_step(text).wrong >= 1
    assert score_steps([text]) == [S.wrong]


@pytest.mark.parametrize(
    "text",
    [
        "First, count the apples.",
        "x + 3 = 5",
        "2x + 3 = 11",
        "2x = 10",
        "a - 3 = 2",
        "x (3 + 4) = 9",
        "2^3 = 9",
        "50% = 0.7",
        "ratio 3:4 = 6:9",
        "3,4 = 8",
        "f(3) = 10",
        "5 / 0 = 1",
        "3 + 4 = 8cm",
        "3 cm + 4 cm = 8 cm",
        "1 hour = 60 minutes",
        "3 + 4 = 8 + y",
        "\\frac{1}{2} = 0.7",
        "Then 2(3 + 4) = 15",
    ],
)
def test_unjudged_text_is_neutral(text: str) -> None:
    """Algebra, units and notation the checker can't evaluate never count as wrong."""
    check = check_step(text)
    assert (check.right, check.wrong) == (0, 0)
    assert score_steps([text]) == [S.neutral]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("The answer is 14.", Fraction(14)),
        ("So the final answer is $\\boxed{14}$.", Fraction(14)),
        ("#### 1,234", Fraction(1234)),
        ("Answer: $7.50", Fraction(15, 2)),
        ("The answer is -3", Fraction(-3)),
        ("\\boxed{\\frac{1}{2}}", Fraction(1, 2)),
        ("\\boxed{12 \\text{ apples}}", Fraction(12)),
        ("The answer is 7, so she is done.", Fraction(7)),
        ("\\boxed{20\\%}", Fraction(20)),
        ("\\boxed{12 apples}", Fraction(12)),
        # Read since the decision is the gateway's rule (answers.stated_answer):
        ("The answer is **5**.", Fraction(5)),
        ("The answer is 1/2.", Fraction(1, 2)),
        ("The final answer is $\\frac{3}{4}$.", Fraction(3, 4)),
        ("\\fbox{9}", Fraction(9)),
        ("answer: 3 + 4 = 7", Fraction(7)),  # states 7, as "the answer is 7 + 7 = 14" states 14
    ],
)
def test_final_answers(text: str, value: Fraction) -> None:
    found = find_final_answer(text)
    assert found is not None and found[0] == value


def test_non_numeric_and_absent_answers() -> None:
    for text in ("\\boxed{x + 1}", "\\boxed{x}", "\\boxed{A}", "The answer is Monday."):
        found = find_final_answer(text)
        assert found is not None and found[0] is None
    assert find_final_answer("We need to find the answer.") is None
    assert find_final_answer("\\boxed{}") is None  # an empty box states nothing


_FINAL_SCORES = {S.final_supported, S.final_unsupported, S.final_after_error}


@pytest.mark.parametrize(
    ("step", "final"),
    [
        ("The answer is 14.", True),
        ("Therefore, the final answer is: $\\boxed{14}$. I hope it is correct.", True),
        ("#### 72", True),
        ("Answer: 5", True),
        ("**Final Answer:** 5", True),
        ("She has 7 apples. Answer: 7", True),
        ("The correct answer is 5.", True),
        ("the answer equals 5", True),
        ("answer = 5", True),
        ("The answer is **5**.", True),
        ("The answer is 1/2.", True),
        ("The answer is $\\frac{1}{2}$.", True),
        ("The answer is 7 + 7 = 14.", True),
        ("The answer is 16 - 3 = 13 dollars.", True),
        ("The answer is x <= 3.", True),
        ("The answer is Monday.", True),
        ("The final answer is (C).", True),
        ("\\fbox{5}", True),
        ("The answer is \\boxed 5.", True),
        ("The answer is 5. Is the answer is going to be", True),
        ("\\boxed{}", False),
        ("so 4 + 4 = 8 and \\boxed{8", False),  # cut off inside the box
        ("#### Step 2: add the apples", False),  # a markdown heading
        ("The answer is not 5.", False),
        ("I'm not sure the answer is right.", False),
        ("To get the answer: we add 3 and 4.", False),
        ("We need to find the answer.", False),
        ("Now we compute the answer is", False),
        ("We ask what the answer is going to be.", False),
        ("She has 16 - 3 = 13 eggs.", False),
        ("First, count the apples.", False),
    ],
)
def test_final_step_exactly_when_the_gateway_sees_a_final_answer(step: str, final: bool) -> None:
    """One rule (issue 13): the gateway ends a solution at the step the PRM scores as final."""
    assert has_final_answer(step) is final
    assert (find_final_answer(step) is not None) is final
    [score] = score_steps([step])
    assert (score in _FINAL_SCORES) is final


def test_final_step_supported_by_an_earlier_equation() -> None:
    steps = ["3 + 4 = 7 apples.", "She doubles them: 7 * 2 = 14.", "The answer is 14."]
    assert score_steps(steps) == [S.right, S.right, S.final_supported]


def test_final_step_supported_by_its_own_equation_or_number() -> None:
    assert score_steps(["3 + 4 = 7, so the answer is \\boxed{7}."]) == [S.final_supported]
    assert score_steps(["She has 7 apples left. The answer is 7."]) == [S.final_supported]


def test_final_step_unsupported() -> None:
    assert score_steps(["3 + 4 = 7.", "The answer is 15."]) == [S.right, S.final_unsupported]
    assert score_steps(["We think hard.", "\\boxed{x + 1}"]) == [S.neutral, S.final_unsupported]
    # The answer's own mention doesn't support itself.
    assert score_steps(["The answer is 15. \\boxed{15}"]) == [S.final_unsupported]


def test_final_step_after_a_wrong_step() -> None:
    steps = ["3 + 4 = 8", "8 * 2 = 16", "The answer is 16."]
    assert score_steps(steps) == [S.wrong, S.right, S.final_after_error]


def test_wrong_equation_in_the_final_step() -> None:
    assert score_steps(["3 + 4 = 8, so the answer is 8."]) == [S.wrong]


def test_earlier_scores_do_not_depend_on_later_steps() -> None:
    steps = ["3 + 4 = 7", "She has 7.", "7 * 2 = 15", "The answer is 14."]
    full = score_steps(steps)
    for k in range(1, len(steps) + 1):
        assert score_steps(steps[:k]) == full[:k]
    changed = score_steps([*steps[:2], "Totally different text."])
    assert changed[:2] == full[:2]


def test_backend_scores_a_batch_and_counts_words() -> None:
    backend = load_backend("arith")
    assert isinstance(backend, ArithBackend)
    assert backend.name == "arith"
    items = [("3 and 4: how many?", ["3 + 4 = 7", "The answer is 7."]), ("Q", ["2 + 2 = 5"])]
    assert backend.score_batch(items) == [[S.right, S.final_supported], [S.wrong]]
    assert backend.count_tokens(items[0]) == 5 + 5 + 4


def test_custom_scores() -> None:
    scores = ArithScores(wrong=0.0, right=1.0)
    backend = ArithBackend(scores=scores)
    assert backend.score_batch([("q", ["1 + 1 = 2", "1 + 1 = 3"])]) == [[1.0, 0.0]]


def test_operands_must_come_from_the_question_or_earlier_results() -> None:
    question = "Jose has 7 caps and gets two more. How many caps does he have?"
    # Right sums, but 3 is nowhere in the question: a made-up operand.
    assert score_steps(["7 + 3 = 10"], S, question) == [S.ungrounded]
    assert score_steps(["7 + 2 = 9"], S, question) == [S.right]  # "two" is a number word
    # An earlier result may be used as an operand.
    assert score_steps(["7 + 2 = 9", "9 * 2 = 18"], S, question) == [S.right, S.right]
    # Without a question nothing is judged ungrounded.
    assert score_steps(["7 + 3 = 10"], S) == [S.right]
