"""A per-request FLOPs ceiling (`X-TTS-Max-FLOPs`) that is never exceeded.

The policy and the PRM are wrapped; before every call the wrapper reserves the call's worst case
(nothing cached, every sample runs to its token limit) and shrinks the call to fit what is left:
fewer tokens per sample, or no call at all. Strategies need not know: a sample with no room comes
back empty with finish "length", which ends its candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tts_server.flops import FlopsCounter
from tts_server.types import (
    Generation,
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    SamplingConfig,
)

# Template text and special tokens a PRM adds around one solution, in tokens (bounds its cost).
PRM_TOKEN_OVERHEAD = 256


@dataclass
class FlopsMeter:
    """What one request has spent, against its ceiling (None: no ceiling)."""

    counter: FlopsCounter
    ceiling: int | None = None
    spent: int = 0
    limited: bool = False  # a call was shrunk or skipped to stay under the ceiling

    @property
    def remaining(self) -> int | None:
        return None if self.ceiling is None else self.ceiling - self.spent


class MeteredPolicy:
    """A PolicyClient that never lets a request's FLOPs pass its meter's ceiling."""

    def __init__(self, inner: PolicyClient, meter: FlopsMeter) -> None:
        self.inner = inner
        self.meter = meter

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        n: int = 1,
    ) -> list[list[Generation]]:
        remaining = self.meter.remaining
        if remaining is not None:
            lengths = [len(p) for p in prompts]
            max_tokens = self._fitting_max_tokens(lengths, sampling.max_tokens, n, remaining)
            if max_tokens < 1:
                self.meter.limited = True
                return [[_no_room() for _ in range(n)] for _ in prompts]
            if max_tokens < sampling.max_tokens:
                self.meter.limited = True
                sampling = replace(sampling, max_tokens=max_tokens)
        call = PolicyUsage()
        result = await self.inner.generate(prompts, sampling, call, n=n)
        usage.add(call)
        self.meter.spent += self.meter.counter.policy_flops(call)[0]
        return result

    def _fitting_max_tokens(self, lengths: list[int], wanted: int, n: int, budget: int) -> int:
        """The largest token limit <= wanted whose worst case fits `budget` (0 if none)."""
        worst = self.meter.counter.worst_case_generate
        if worst(lengths, wanted, samples=n) <= budget:
            return wanted
        low, high = 0, wanted  # worst case grows with the limit: bisect
        while low < high:
            mid = (low + high + 1) // 2
            if worst(lengths, mid, samples=n) <= budget:
                low = mid
            else:
                high = mid - 1
        return low


class MeteredPRM:
    """A PRMClient under the same meter. The worst case of a call is bounded by its UTF-8 bytes
    (a token is at least one byte) plus a template overhead per solution."""

    def __init__(self, inner: PRMClient, meter: FlopsMeter) -> None:
        self.inner = inner
        self.meter = meter

    async def score(
        self, question: str, solutions: Sequence[Sequence[str]], usage: PRMUsage
    ) -> list[list[float]]:
        remaining = self.meter.remaining
        assert self.meter.counter.prm is not None
        params = self.meter.counter.prm.parameters
        if remaining is not None and params > 0:
            per_question = len(question.encode())
            tokens = sum(
                per_question + PRM_TOKEN_OVERHEAD + sum(len(s.encode()) for s in steps)
                for steps in solutions
            )
            if 2 * params * tokens > remaining:
                # No room to score: every step gets the lowest score, and the meter says so.
                self.meter.limited = True
                return [[0.0] * len(steps) for steps in solutions]
        call = PRMUsage()
        result = await self.inner.score(question, solutions, call)
        usage.add(call)
        self.meter.spent += self.meter.counter.prm_flops(call)
        return result


def _no_room() -> Generation:
    return Generation(text="", token_ids=[], finish_reason="length", stop_reason=None)
