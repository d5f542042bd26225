"""Pieces every strategy shares: sampling settings, steps, continuing candidates, scoring."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence

from tts_server.answers import extract_answer, has_final_answer
from tts_server.confidence import TokenLogprob
from tts_server.selection import Selection, aggregate, select
from tts_server.types import (
    VOTES,
    Candidate,
    Generation,
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    Problem,
    SamplingConfig,
    SearchConfig,
    SelectionRule,
    StrategyResult,
)

StrategyFn = Callable[
    [Problem, SearchConfig, PolicyClient, PRMClient | None], Awaitable[StrategyResult]
]


def split_steps(text: str, delimiter: str) -> list[str]:
    """Cut a whole solution into steps, each keeping its delimiter: "".join(steps) == text.

    A whitespace-only piece joins the step before it (the first non-blank one if it leads).
    """
    steps: list[str] = []
    pending = ""  # leading blank pieces, waiting for the first real step
    pieces = text.split(delimiter)
    for k, piece in enumerate(pieces):
        chunk = piece if k == len(pieces) - 1 else piece + delimiter
        if not chunk:
            continue
        if chunk.strip():
            steps.append(pending + chunk)
            pending = ""
        elif steps:
            steps[-1] += chunk
        else:
            pending += chunk
    if pending:
        steps.append(pending)
    return steps


def strip_solution_stop(generation: Generation, config: SearchConfig) -> str:
    """The generated text without the solution stop that ended it (vLLM includes it)."""
    stop = generation.stop_reason
    if stop and stop in config.solution_stops:
        return generation.text.removesuffix(stop)
    return generation.text


def full_sampling(config: SearchConfig, *, temperature: float | None = None) -> SamplingConfig:
    """Sampling for whole solutions: only the solution stops end them."""
    return SamplingConfig(
        temperature=config.temperature if temperature is None else temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        stop=config.solution_stops,
        seed=config.seed,
        passthrough=config.passthrough,
        logprobs=config.confidence.sample,
    )


def covering(tokens: list[TokenLogprob] | None, length: int) -> list[TokenLogprob] | None:
    """The leading tokens that make up the first `length` characters of their text: what is
    left of a generation's tokens once its text was cut (a stop string, a ramble)."""
    if tokens is None:
        return None
    kept: list[TokenLogprob] = []
    at = 0
    for token in tokens:
        if at >= length:
            break
        kept.append(token)
        at += len(token.token)
    return kept


def solution_candidate(generation: Generation, config: SearchConfig) -> Candidate:
    """A finished candidate from one whole generated solution."""
    steps = split_steps(strip_solution_stop(generation, config), config.step_delimiter)
    # A solution ends at its first stated answer; what a small model rambles on with after it
    # is cut (its tokens still count in usage). Not in a text held to a format (JSON, a tool
    # call): a cut would break it.
    formatted = config.passthrough.response_format is not None
    for k, step in enumerate(steps):
        if not formatted and has_final_answer(step):
            steps = steps[: k + 1]
            break
    text = "".join(steps)
    candidate = Candidate(
        steps=steps,
        token_ids=list(generation.token_ids),
        finished=True,
        finish_reason=generation.finish_reason,
        answer=extract_answer(text),
        logprobs=covering(generation.logprobs, len(text)),
    )
    if config.progress is not None:
        config.progress.add(candidate)
    return candidate


async def whole_solutions(
    policy: PolicyClient,
    problem: Problem,
    config: SearchConfig,
    usage: PolicyUsage,
    *,
    n: int,
    temperature: float | None = None,
) -> list[Candidate]:
    """`n` whole solutions in one call; each becomes a candidate as soon as it arrives, so a
    deadline that cuts the call short still has the ones that finished."""
    arrived: dict[int, Candidate] = {}

    def on_sample(index: int, generation: Generation) -> None:
        arrived[index] = solution_candidate(generation, config)

    sampling = full_sampling(config, temperature=temperature)
    if config.progress is not None:
        sampling = dataclasses.replace(sampling, on_sample=on_sample)
    [generations] = await policy.generate([problem.prompt_ids], sampling, usage, n=n)
    return [arrived.get(j) or solution_candidate(g, config) for j, g in enumerate(generations)]


def clone(candidate: Candidate) -> Candidate:
    return dataclasses.replace(
        candidate,
        steps=list(candidate.steps),
        token_ids=list(candidate.token_ids),
        step_scores=list(candidate.step_scores),
        logprobs=None if candidate.logprobs is None else list(candidate.logprobs),
    )


def step_token_cap(candidate: Candidate, config: SearchConfig, *, last: bool) -> int:
    """Tokens the candidate's next step may use: a step's worth, or all that is left at the end."""
    remaining = config.max_tokens - len(candidate.token_ids)
    return remaining if last else min(config.max_step_tokens, remaining)


