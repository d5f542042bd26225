"""DeepConf's confidences against sums worked out by hand."""

from __future__ import annotations

import pytest

from tts_server.confidence import (
    GroupMonitor,
    TokenLogprob,
    group_confidences,
    percentile,
    token_confidence,
    trace_confidence,
)
from tts_server.router import lead_probability

# Five tokens' top logprobs, and with k = 2 their confidences (by hand):
# 1.6 = (0.2 + 3.0) / 2; 1.1 (the third is beyond k); 0.7; 0.6 (given unsorted); 1.5.
TOPS = [[-0.2, -3.0], [-0.1, -2.1, -5.0], [-0.7, -0.7], [-0.9, -0.3], [-1.0, -2.0]]
TOKENS = [
    TokenLogprob(f"t{i}", top[0], tuple((f"a{j}", lp) for j, lp in enumerate(top)))
    for i, top in enumerate(TOPS)
]


def test_token_confidence_is_minus_the_mean_of_the_k_largest_logprobs() -> None:
    assert [token_confidence(top, 2) for top in TOPS] == pytest.approx([1.6, 1.1, 0.7, 0.6, 1.5])
    assert token_confidence([-0.1, -2.1, -5.0], 3) == pytest.approx(7.2 / 3)
    assert token_confidence([-0.5], 5) == pytest.approx(0.5)  # fewer than k: all of them
    with pytest.raises(ValueError):
        token_confidence([], 2)


def test_group_confidence_slides_a_window_and_a_short_trace_is_one_group() -> None:
    confidences = [1.6, 1.1, 0.7, 0.6, 1.5]
    assert group_confidences(confidences, 2) == pytest.approx([1.35, 0.9, 0.65, 1.05])
    assert group_confidences(confidences, 3) == pytest.approx([3.4 / 3, 0.8, 2.8 / 3])
    assert group_confidences(confidences, 10) == pytest.approx([1.1])
    assert group_confidences([], 4) == []


def test_a_trace_has_mean_lowest_group_tail_and_bottom_ten_percent() -> None:
    c = trace_confidence(TOKENS, k=2, window=2, tail=3)
    assert c is not None
    assert (c.mean, c.lowest_group, c.tail, c.bottom_10, c.tokens) == pytest.approx(
        (1.1, 0.65, 2.8 / 3, 0.65, 5)
    )
    wide = trace_confidence(TOKENS, k=2, window=3, tail=1)
    assert wide is not None and (wide.lowest_group, wide.tail) == pytest.approx((0.8, 1.5))
    assert trace_confidence([TokenLogprob("x", -0.1)], k=2, window=2, tail=2) is None


def test_bottom_ten_percent_averages_the_lowest_tenth_of_the_groups() -> None:
    # Window 1: the groups are the tokens; 12 groups -> ceil(1.2) = 2 lowest: 0.1 and 0.2.
    values = [0.5, 0.1, 0.9, 0.2, 0.8, 0.7, 0.6, 0.4, 0.3, 1.0, 1.1, 1.2]
    tokens = [TokenLogprob("x", -v, (("x", -v),)) for v in values]
    c = trace_confidence(tokens, k=1, window=1, tail=4)
    assert c is not None
    assert (c.bottom_10, c.lowest_group, c.tail) == pytest.approx((0.15, 0.1, 0.9))


def test_the_online_monitor_judges_full_windows_against_the_threshold() -> None:
    monitor = GroupMonitor(k=2, window=2, threshold=0.8)
    # Groups once two tokens are in: 1.35, 0.9, then 0.65 < 0.8 at the fourth token.
    assert [monitor.add(t) for t in TOKENS[:4]] == [False, False, False, True]
    assert monitor.lowest == pytest.approx(0.65)
    # A trace exactly as confident as the threshold's is never cut (same float both ways).
    same = [TokenLogprob("x", -0.1, (("x", -0.1), ("y", -3.0)))] * 6
    low = trace_confidence(same, k=2, window=4, tail=4)
    assert low is not None
    even = GroupMonitor(k=2, window=4, threshold=low.lowest_group)
    assert not any(even.add(t) for t in same)


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 10) == pytest.approx(1.3)
    assert percentile([4.0, 1.0, 3.0, 2.0], 90) == pytest.approx(3.7)
    assert percentile([2.5], 90) == 2.5


@pytest.mark.parametrize(
    ("lead", "second", "expected"),
    # P(Binomial(lead + second + 1, 1/2) <= lead), by hand: 3/4, 15/16, 31/32, 26/32, 1/2.
    [(1, 0, 0.75), (3, 0, 0.9375), (4, 0, 0.96875), (3, 1, 0.8125), (2, 2, 0.5)],
)
def test_the_beta_posterior_that_the_leader_beats_the_second(
    lead: int, second: int, expected: float
) -> None:
    assert lead_probability(lead, second) == pytest.approx(expected)
