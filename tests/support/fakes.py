"""In-process fakes of the policy and the PRM, implementing the same protocols as the real clients.

Tokens are characters (`encode`/`decode`), so a prompt decodes back to the text the model saw.
A `FakePolicy` script returns either a `Generation` (used as is) or the whole text the model
"wants" to write; the fake then applies the call's stop strings and token limit as vLLM does
(stop string included in the text, `stop_reason` naming it; `length` when the limit cuts it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tts_server.confidence import TokenLogprob
from tts_server.types import Generation, PolicyUsage, PRMUsage, SamplingConfig, TokenWatch

# (prompt token ids, index of the sample in the call: prompt i, sample j -> i * n + j)
Script = Callable[[list[int], int], "Generation | str"]
# (index of the sample as the script got it, position of the token) -> the token's top logprobs,
# most likely first: the first is the sampled token's own.
TopLogprobs = Callable[[int, int], list[float]]
StepScorer = Callable[[Sequence[str]], list[float]]


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids: Sequence[int]) -> str:
    return "".join(chr(i) for i in ids)


def gen(text: str, finish_reason: str = "stop", stop_reason: str | None = None) -> Generation:
    """A generation whose token ids are its characters."""
    assert finish_reason in ("stop", "length")
    return Generation(
        text, encode(text), "stop" if finish_reason == "stop" else "length", stop_reason
    )


def simulate(intended: str, sampling: SamplingConfig) -> Generation:
    """What vLLM returns when the model would write `intended` and then EOS."""
    earliest: tuple[int, str] | None = None
    for stop in sampling.stop:
        at = intended.find(stop)
        if at >= 0 and (earliest is None or at + len(stop) < earliest[0]):
            earliest = (at + len(stop), stop)
    if earliest is not None and earliest[0] <= sampling.max_tokens:
        return gen(intended[: earliest[0]], "stop", earliest[1])
    if len(intended) > sampling.max_tokens:
        return gen(intended[: sampling.max_tokens], "length")
    return gen(intended, "stop")


@dataclass
class PolicyCall:
    prompts: list[list[int]]
    n: int
    sampling: SamplingConfig
    affinity: list[str] | None = None  # one key per prompt, as the call carried them


def with_logprobs(generation: Generation, sample: int, top: TopLogprobs, k: int) -> Generation:
    """The generation with each token's top logprobs (`top`, at most k+1: vLLM's dict holds
    the sampled token beside the top k); the alternatives are named "alt1", "alt2", ..."""
    tokens = []
    for position, token in enumerate(generation.text):
        values = top(sample, position)
        ranked = ((token, values[0]), *((f"alt{r}", lp) for r, lp in enumerate(values[1:], 1)))
        tokens.append(TokenLogprob(token, values[0], ranked[: k + 1]))
    return Generation(
        generation.text,
        generation.token_ids,
        generation.finish_reason,
        generation.stop_reason,
        logprobs=tokens,
    )


@dataclass
class StreamRecord:
    """One streamed sample: how many tokens it had sent when it ended, and whether the caller
    closed it before its end."""

    sample: int
    tokens: int
    closed: bool


@dataclass
class FakePolicy:
    script: Script
    calls: list[PolicyCall] = field(default_factory=list)
    # Each token's top logprobs when a call asks for logprobs (None: every token -0.1, -3.0, ...).
    top_logprobs: TopLogprobs | None = None
    # `stream` calls, in order; a streamed sample's script index is the number of samples this
    # fake drew before it (so after a call of 4 samples, streams are samples 4, 5, ...).
    streams: list[StreamRecord] = field(default_factory=list)
    drawn: int = 0

    def _logprobs(self, generation: Generation, sample: int, k: int | None) -> Generation:
        if k is None or generation.logprobs is not None:
            return generation
        top = self.top_logprobs or (lambda _s, _p: [-0.1, -3.0, -4.0, -5.0, -6.0, -7.0])
        return with_logprobs(generation, sample, top, k)

    async def stream(
        self,
        prompt: Sequence[int],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        watch: TokenWatch,
        *,
        affinity: str | None = None,
    ) -> Generation:
        sample = self.drawn
        self.drawn += 1
        self.calls.append(PolicyCall([list(prompt)], 1, sampling, None))
        out = self.script(list(prompt), sample)
        whole = simulate(out, sampling) if isinstance(out, str) else out
        whole = self._logprobs(whole, sample, sampling.logprobs)
        tokens = whole.logprobs or []
        sent = len(whole.token_ids)
        for i, token in enumerate(tokens):
            if watch(token):
                sent = i + 1
                break
        closed = sent < len(whole.token_ids)
        self.streams.append(StreamRecord(sample, sent, closed))
        usage.add(PolicyUsage(prompt_tokens=len(prompt), completion_tokens=sent, calls=1))
        if not closed:
            return whole
        return Generation(
            whole.text[:sent],
            whole.token_ids[:sent],
            "length",
            None,
            logprobs=tokens[:sent] if whole.logprobs is not None else None,
            cancelled=True,
        )

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        usage: PolicyUsage,
        *,
        n: int = 1,
        affinity: Sequence[str] | None = None,
    ) -> list[list[Generation]]:
        keys = None if affinity is None else list(affinity)
        self.calls.append(PolicyCall([list(p) for p in prompts], n, sampling, keys))
        result: list[list[Generation]] = []
        for i, prompt in enumerate(prompts):
            samples = []
            for j in range(n):
                out = self.script(list(prompt), i * n + j)
                generation = simulate(out, sampling) if isinstance(out, str) else out
                samples.append(self._logprobs(generation, i * n + j, sampling.logprobs))
            result.append(samples)
        self.drawn += len(prompts) * n
        usage.add(
            PolicyUsage(
                prompt_tokens=sum(len(p) for p in prompts) * n,
                completion_tokens=sum(len(g.token_ids) for s in result for g in s),
                calls=1,
            )
        )
        return result


@dataclass
class PRMCall:
    question: str
    solutions: list[list[str]]
    context: list[int] = field(default_factory=list)  # leading steps not to score, per solution
    affinity: str | None = None


def tails(rows: list[list[float]], context: Sequence[int] | None) -> list[list[float]]:
    """Each row without its first context[i] scores: what a PRM answers for steps given as
    context (every fake PRM honours `context` as the real worker does)."""
    if context is None:
        return rows
    return [row[first:] for row, first in zip(rows, context, strict=True)]


@dataclass
class FakePRM:
    scorer: StepScorer
    calls: list[PRMCall] = field(default_factory=list)

    async def score(
        self,
        question: str,
        solutions: Sequence[Sequence[str]],
        usage: PRMUsage,
        *,
        context: Sequence[int] | None = None,
        affinity: str | None = None,
    ) -> list[list[float]]:
        first = list(context) if context is not None else [0] * len(solutions)
        self.calls.append(PRMCall(question, [list(s) for s in solutions], first, affinity))
        rows = tails([self.scorer(steps) for steps in solutions], context)
        usage.calls += 1
        usage.steps_scored += sum(len(row) for row in rows)
        return rows


def per_step(score_of: Callable[[str], float]) -> StepScorer:
    """A scorer that scores each step on its own text."""
    return lambda steps: [score_of(step) for step in steps]
