"""The options calibration measures and `fit` chooses among, named as in the records file:

- `pilot`: best-of-N with the pilot's k samples (its candidates give the difficulty features);
- `best_of_n@4`: a strategy with n samples after the pilot (what a client budget leaves);
- `fixed:dvts@8`: a reference, a fixed strategy at the whole client budget and no pilot;
- `adaptive@4:r2:m2:g4`: adaptive sampling after the pilot, replayed from `best_of_n@4` (not
  requested as a route); `adaptive@4:r2:m-:g-:b0.95` stops by the Beta rule instead;
- `fixed:adaptive@8`, `deepconf@4`, `fixed:deepconf@8`: the early-stopping strategies a client can
  name, measured live like the others (`adaptive` with the server's Beta rule).

And what `auto` would answer and spend on one problem taking an option after the pilot.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tts_server.router import Route, stops_sampling
from tts_server.selection import select
from tts_server.strategies import REGISTRY
from tts_server.tools.datasets import is_correct
from tts_server.types import CONFIDENCE_RULES, Candidate, SelectionRule

SEARCH_WIDTH = 4
SEARCHES = tuple(name for name, s in REGISTRY.items() if s.uses_beam_width)


def width_for(strategy: str, n: int) -> int:
    """The beam width a calibrated strategy runs with N samples."""
    return min(SEARCH_WIDTH, n) if strategy in SEARCHES else 1


PILOT = "pilot"
ADAPTIVE = "adaptive"
# The stopping rules calibration tries for "adaptive": (round size, stop margin, give up after,
# Beta threshold): the margin rules, and Aggarwal et al.'s Beta rule alone.
AdaptiveRule = tuple[int, int | None, int | None, float | None]
ADAPTIVE_RULES: tuple[AdaptiveRule, ...] = (
    *(
        (size, margin, give_up, None)
        for size in (1, 2)
        for margin in (2, 3, None)
        for give_up in (4, 5, 6, None)
        if margin is not None or give_up is not None
    ),
    *((size, None, None, beta) for size in (1, 2) for beta in (0.8, 0.9, 0.95)),
)
# Reference options: a fixed strategy at the whole client budget, no pilot ("fixed:dvts@8").
FIXED = "fixed:"


def adaptive_option(
    n: int, size: int, margin: int | None, give_up: int | None, beta: float | None = None
) -> str:
    """`adaptive@4:r2:m2:g4`: up to n samples after the pilot, rounds of 2, stop 2 ahead or
    after 4 samples with no two equal answers (`-`: that rule is off); `:b0.95` adds the Beta
    rule's threshold."""

    def part(value: int | None) -> str:
        return "-" if value is None else str(value)

    name = f"{ADAPTIVE}@{n}:r{size}:m{part(margin)}:g{part(give_up)}"
    return name if beta is None else f"{name}:b{beta:g}"


def is_replayed_adaptive(option: str) -> bool:
    """An adaptive route replayed from best-of-N records (not a measured option)."""
    return option.startswith(ADAPTIVE + "@") and ":" in option


def adaptive_route(option: str) -> tuple[int, Route]:
    """(n, route) of an `adaptive_option` name."""
    head, size, margin, give_up, *beta = option.split(":")

    def number(part: str) -> int | None:
        return None if part[1:] == "-" else int(part[1:])

    route = Route(
        ADAPTIVE,
        round_size=int(size[1:]),
        stop_margin=number(margin),
        give_up_after=number(give_up),
        beta_threshold=float(beta[0][1:]) if beta else None,
    )
    return int(head.partition("@")[2]), route


def auto_cost(records: dict[str, dict[str, Any]], option: str) -> tuple[bool, float]:
    """What `auto` would get and spend on a problem if it took `option` after the pilot."""
    pilot = records[PILOT]
    pilot_flops = float(pilot["flops"] or 0)
    if option == PILOT:
        return bool(pilot["correct"]), pilot_flops
    if is_replayed_adaptive(option):
        return _adaptive_cost(records, option)
    routed = records[option]
    return _merged_correct(pilot, routed), pilot_flops + float(routed["flops"] or 0)


def _adaptive_cost(records: dict[str, dict[str, Any]], option: str) -> tuple[bool, float]:
    """Replay adaptive sampling on the recorded best-of-N samples, in their order, as the engine
    draws them: rounds until the stopping rule holds or the n samples are spent. The FLOPs of the
    drawn samples are their share of the best-of-N call's (per-sample counts are not recorded)."""
    n, route = adaptive_route(option)
    pilot, samples = records[PILOT], records[f"best_of_n@{n}"]
    if "answers" not in pilot or "answers" not in samples:
        raise ValueError(
            f"problem {pilot['id']}: its records keep no candidates, so adaptive sampling cannot "
            "be replayed (measure it again, or leave adaptive out of --strategies)"
        )
    answers = list(pilot["answers"])
    drawn = 0
    while drawn < n and not stops_sampling(answers, route):
        step = min(route.round_size, n - drawn)
        answers.extend(samples["answers"][drawn : drawn + step])
        drawn += step
    flops = float(pilot["flops"] or 0) + float(samples["flops"] or 0) * drawn / n
    if drawn == 0:
        return bool(pilot["correct"]), flops
    drawn_part = {
        **samples,
        "answers": samples["answers"][:drawn],
        "scores": samples["scores"][:drawn],
    }
    return _merged_correct(pilot, drawn_part), flops


def _merged_correct(pilot: dict[str, Any], routed: dict[str, Any]) -> bool:
    """Whether the answer `auto` serves is right: like the engine, it selects among the pilot's
    and the routed strategy's candidates together (majority vote after a majority route). Records
    written before candidates were kept fall back to the routed strategy's own answer."""
    if "answers" not in pilot or "answers" not in routed or "expected" not in routed:
        return bool(routed["correct"])
    strategy = str(routed["option"]).partition("@")[0]
    recorded = routed.get("selection")
    if recorded in CONFIDENCE_RULES:
        # A confidence vote needs each candidate's confidence, measured with the server's
        # settings: the routed strategy's own answer stands for the merged one.
        return bool(routed["correct"])
    rule: SelectionRule = "weighted"
    if strategy in ("majority", "adaptive", "deepconf"):  # as `auto` merges them
        rule = "majority"
    elif recorded in ("naive", "weighted", "majority"):
        rule = recorded
    candidates = [
        # Scores are already aggregated: one "step" holding the score keeps it under "last".
        Candidate(step_scores=[float(score)], finished=True, answer=answer)
        for part in (pilot, routed)
        for answer, score in zip(part["answers"], part["scores"], strict=False)
    ]
    if not candidates:
        return False
    return is_correct(select(candidates, rule, "last").answer, str(routed["expected"]))


def route_of(option: str, pilot: int, client_budget: int | None) -> Route:
    """The route a table serves for a chosen option, with its share of the client budget."""
    if option == PILOT:
        return Route("pilot")
    if is_replayed_adaptive(option):
        n, route = adaptive_route(option)
    else:
        strategy, _, measured = option.partition("@")
        n = int(measured)
        route = Route(strategy, width_for(strategy, n))
    share = 1.0 if client_budget is None else min(1.0, (pilot + n) / client_budget)
    return dataclasses.replace(route, budget_share=round(share, 4))
