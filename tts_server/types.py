"""Value objects and the two interfaces every strategy runs over: a policy and a PRM.

Strategies see only `PolicyClient` and `PRMClient`; the real clients speak HTTP to vLLM and to
the PRM worker, the fakes in tests implement the same protocols.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, get_args

from tts_server.confidence import Confidence, ConfidenceMetric, TokenLogprob

if TYPE_CHECKING:  # the router's table is a knob of `auto`; the router imports this module
    from tts_server.router import RouterTable
    from tts_server.search_tree import SearchTree

# "tool_calls": the answer is a function call (`Tools.call`), never a vLLM finish.
FinishReason = Literal["stop", "length", "tool_calls"]
Aggregation = Literal["last", "min", "prod", "mean"]
# `confidence` and `filtered` vote by DeepConf's trace confidence (tts_server/confidence.py).
SelectionRule = Literal["naive", "weighted", "majority", "confidence", "filtered"]
# What a client may ask for; the registry in `strategies` says what each one needs.
StrategyName = Literal[
    "auto", "greedy", "majority", "best_of_n", "beam_search", "dvts", "adaptive", "deepconf"
]
STRATEGY_NAMES: tuple[StrategyName, ...] = get_args(StrategyName)
AGGREGATIONS: tuple[Aggregation, ...] = get_args(Aggregation)
SELECTIONS: tuple[SelectionRule, ...] = get_args(SelectionRule)
# Rules that need no PRM score: what a strategy without a PRM may select by.
VOTES: tuple[SelectionRule, ...] = ("majority", "confidence", "filtered")
# Rules that need each candidate's confidence (so its tokens' top logprobs).
CONFIDENCE_RULES: tuple[SelectionRule, ...] = ("confidence", "filtered")


@dataclass
class Generation:
    """One sampled continuation as vLLM returned it."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    # The matched stop string, or None for EOS and for length (never infer truncation from it).
    stop_reason: str | None = None
    # Each token with its top logprobs, when the call asked for them (`SamplingConfig.logprobs`).
    logprobs: list[TokenLogprob] | None = None
    # Closed while it generated (DeepConf online): what it had generated, no finish of its own.
    cancelled: bool = False


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
    steps_scored: int = 0  # step scores the search used
    # Of steps_scored, those no PRM computed for this call: the search had them (a step scored
    # for a prefix is kept for every beam that extends it) or the worker's cache did.
    steps_cached: int = 0
    tokens: int = 0

    def add(self, other: PRMUsage) -> None:
        self.calls += other.calls
        self.steps_scored += other.steps_scored
        self.steps_cached += other.steps_cached
        self.tokens += other.tokens


