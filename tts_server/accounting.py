"""What one request spends, counted in one place: every policy and PRM call goes through an
`Account`, which adds its usage to the request's totals, times it (generation, prm_scoring) and,
under a FLOPs ceiling (`X-TTS-Max-FLOPs`), never lets the request pass it.

Before each call under a ceiling the account reserves the call's worst case (nothing cached,
every sample runs to its token limit) and shrinks the call to fit what is left: fewer tokens per
sample, or no call at all. Strategies need not know: a sample with no room comes back empty with
finish "length", which ends its candidate; a PRM call with no room scores every step 0.

The account also carries the request's `Affinity` (tts_server/affinity.py): it turns a
strategy's affinity labels into the request's keys on every call it passes on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from tts_server.affinity import Affinity
from tts_server.flops import FlopsCounter
from tts_server.prefixes import PrefixScores, prefix_keys
from tts_server.types import (
    Generation,
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    SamplingConfig,
    StreamingPolicy,
    TokenWatch,
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
    # FLOPs the calls in flight may still spend at most (a search whose subtrees advance on
    # their own has several at once): what is left for a new call is net of them.
    reserved: int = 0
    # Calls of each kind in flight, and since when one was: a stage's seconds are the wall
    # time during which at least one of its calls ran (concurrent calls are not added up).
    _running: dict[str, int] = field(default_factory=dict, repr=False)
    _since: dict[str, float] = field(default_factory=dict, repr=False)
    limited: bool = False  # a call was shrunk or skipped to stay under the ceiling
    samples: int = 0  # drawn so far: a seeded request's next call starts its seeds past them
    # Step scores by prefix for this request's search (None: every call scores every step).
    step_scores: PrefixScores | None = None
    # The request's pin (None: its calls carry no affinity key).
    affinity: Affinity | None = None
    # Told each call's cost as it returns: (policy tokens, FLOPs), e.g. a key's quota
    # (api/quotas.py). FLOPs are 0 while the models' sizes are unknown.
    on_spend: Callable[[int, int], None] | None = None

    @property
    def remaining(self) -> int | None:
        return None if self.ceiling is None else self.ceiling - self.spent - self.reserved

    def started(self, stage: str) -> None:
        if self._running.get(stage, 0) == 0:
            self._since[stage] = time.perf_counter()
        self._running[stage] = self._running.get(stage, 0) + 1

    def ended(self, stage: str) -> None:
        self._running[stage] -= 1
        if self._running[stage] == 0:
            elapsed = time.perf_counter() - self._since.pop(stage)
            if stage == "generation":
                self.generation_s += elapsed
            else:
                self.prm_scoring_s += elapsed

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
        affinity: Sequence[str] | None = None,
    ) -> list[list[Generation]]:
        account = self.account
        pin = account.affinity
        keys = pin.keys(affinity, len(prompts)) if pin is not None else None
        remaining = account.remaining
        reserve = 0
        if remaining is not None:
            lengths = [len(p) for p in prompts]
            max_tokens = self._fitting_max_tokens(lengths, sampling.max_tokens, n, remaining)
            if max_tokens < 1:
                account.limited = True
                return [[_no_room() for _ in range(n)] for _ in prompts]
            if max_tokens < sampling.max_tokens:
                account.limited = True
                sampling = replace(sampling, max_tokens=max_tokens)
            reserve = account.counter.worst_case_generate(lengths, max_tokens, samples=n)
        if sampling.seed is not None:
            # The client seeds sample i of a call with seed + i; without an offset every call of
            # a request would start again at the seed and redraw its earlier samples (auto's
            # route the pilot's, adaptive's rounds the first), which then vote as agreement.
            sampling = replace(sampling, seed=sampling.seed + account.samples)
        account.samples += len(prompts) * n
        account.reserved += reserve
        account.started("generation")
        call = PolicyUsage()
        try:
            return await self.inner.generate(prompts, sampling, call, n=n, affinity=keys)
        finally:
            usage.add(call)
            account.policy_usage.add(call)
            account.ended("generation")
            account.reserved -= reserve
            counted = account.ceiling is not None or account.on_spend is not None
            flops = (
                account.counter.policy_flops(call)[0] if counted and account.counter.policy else 0
            )
            if account.ceiling is not None:
                account.spent += flops
            if account.on_spend is not None:
                account.on_spend(call.prompt_tokens + call.completion_tokens, flops)

    async def stream(
        self,
        prompt: Sequence[int],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        watch: TokenWatch,
        *,
        affinity: str | None = None,
    ) -> Generation:
        """`generate`'s accounting for one streamed sample (DeepConf online): a sample closed
        midway is counted with the tokens it had generated. `affinity` is ignored: the call
        carries the request's key."""
        inner = self.inner
        if not callable(getattr(inner, "stream", None)):
            raise ValueError("this policy client cannot stream")
        account = self.account
        key = account.affinity.key() if account.affinity is not None else None
        remaining = account.remaining
        reserve = 0
        if remaining is not None:
            max_tokens = self._fitting_max_tokens([len(prompt)], sampling.max_tokens, 1, remaining)
            if max_tokens < 1:
                account.limited = True
                return _no_room()
            if max_tokens < sampling.max_tokens:
                account.limited = True
                sampling = replace(sampling, max_tokens=max_tokens)
            reserve = account.counter.worst_case_generate([len(prompt)], max_tokens, samples=1)
        if sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + account.samples)
        account.samples += 1
        account.reserved += reserve
        account.started("generation")
        call = PolicyUsage()
        try:
            streaming: StreamingPolicy = inner  # type: ignore[assignment]  # checked above
            return await streaming.stream(prompt, sampling, call, watch, affinity=key)
        finally:
            usage.add(call)
            account.policy_usage.add(call)
            account.ended("generation")
            account.reserved -= reserve
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
    """A PRMClient under the same account. A step scored for a prefix is kept in the account's
    `step_scores` (when it has them) and never sent again: an iteration sends each beam's new
    steps to be scored with the earlier ones as context, so a search of depth d asks for O(d)
    step scores per beam, not O(d^2); beams that are copies of each other are sent once.

    Under a ceiling, the worst case of a call is bounded by its UTF-8 bytes (a token is at least
    one byte) plus a template overhead per solution, context included: the PRM reads it."""

    def __init__(self, inner: PRMClient, account: Account) -> None:
        self.inner = inner
        self.account = account

    async def score(
        self,
        question: str,
        solutions: Sequence[Sequence[str]],
        usage: PRMUsage,
        *,
        context: Sequence[int] | None = None,
        affinity: str | None = None,
    ) -> list[list[float]]:
        """`affinity` is ignored: a PRM call carries the request's key (one call scores every
        subtree's candidates)."""
        first = list(context) if context is not None else [0] * len(solutions)
        cache = self.account.step_scores
        keys: list[list[bytes]] = [[] for _ in solutions]
        known: list[list[float]] = [[] for _ in solutions]
        if cache is not None:
            keys = [prefix_keys(question, steps) for steps in solutions]
            known = [cache.known(k, f) for k, f in zip(keys, first, strict=True)]
        start = [f + len(run) for f, run in zip(first, known, strict=True)]
        sent: dict[bytes | int, int] = {}  # a prefix to score -> the solution sent for it
        owner: list[int | None] = []  # per solution, the sent one whose scores it takes
        for i, steps in enumerate(solutions):
            if start[i] < len(steps):
                owner.append(sent.setdefault(keys[i][-1] if cache is not None else i, i))
            else:
                owner.append(None)
        order = list(sent.values())
        call = PRMUsage()
        tails: dict[int, list[float]] = {}
        if order:
            scored = await self._call(
                question, [solutions[i] for i in order], [start[i] for i in order], call
            )
            if scored is None:  # no room under the ceiling: the lowest score, not kept
                scored = [[0.0] * (len(solutions[i]) - start[i]) for i in order]
            elif cache is not None:
                for i, row in zip(order, scored, strict=True):
                    cache.put(keys[i][start[i] :], row)
            tails = dict(zip(order, scored, strict=True))
        reused = sum(len(run) for run in known)
        result: list[list[float]] = []
        for i, run in enumerate(known):
            j = owner[i]
            tail = tails[j] if j is not None else []
            if j is not None and j != i:
                reused += len(tail)
            result.append(run + tail)
        call.steps_scored += reused
        call.steps_cached += reused
        usage.add(call)
        self.account.prm_usage.add(call)
        return result

    async def _call(
        self, question: str, solutions: list[Sequence[str]], first: list[int], call: PRMUsage
    ) -> list[list[float]] | None:
        """The tails' scores, or None when the call does not fit under the ceiling."""
        account = self.account
        remaining = account.remaining
        reserve = 0
        if remaining is not None:
            assert account.counter.prm is not None, "a ceiling needs the PRM's size"
            params = account.counter.prm.parameters
            per_question = len(question.encode())
            tokens = sum(
                per_question + PRM_TOKEN_OVERHEAD + sum(len(s.encode()) for s in steps)
                for steps in solutions
            )
            reserve = 2 * params * tokens if params > 0 else 0
            if params > 0 and reserve > remaining:
                account.limited = True  # no room to score, and the account says so
                return None
        context = first if any(first) else None
        key = account.affinity.key() if account.affinity is not None else None
        account.reserved += reserve
        account.started("prm_scoring")
        try:
            return await self.inner.score(question, solutions, call, context=context, affinity=key)
        finally:
            account.ended("prm_scoring")
            account.reserved -= reserve
            counted = account.ceiling is not None or account.on_spend is not None
            flops = account.counter.prm_flops(call) if counted and account.counter.prm else 0
            if account.ceiling is not None:
                account.spent += flops
            if account.on_spend is not None and flops:
                account.on_spend(0, flops)


def _no_room() -> Generation:
    return Generation(text="", token_ids=[], finish_reason="length", stop_reason=None)
