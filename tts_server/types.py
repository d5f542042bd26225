"""Value objects and the two interfaces every strategy runs over: a policy and a PRM.

Strategies see only `PolicyClient` and `PRMClient`; the real clients speak HTTP to vLLM and to
the PRM worker, the fakes in tests implement the same protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length"]
Aggregation = Literal["last", "min", "prod", "mean"]
SelectionRule = Literal["naive", "weighted", "majority"]


@dataclass
class Generation:
    """One sampled continuation as vLLM returned it."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    # The matched stop string, or None for EOS and for length (never infer truncation from it).
    stop_reason: str | None = None


@dataclass
class PolicyUsage:
    """Tokens one request cost the policy server, counted as vLLM's own counters count them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    # Generate calls (one per strategy step) and the HTTP requests they took.
    calls: int = 0
    requests: int = 0
    # Sums of the positions of computed / cached prompt tokens and of generated tokens: what
    # attention's context term of the FLOPs count needs.
    context_computed: int = 0
    context_cached: int = 0

    def add(self, other: PolicyUsage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cached_tokens += other.cached_tokens
        self.calls += other.calls
        self.requests += other.requests
        self.context_computed += other.context_computed
        self.context_cached += other.context_cached


@dataclass
class PRMUsage:
    calls: int = 0
    steps_scored: int = 0
    steps_cached: int = 0  # of steps_scored, answered from the worker's cache
    tokens: int = 0

    def add(self, other: PRMUsage) -> None:
        self.calls += other.calls
        self.steps_scored += other.steps_scored
        self.steps_cached += other.steps_cached
        self.tokens += other.tokens


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Called with (index in the call's flattened samples, generation) as each sample arrives,
    # where the client can tell (so a deadline can use samples finished before the call ends).
    on_sample: Callable[[int, Generation], None] | None = field(
        default=None, compare=False, repr=False
    )


class PolicyClient(Protocol):
    """Generates continuations of token-id prompts. One call = one batched upstream request."""

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        n: int = 1,
    ) -> list[list[Generation]]:
        """For each prompt, `n` independent samples (result[i][j] is sample j of prompt i).

        Adds what the call cost to `usage`.
        """
        ...


class PRMClient(Protocol):
    """Scores every step of candidate solutions of one question."""

    async def score(
        self, question: str, solutions: Sequence[Sequence[str]], usage: PRMUsage
    ) -> list[list[float]]:
        """result[i][k] in [0, 1] is the score of step k of solution i (len equals its steps)."""
        ...


@dataclass(frozen=True)
class Problem:
    """What a strategy solves: the question for the PRM and the policy prompt, as token ids."""

    question: str
    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class SearchConfig:
    """Per-request knobs of a strategy (budget N, beam width M, selection...)."""

    budget: int = 8
    beam_width: int = 4
    aggregation: Aggregation = "last"
    selection: SelectionRule = "weighted"
    temperature: float = 0.8
    top_p: float = 1.0
    # Tokens per step for stepwise search, and per candidate in all.
    max_step_tokens: int = 256
    max_tokens: int = 1024
    max_iterations: int = 40
    step_delimiter: str = "\n\n"
    # Strings that end a whole solution (e.g. the next few-shot "Question:"); removed from text.
    solution_stops: tuple[str, ...] = ()
    seed: int | None = None
    # Collects candidates as they finish, so a deadline can answer with the best so far.
    progress: Progress | None = field(default=None, compare=False, repr=False)


class Progress:
    """Finished candidates of one request, in the order they finished (scores fill in later)."""

    def __init__(self) -> None:
        self.finished: list[Candidate] = []

    def add(self, candidate: Candidate) -> None:
        self.finished.append(candidate)


@dataclass
class Candidate:
    """A (partial or complete) solution: its steps, their token ids and PRM scores."""

    steps: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    step_scores: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    answer: str | None = None
    score: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.steps)


@dataclass
class StrategyResult:
    candidates: list[Candidate]
    chosen: int
    answer: str | None
    # Canonical answer -> vote weight (count for majority, summed score for weighted).
    votes: dict[str, float]
    iterations: int = 0
    policy_usage: PolicyUsage = field(default_factory=PolicyUsage)
    prm_usage: PRMUsage = field(default_factory=PRMUsage)

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]