@dataclass(frozen=True)
class PassThrough:
    """OpenAI sampling parameters sent to vLLM as the client gave them, on every sample of a
    request (`api.options` refuses them for the strategies that cannot honour them). Empty: the
    wire body is exactly as without them."""

    logit_bias: Mapping[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    response_format: Mapping[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        """The fields to add to a vLLM /v1/completions body (only those that ask for something)."""
        fields: dict[str, Any] = {}
        if self.logit_bias:
            fields["logit_bias"] = dict(self.logit_bias)
        if self.presence_penalty:
            fields["presence_penalty"] = self.presence_penalty
        if self.frequency_penalty:
            fields["frequency_penalty"] = self.frequency_penalty
        if self.response_format is not None:
            fields["response_format"] = dict(self.response_format)
        return fields


@dataclass(frozen=True)
class Tools:
    """A chat request's OpenAI tool definitions, rendered into the prompt by the model's chat
    template, and the function call the answer must be: a function's name, ANY_TOOL (any of
    them), or None (the answer is text)."""

    definitions: tuple[Mapping[str, Any], ...]
    call: str | None = None

    ANY_TOOL: ClassVar[str] = "*"


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    passthrough: PassThrough = PassThrough()
    # Top logprobs per generated token to ask vLLM for (None: no logprobs).
    logprobs: int | None = None
    # Called with (index in the call's flattened samples, generation) as each sample arrives,
    # where the client can tell (so a deadline can use samples finished before the call ends).
    on_sample: Callable[[int, Generation], None] | None = field(
        default=None, compare=False, repr=False
    )


@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class TextPrompt:
    text: str


@dataclass(frozen=True)
class Job:
    """One request, resolved once at the API edge from headers, body and settings: what to
    answer, with which strategy and sampling, within which budget, ceiling and deadline."""

    prompt: ChatPrompt | TextPrompt
    strategy: StrategyName
    requested: str  # as the client named it (or the server's default)
    budget: int
    beam_width: int  # 1 unless the strategy uses one
    aggregation: Aggregation
    selection: SelectionRule
    temperature: float
    top_p: float
    max_tokens: int
    stops: tuple[str, ...] = ()
    seed: int | None = None
    passthrough: PassThrough = PassThrough()
    tools: Tools | None = None
    # Choices to answer with: the n best distinct candidates (api.options checks n <= budget).
    n: int = 1
    max_flops: int | None = None
    deadline_s: float | None = None
    # Top logprobs per token the client wants with the answer's tokens (0: the tokens' own
    # logprobs only; None: no logprobs in the response).
    logprobs: int | None = None
    # Why the job is not run as asked (the PRM is down: majority vote instead).
    degraded: str | None = None
    # Write the search trace once answered (tts_server/traces.py).
    trace: bool = False
    # Put the search trace in the response (`tts.trace`, tts_server/search_trace.py).
    return_trace: bool = False


@dataclass(frozen=True)
class Difficulty:
    """The pilot's verdict on a question."""

    bin: str
    confidence: float
    mean_score: float
    agreement: float
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "bin": self.bin,
            "confidence": round(self.confidence, 4),
            "mean_score": round(self.mean_score, 4),
            "agreement": round(self.agreement, 4),
            "pilot_samples": self.samples,
        }


@dataclass
class Decision:
    """What `auto` decided: the difficulty bin (None for a table's fixed strategy) and what it
    served: a strategy ("pilot": the pilot alone) and the samples spent in all."""

    difficulty: Difficulty | None
    strategy: str
    budget: int
    beam_width: int
    early_exit: bool

    def route(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "budget": self.budget,
            "beam_width": self.beam_width,
            "early_exit": self.early_exit,
        }


@dataclass(frozen=True)
class StopRule:
    """When adaptive sampling stops: after each round of `round_size` samples, once the leading
    answer is `stop_margin` samples ahead, or `give_up_after` samples hold no two equal answers
    (None: that rule is off), or the Beta rule's posterior reaches `beta_threshold`."""

    round_size: int = 2
    stop_margin: int | None = 2
    give_up_after: int | None = 4
    # Aggarwal et al.'s Beta rule: stop once P(p_lead > p_second | counts) under
    # Beta(lead + 1, second + 1) reaches this (None: off).
    beta_threshold: float | None = None


class PolicyClient(Protocol):
    """Generates continuations of token-id prompts. One call = one batched upstream request."""

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        n: int = 1,
        affinity: Sequence[str] | None = None,
    ) -> list[list[Generation]]:
        """For each prompt, `n` independent samples (result[i][j] is sample j of prompt i).

        Adds what the call cost to `usage`. `affinity[i]` says which prompts belong together
        (tts_server/affinity.py): a strategy labels its independent subtrees (None: all one);
        the request's account turns labels into its keys, which a client sends so that calls
        with equal keys reach one replica. Never part of what is generated.
        """
        ...


class TokenWatch(Protocol):
    """Told each token of a streamed sample as it arrives; True closes the stream."""

    def __call__(self, token: TokenLogprob) -> bool: ...


class StreamingPolicy(PolicyClient, Protocol):
    """A policy that can also stream one sample and close it midway (DeepConf online)."""

    async def stream(
        self,
        prompt: Sequence[int],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        watch: TokenWatch,
        *,
        affinity: str | None = None,
    ) -> Generation:
        """One sample, streamed with its tokens' top logprobs (`sampling.logprobs`); as soon as
        `watch` says so the stream is closed (the server aborts the request) and the sample
        comes back `cancelled`, with what it had generated. Adds what the call cost to `usage`:
        a cancelled sample's tokens count."""
        ...


