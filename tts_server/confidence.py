"""DeepConf's confidence measures (Fu et al. 2025, "Deep Think with Confidence") from the top-k
token logprobs vLLM returns with a sample.

- token confidence C_i = -(1/k) * sum of the k largest logprobs at token i: high when the model
  was sure (one token takes the mass, the others are far below), low when it hesitated;
- group confidence: the mean token confidence over a sliding window of `window` tokens (the
  window ending at each token once `window` tokens exist; a trace shorter than the window is one
  group);
- lowest-group confidence: the least confident window of the trace;
- tail confidence: the mean token confidence over the last `tail` tokens;
- bottom-10% group confidence: the mean of the lowest 10% of the group confidences (at least one).

The paper's window is 2048 tokens, for reasoning traces of tens of thousands. The solutions here
are tens to a few hundred tokens (a worked arithmetic answer of SmolLM2 is about 40-120), where a
2048-token window is the whole trace and every group measure collapses to the mean: the default
window (`TTS_CONFIDENCE_WINDOW`, 16 tokens) is about one step's equation, and the tail
(`TTS_CONFIDENCE_TAIL`, 32) about the answer's sentence.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

ConfidenceMetric = Literal["mean", "lowest_group", "tail", "bottom_10"]
CONFIDENCE_METRICS: tuple[ConfidenceMetric, ...] = get_args(ConfidenceMetric)
BOTTOM_SHARE = 0.1


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token as vLLM reported it: its text, its logprob, and the most likely
    tokens at its position with theirs (most likely first; it may hold the token itself)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def token_confidence(top_logprobs: Sequence[float], k: int) -> float:
    """C_i: minus the mean of the k largest logprobs (all of them when fewer are given)."""
    if not top_logprobs:
        raise ValueError("a token confidence needs at least one logprob")
    best = sorted(top_logprobs, reverse=True)[:k]
    # A -inf logprob (a token the model rules out) would make the mean infinite: cap it at the
    # smallest float vLLM sends for such tokens, so one impossible candidate counts as very sure.
    return -sum(max(lp, -9999.0) for lp in best) / len(best)


def group_confidences(confidences: Sequence[float], window: int) -> list[float]:
    """The mean over each window of `window` consecutive tokens; one group when shorter."""
    if not confidences:
        return []
    if len(confidences) <= window:
        return [sum(confidences) / len(confidences)]
    # Each window summed afresh (not a running sum): the online monitor then computes the very
    # same float for the same window, and a trace as confident as the warm-up's is never cut.
    return [
        sum(confidences[end - window : end]) / window for end in range(window, len(confidences) + 1)
    ]


@dataclass(frozen=True)
class Confidence:
    """One trace's confidences (higher is more confident)."""

    mean: float
    lowest_group: float
    tail: float
    bottom_10: float
    tokens: int

    def metric(self, name: ConfidenceMetric) -> float:
        value: float = getattr(self, name)
        return value

    def as_dict(self) -> dict[str, float | int]:
        return {
            "mean": round(self.mean, 4),
            "lowest_group": round(self.lowest_group, 4),
            "tail": round(self.tail, 4),
            "bottom_10": round(self.bottom_10, 4),
            "tokens": self.tokens,
        }


def trace_confidence(
    tokens: Sequence[TokenLogprob], *, k: int, window: int, tail: int
) -> Confidence | None:
    """The confidences of a trace of tokens with their top logprobs (None: no token has any)."""
    confidences = [token_confidence([lp for _, lp in t.top], k) for t in tokens if t.top]
    if not confidences:
        return None
    groups = group_confidences(confidences, window)
    lowest = sorted(groups)
    bottom = lowest[: max(1, math.ceil(len(lowest) * BOTTOM_SHARE))]
    last = confidences[-tail:]
    return Confidence(
        mean=sum(confidences) / len(confidences),
        lowest_group=lowest[0],
        tail=sum(last) / len(last),
        bottom_10=sum(bottom) / len(bottom),
        tokens=len(confidences),
    )


class GroupMonitor:
    """DeepConf online: follows a trace's token confidences as they arrive and says when the
    current group (the last `window` tokens) falls below `threshold`. Only full windows are
    judged, so a trace is never stopped on its first few tokens."""

    def __init__(self, *, k: int, window: int, threshold: float) -> None:
        self.k, self.window, self.threshold = k, window, threshold
        self._recent: deque[float] = deque(maxlen=window)
        self.lowest: float | None = None  # the lowest full-window group seen so far

    def add(self, token: TokenLogprob) -> bool:
        """Take one token; True when its window's confidence is below the threshold."""
        if not token.top:
            return False
        self._recent.append(token_confidence([lp for _, lp in token.top], self.k))
        if len(self._recent) < self.window:
            return False
        group = sum(self._recent) / self.window
        self.lowest = group if self.lowest is None else min(self.lowest, group)
        return group < self.threshold


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's
    default), so DeepConf's threshold over a handful of warm-up traces is well defined."""
    if not values:
        raise ValueError("a percentile of nothing")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