async def expand(
    problem: Problem,
    parents: Sequence[Candidate],
    config: SearchConfig,
    policy: PolicyClient,
    usage: PolicyUsage,
    *,
    n: int,
    last: bool,
    affinity: Sequence[str] | None = None,
) -> list[list[Candidate]]:
    """Sample `n` next steps for every (unfinished) parent in ONE policy call; `affinity`
    labels the parents that belong together (a subtree each), None: all one request.

    result[i][j] is parent i extended by its j-th sample. Each parent is continued from
    exactly its token ids. One call has one token limit, the smallest of the parents' caps;
    a parent cut short by that shared limit (not by its own) stays open and its next sample
    completes the same step. The last iteration drops the step delimiter from the stops.
    """
    if not parents:
        return []
    caps = [step_token_cap(p, config, last=last) for p in parents]
    stops = config.solution_stops if last else (config.step_delimiter, *config.solution_stops)
    sampling = SamplingConfig(
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=min(caps),
        stop=tuple(dict.fromkeys(stops)),
        seed=config.seed,
        passthrough=config.passthrough,
        logprobs=config.confidence.sample,
    )
    prompts = [[*problem.prompt_ids, *p.token_ids] for p in parents]
    samples = await policy.generate(prompts, sampling, usage, n=n, affinity=affinity)
    return [
        [extend(parent, g, config, cap=cap, last=last) for g in gens]
        for parent, cap, gens in zip(parents, caps, samples, strict=True)
    ]


def extend(
    parent: Candidate, generation: Generation, config: SearchConfig, *, cap: int, last: bool
) -> Candidate:
    """A copy of `parent` with `generation` as its next step, marked finished if it ends there."""
    child = clone(parent)
    child.token_ids.extend(generation.token_ids)
    text = strip_solution_stop(generation, config)
    if generation.logprobs is not None:
        # Each step continues from the parent's exact token ids, so its tokens' logprobs are
        # the ones a single pass would give at those positions: the steps' lists concatenate.
        before = len(child.text)
        step_tokens = covering(generation.logprobs, len(text)) or []
        child.logprobs = (covering(child.logprobs, before) or []) + step_tokens
    open_step = bool(child.steps) and not child.steps[-1].endswith(config.step_delimiter)
    step = child.steps[-1] + text if open_step else text

    reason: str | None = None
    if generation.stop_reason is not None and generation.stop_reason in config.solution_stops:
        reason = "stop"
    elif generation.finish_reason == "length":
        # Cut by the call's shared limit before its own cap: the step stays open. No token at
        # all means no room was left (a FLOPs ceiling): the candidate ends.
        if len(generation.token_ids) >= cap or not generation.token_ids:
            reason = "length"
    elif generation.stop_reason is None:
        reason = "stop"  # EOS
    elif not step.strip() or has_final_answer(step):
        reason = "stop"
    if reason is None and (last or len(child.token_ids) >= config.max_tokens):
        reason = "length"

    if open_step or (not text.strip() and child.steps):
        child.steps[-1] += text  # a blank step ends the solution; keep its text, not a step
    else:
        child.steps.append(text)
    # vLLM sees a stop only inside one call: one spanning two steps ("...15\n\n" then
    # "Question:") shows up in the joined text. The solution ends where it starts.
    kept, cut = cut_at_stops(child.text, config.solution_stops)
    if cut:
        child.steps = _cut_steps(child.steps, len(kept))
        child.logprobs = covering(child.logprobs, len(kept))
        reason = "stop"
    if reason is not None:
        child.finished, child.finish_reason = True, reason
        child.answer = extract_answer(child.text)
        if config.progress is not None:
            config.progress.add(child)
    return child


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text up to the first of `stops`, and whether one was found."""
    found = [i for i in (text.find(stop) for stop in stops if stop) if i >= 0]
    return (text[: min(found)], True) if found else (text, False)


def _cut_steps(steps: list[str], at: int) -> list[str]:
    """The steps of "".join(steps)[:at], an emptied last step dropped."""
    kept: list[str] = []
    for step in steps:
        if at <= 0:
            break
        kept.append(step[:at])
        at -= len(step)
    return [step for step in kept if step] or [""]


async def score(
    prm: PRMClient,
    problem: Problem,
    candidates: Sequence[Candidate],
    config: SearchConfig,
    usage: PRMUsage,
) -> None:
    """Score every candidate's steps in ONE PRM call and set `.score` (blank ones get zeros)."""
    scored = [c for c in candidates if c.text.strip()]
    for candidate in candidates:
        if not candidate.text.strip():
            candidate.step_scores = [0.0] * len(candidate.steps)
    if scored:
        results = await prm.score(problem.question, [list(c.steps) for c in scored], usage)
        for candidate, step_scores in zip(scored, results, strict=True):
            candidate.step_scores = list(step_scores)
    for candidate in candidates:
        candidate.score = aggregate(candidate.step_scores, config.aggregation)


def vote_rule(config: SearchConfig, default: SelectionRule = "majority") -> SelectionRule:
    """The rule a strategy without PRM scores selects by: the request's when it needs no score
    (majority, confidence, filtered), else `default`."""
    return config.selection if config.selection in VOTES else default


def require_prm(prm: PRMClient | None, strategy: str) -> PRMClient:
    if prm is None:
        raise ValueError(f"{strategy} needs a PRM")
    return prm


async def finish(
    candidates: list[Candidate],
    rule: SelectionRule,
    config: SearchConfig,
    *,
    iterations: int,
    policy_usage: PolicyUsage,
    prm_usage: PRMUsage,
) -> StrategyResult:
    """Select among `candidates` (off the event loop: math-verify is CPU work) and wrap up."""
    selection: Selection = await asyncio.to_thread(
        select, candidates, rule, config.aggregation, config.confidence
    )
    return StrategyResult(
        candidates=candidates,
        chosen=selection.chosen,
        answer=selection.answer,
        votes=selection.votes,
        iterations=iterations,
        policy_usage=policy_usage,
        prm_usage=prm_usage,
    )