class PRMClient(Protocol):
    """Scores every step of candidate solutions of one question."""

    async def score(
        self,
        question: str,
        solutions: Sequence[Sequence[str]],
        usage: PRMUsage,
        *,
        context: Sequence[int] | None = None,
        affinity: str | None = None,
    ) -> list[list[float]]:
        """`affinity`: the request's key, sent so that its calls reach one replica.

        result[i][k] in [0, 1] is the score of step context[i] + k of solution i: the first
        context[i] steps (default 0) are read as context but not scored, so len(result[i]) is
        len(solutions[i]) - context[i]."""
        ...


class PolicyService(StreamingPolicy, Protocol):
    """The policy server as the engine uses it: generation, and what rendering prompts, the FLOPs
    count and readiness need (the vLLM client is one; test doubles implement the same)."""

    async def tokenize_chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        affinity: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]: ...

    async def tokenize_text(self, text: str, *, affinity: str | None = None) -> list[int]: ...

    async def model_root(self) -> str | None:
        """Where the server loaded the model from, if it says (its config.json gives the size)."""
        ...

    async def health(self) -> bool: ...

    async def aclose(self) -> None: ...


class PRMService(PRMClient, Protocol):
    """The PRM worker as the engine uses it: scoring, its size and its health."""

    async def parameters(self) -> int | None:
        """The PRM's parameter count (0 for a checker without weights; None: unknown)."""
        ...

    async def model_name(self) -> str | None:
        """The PRM's model id as its worker serves it (None: unknown, e.g. the worker is down)."""
        ...

    async def health(self) -> bool: ...

    async def aclose(self) -> None: ...


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
    passthrough: PassThrough = PassThrough()
    # `auto`: the table it routes by; `adaptive`: when it stops drawing.
    router: RouterTable | None = field(default=None, compare=False, repr=False)
    stopping: StopRule = StopRule()
    # Trace confidence: how it is measured, whether samples carry logprobs, what votes use.
    confidence: ConfidenceConfig = field(default_factory=lambda: ConfidenceConfig())
    # DeepConf online (`deepconf`).
    deepconf: DeepConfConfig = field(default_factory=lambda: DeepConfConfig())
    # Collects candidates as they finish, so a deadline can answer with the best so far.
    progress: Progress | None = field(default=None, compare=False, repr=False)
    # Records a step search's tree when the request's trace is wanted (None: nothing recorded).
    tree: SearchTree | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ConfidenceConfig:
    """`sample`: top logprobs per token to sample with (None: none, and no confidences); `k`,
    `window`, `tail`: DeepConf's measures (tts_server/confidence.py); `metric`: the one the
    `confidence` and `filtered` votes use; `keep`: the share of candidates `filtered` keeps."""

    sample: int | None = None
    k: int = 5
    window: int = 16
    tail: int = 32
    metric: ConfidenceMetric = "bottom_10"
    keep: float = 0.9


@dataclass(frozen=True)
class DeepConfConfig:
    """DeepConf online: `warmup` whole traces set the threshold, the `100 * (1 - keep)`-th
    percentile of their lowest-group confidences; then traces stream in rounds of `round_size`,
    each closed once a full window's confidence falls below it, until the vote's leading answer
    holds `consensus` of the weight or the budget is spent."""

    warmup: int = 4
    keep: float = 0.9
    round_size: int = 2
    consensus: float = 0.95


class Progress:
    """What one request's search has done so far, read while it runs (streaming progress) and
    after a deadline: finished candidates in the order they finished (scores fill in later),
    `auto`'s decision once made, and the seconds of stages a strategy times itself (the pilot)."""

    def __init__(self) -> None:
        self.finished: list[Candidate] = []
        self.decision: Decision | None = None
        self.stages: dict[str, float] = {}

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
    # Every token's top logprobs, in order over all its steps (None: sampled without them).
    logprobs: list[TokenLogprob] | None = None
    confidence: Confidence | None = None
    # Its node in the request's search tree (tts_server/search_tree.py); None: no tree.
    node: int | None = None

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
