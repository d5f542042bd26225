"""What one request spends, counted in one place: every policy and PRM call goes through an
`Account`, which adds its usage to the request's totals, times it (generation, prm_scoring) and,
under a FLOPs ceiling (`X-TTS-Max-FLOPs`), never lets the request pass it.

Before each call under a ceiling the account reserves the call's worst case (nothing cached,
every sample runs to its token limit) and shrinks the call to fit what is left: fewer tokens per
sample, or no call at all. Strategies need not know: a sample with no room comes back empty with
finish "length", which ends its candidate; a PRM call with no room scores every step 0.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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
class Account:
    """One request's spending: usage and seconds per upstream, FLOPs against its ceiling."""

    counter: FlopsCounter
    ceiling: int | None = None
    policy_usage: PolicyUsage = field(default_factory=PolicyUsage)
    prm_usage: PRMUsage = field(default_factory=PRMUsage)
    generation_s: float = 0.0
    prm_scoring_s: float = 0.0
    spent: int = 0  # FLOPs, counted only under a ceiling
    limited: bool = False  # a call was shrunk or skipped to stay under the ceiling
    samples: int = 0  # drawn so far: a seeded request's next call starts its seeds past them

    @property
    def remaining(self) -> int | None:
        return None if self.ceiling is None else self.ceiling - self.spent

    def wrap(self, policy: PolicyClient, prm: PRMClient) -> tuple[AccountedPolicy, AccountedPRM]:
        return AccountedPolicy(policy, self), AccountedPRM(prm, self)


class AccountedPolicy:
    """A PolicyClient whose calls are counted and timed by `account`, and kept under its ceiling."""

    def __init__(self, inner: PolicyClient, account: Account) -> None:
        self.inner = inner
        self.account = account

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        n: int = 1,
    ) -> list[list[Generation]]:
        account = self.account
        remaining = account.remaining
        if remaining is not None:
            lengths = [len(p) for p in prompts]
            max_tokens = self._fitting_max_tokens(lengths, sampling.max_tokens, n, remaining)
            if max_tokens < 1:
                account.limited = True
                return [[_no_room() for _ in range(n)] for _ in prompts]
            if max_tokens < sampling.max_tokens:
                account.limited = True
                sampling = replace(sampling, max_tokens=max_tokens)
        if sampling.seed is not None:
            # The client seeds sample i of a call with seed + i; without an offset every call of
            # a request would start again at the seed and redraw its earlier samples (auto's
            # route the pilot's, adaptive's rounds the first), which then vote as agreement.
            sampling = replace(sampling, seed=sampling.seed + account.samples)
        account.samples += len(prompts) * n
        started = time.perf_counter()
        call = PolicyUsage()
        try:
            return await self.inner.generate(prompts, sampling, call, n=n)
        finally:
            usage.add(call)
            account.policy_usage.add(call)
            account.generation_s += time.perf_counter() - started
            if account.ceiling is not None:
                account.spent += account.counter.policy_flops(call)[0]

    def _fitting_max_tokens(self, lengths: list[int], wanted: int, n: int, budget: int) -> int:
        """The largest token limit <= wanted whose worst case fits `budget` (0 if none)."""
        worst = self.account.counter.worst_case_generate
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


class AccountedPRM:
    """A PRMClient under the same account. Under a ceiling, the worst case of a call is bounded by
    its UTF-8 bytes (a token is at least one byte) plus a template overhead per solution."""

    def __init__(self, inner: PRMClient, account: Account) -> None:
        self.inner = inner
        self.account = account

    async def score(
        self, question: str, solutions: Sequence[Sequence[str]], usage: PRMUsage
    ) -> list[list[float]]:
        account = self.account
        remaining = account.remaining
        if remaining is not None:
            assert account.counter.prm is not None, "a ceiling needs the PRM's size"
            params = account.counter.prm.parameters
            per_question = len(question.encode())
            tokens = sum(
                per_question + PRM_TOKEN_OVERHEAD + sum(len(s.encode()) for s in steps)
                for steps in solutions
            )
            if params > 0 and 2 * params * tokens > remaining:
                # No room to score: every step gets the lowest score, and the account says so.
                account.limited = True
                return [[0.0] * len(steps) for steps in solutions]
        started = time.perf_counter()
        call = PRMUsage()
        try:
            return await self.inner.score(question, solutions, call)
        finally:
            usage.add(call)
            account.prm_usage.add(call)
            account.prm_scoring_s += time.perf_counter() - started
            if account.ceiling is not None:
                account.spent += account.counter.prm_flops(call)


def _no_room() -> Generation:
    return Generation(text="", token_ids=[], finish_reason="length", stop_reason=None)
