"""DeepConf online (Fu et al. 2025): confidence-filtered voting that stops bad traces early.

1. Warm-up: `warmup` whole traces in one call, sampled with top-k logprobs. Their lowest-group
   confidences set the threshold s, the `100 * (1 - keep)`-th percentile (keep 0.9: the 10th
   percentile, DeepConf-high; keep 0.1: the 90th, DeepConf-low).
2. Then traces are streamed from vLLM in rounds of `round_size`; a trace whose current group
   confidence (the last `window` tokens) falls below s is closed there (vLLM aborts the request
   when its client goes away: no engine patch). A trace that has stated its answer is no longer
   judged: the rest of it is cut from the solution anyway.
3. After the warm-up and after each round, stop once the vote's leading answer holds `consensus`
   of the vote's weight, or once the budget (traces started, closed ones included) is spent.

Closed traces never vote; their tokens count in usage and FLOPs like any other. The vote is the
request's when it needs no PRM score (majority, confidence, filtered), else confidence-weighted.
"""

from __future__ import annotations

import asyncio
import dataclasses

from tts_server.answers import has_final_answer
from tts_server.confidence import GroupMonitor, TokenLogprob, percentile
from tts_server.selection import measure, select
from tts_server.strategies.common import (
    covering,
    finish,
    full_sampling,
    solution_candidate,
    split_steps,
    strip_solution_stop,
    vote_rule,
    whole_solutions,
)
from tts_server.types import (
    Candidate,
    PolicyClient,
    PolicyUsage,
    PRMClient,
    PRMUsage,
    Problem,
    SearchConfig,
    SelectionRule,
    StrategyResult,
    StreamingPolicy,
)


async def deepconf(
    problem: Problem, config: SearchConfig, policy: PolicyClient, prm: PRMClient | None
) -> StrategyResult:
    streaming = _streaming(policy)
    confidence, online = config.confidence, config.deepconf
    if confidence.sample is None:  # it cannot work without logprobs
        config = dataclasses.replace(
            config, confidence=dataclasses.replace(confidence, sample=confidence.k)
        )
        confidence = config.confidence
    rule = vote_rule(config, default="confidence")
    usage = PolicyUsage()
    warm = await whole_solutions(
        policy, problem, config, usage, n=min(max(online.warmup, 1), config.budget)
    )
    measure(warm, confidence)
    lows = [c.confidence.lowest_group for c in warm if c.confidence is not None]
    threshold = percentile(lows, 100 * (1 - online.keep)) if lows else None
    candidates = list(warm)
    rounds = 1
    while len(candidates) < config.budget and not await _agreed(candidates, rule, config):
        size = min(max(online.round_size, 1), config.budget - len(candidates))
        drawn = await asyncio.gather(
            *(_trace(streaming, problem, config, usage, threshold) for _ in range(size))
        )
        candidates.extend(drawn)
        rounds += 1
    return await finish(
        candidates, rule, config, iterations=rounds, policy_usage=usage, prm_usage=PRMUsage()
    )


def _streaming(policy: PolicyClient) -> StreamingPolicy:
    if not callable(getattr(policy, "stream", None)):
        raise ValueError("deepconf needs a policy client that streams")
    return policy  # type: ignore[return-value]  # checked just above


async def _agreed(candidates: list[Candidate], rule: SelectionRule, config: SearchConfig) -> bool:
    """The vote's leader holds `consensus` of its weight (finished, answered traces vote)."""
    voters = [c for c in candidates if c.finished]
    if not voters:
        return False
    chosen = await asyncio.to_thread(select, voters, rule, config.aggregation, config.confidence)
    total = sum(chosen.votes.values())
    if chosen.answer is None or total <= 0:
        return False
    return chosen.votes[chosen.answer] / total >= config.deepconf.consensus


async def _trace(
    policy: StreamingPolicy,
    problem: Problem,
    config: SearchConfig,
    usage: PolicyUsage,
    threshold: float | None,
) -> Candidate:
    """One streamed trace, closed if its group confidence falls below `threshold`."""
    confidence = config.confidence
    monitor = (
        GroupMonitor(k=confidence.k, window=confidence.window, threshold=threshold)
        if threshold is not None
        else None
    )
    text: list[str] = []
    answered = False

    def watch(token: TokenLogprob) -> bool:
        nonlocal answered
        text.append(token.token)
        if monitor is None or answered:
            return False
        answered = has_final_answer("".join(text))
        return monitor.add(token) and not answered

    generation = await policy.stream(problem.prompt_ids, full_sampling(config), usage, watch)
    if not generation.cancelled:
        candidate = solution_candidate(generation, config)
    else:
        kept = strip_solution_stop(generation, config)
        candidate = Candidate(
            steps=split_steps(kept, config.step_delimiter),
            token_ids=list(generation.token_ids),
            finished=False,
            finish_reason="cancelled",
            logprobs=covering(generation.logprobs, len(kept)),
        )
    measure([candidate], confidence)
    return candidate
