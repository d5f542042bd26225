from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from tts_server import answers
from tts_server.answers import (
    answers_equal,
    canonical_answer,
    extract_answer,
    group_answers,
    has_final_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"So $x = \boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        (r"First \boxed{1}, then correcting: \boxed{2}.", "2"),
        (r"The answer is \boxed 5.", "5"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"Therefore, the final answer is: $\boxed{14}$. I hope it is correct.", "14"),
        ("The final answer is $42$. I hope it is correct.", "42"),
        ("So the answer is: 1,000.", "1,000"),
        ("The Answer Is 2.5.", "2.5"),
        ("The answer is 18 apples.", "18"),
        ("The answer is $18.", "18"),
        (r"Hence the answer is \(x = 2\).", "2"),
        ("So the answer is 7 + 7 = 14.", "14"),
        ("The answer is 16 - 3 = 13 dollars.", "13"),
        ("The answer is 2 * 3 = 6 + 1 = 7.", "7"),
        ("The answer is 2x + 3 = 7.", "2x + 3 = 7"),  # an equation, not a value
        ("The answer is x <= 3.", "x <= 3"),
        ("She pays 16 - 3 = 13 dollars, so 13 * 2 = 26 in all", "26"),
        ("It drops to -3 degrees", "-3"),
        ("It costs 1,000 dollars", "1,000"),
        ("Three quarters: 3/4 of the cake", "3/4"),
        ("The difference 5-3", "3"),
        ("6 * 12 = 72\n#### 72", "72"),
        # Labels and other "answer is" phrasings the arith PRM always read (issue 13).
        ("Answer: 5", "5"),
        ("**Final Answer:** $18", "18"),
        ("She has 7 apples. So, answer: 7.", "7"),
        ("The correct answer is 12.", "12"),
        ("The answer equals 3/4.", "3/4"),
        ("Answer: 7 + 7 = 14", "14"),
        # A heading, a negation, a verdict and a label inside a sentence state nothing: last number.
        ("#### Step 2: add 3", "3"),
        ("The answer is not 5, it is 6 or 7", "7"),
        ("I think 4 + 4 = 8 and the answer is right", "8"),
        ("To get the answer: we add 3 and 4", "4"),
        # An earlier statement counts when the last phrase states nothing.
        ("The answer is 5. Check 2 more: is the answer is going to be", "5"),
        # A cut-off box is no answer: the last number is the fallback.
        (r"so 4 + 4 = 8 and \boxed{8", "8"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_boxed_wins_over_a_later_answer_phrase() -> None:
    assert extract_answer(r"We get \boxed{3}. The answer is 4.") == "3"


@pytest.mark.parametrize(
    ("step", "final"),
    [
        (r"So $\boxed{7}$.", True),
        ("Therefore, the answer is 12.", True),
        ("The final answer is $\\frac{1}{2}$", True),
        ("#### 72", True),
        ("She has 16 - 3 = 13 eggs.\n\n", False),  # numbers, but no stated answer
        ("Now we compute the answer is", False),  # the phrase without content
        ("We ask what the answer is going to be.\n\n", False),  # prose, not an answer
        ("So the answer is Monday.", True),
        ("The final answer is (C).", True),
        (r"\boxed{}", False),
        ("Answer: 5", True),
        ("Final Answer: $\\frac{1}{2}$", True),
        ("The correct answer is 12.", True),
        ("the answer equals 5", True),
        ("answer = 5", True),
        ("#### Step 2: add the apples", False),  # a markdown heading
        ("The answer is not 5.", False),
        ("I'm not sure the answer is right.", False),
        ("To get the answer: we add 3 and 4.", False),
        ("The answer is 5. Is the answer is going to be", True),
    ],
)
def test_has_final_answer(step: str, final: bool) -> None:
    assert has_final_answer(step) is final


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("0.5", r"\frac{1}{2}"),
        ("14", "14.0"),
        ("$14$", "14"),
        ("1,000", "1000"),
        ("3/4", "0.75"),
        (r"\dfrac{1}{2}", r"\frac12"),
        ("x = 5", "5"),
    ],
)
def test_answers_equal(a: str, b: str) -> None:
    assert answers_equal(a, b)
    assert answers_equal(b, a)


@pytest.mark.parametrize(("a", "b"), [("14", "15"), ("0.5", "0.05"), ("1,000", "100"), ("", "1")])
def test_answers_differ(a: str, b: str) -> None:
    assert not answers_equal(a, b)


async def test_answers_equal_works_off_the_main_thread() -> None:
    # With math-verify's default (signal.alarm) timeouts this raises in a worker thread.
    assert await asyncio.to_thread(answers_equal, "0.125", r"\frac{1}{8}")
    assert not await asyncio.to_thread(answers_equal, "0.126", r"\frac{1}{8}")


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("14.0", "14"),
        (" $14$ ", "14"),
        ("1,000.50", "1000.5"),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
        ("x = 5.", "x=5"),
        (r"\pi r", r"\pi r"),
        ("+5", "5"),
        ("-0.0", "0"),
    ],
)
def test_canonical_answer(raw: str, canonical: str) -> None:
    assert canonical_answer(raw) == canonical


def test_group_answers_numbers_classes_in_order_of_appearance() -> None:
    ids = group_answers(["14", None, "14.0", r"\frac{1}{2}", "0.5", "15", "$14$"])
    assert ids == [0, None, 0, 1, 1, 2, 0]


def test_group_answers_fast_path_skips_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object, **__: object) -> bool:
        raise AssertionError("math-verify called for identical answers")

    monkeypatch.setattr(answers, "answers_equal", boom)
    assert group_answers(["7", "$7$", "7.0", " 7 ", None, "7."]) == [0, 0, 0, 0, None, 0]


def test_group_answers_compares_only_with_representatives(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real = answers.answers_equal

    def counting(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(answers, "answers_equal", counting)
    values = [str(i) for i in range(10)] * 20  # 200 answers, 10 classes
    ids = group_answers(values)
    assert ids == list(range(10)) * 20
    # Each new answer meets each earlier class once: 0 + 1 + ... + 9.
    assert len(calls) == 45


def test_a_stop_string_spanning_two_steps_still_ends_the_text() -> None:
    from tts_server.strategies.common import cut_at_stops

    text = " 3 * 5 = 15 apples\n\nQuestion: what next?\n\nAnswer: 7"
    assert cut_at_stops(text, ["\nQuestion:"]) == (" 3 * 5 = 15 apples\n", True)
    assert cut_at_stops(text, ["Answer", "\nQuestion:"]) == (" 3 * 5 = 15 apples\n", True)
    assert cut_at_stops(text, ["nowhere", ""]) == (text, False)


def test_math_verify_timeout_warning_is_not_printed() -> None:
    """Our comparison turns math-verify's timeouts off on purpose; its warning about that must
    not reach a user's terminal or logs (it is raised once per process, so run a fresh one)."""
    code = (
        "import logging; logging.basicConfig();"
        "from tts_server.answers import answers_equal, group_answers;"
        "assert answers_equal('1/2', '0.5'); group_answers(['2', '2.0'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Timeout is disabled" not in result.stderr + result.stdout
    # Other warnings from math-verify still get through.
    code = (
        "import logging; logging.basicConfig(); import tts_server.answers;"
        "logging.getLogger('math_verify.parser').warning('something else')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "something else" in result.stderr
