"""Test-time-scaling strategies: one signature (`StrategyFn`), one registry of what each needs."""

from __future__ import annotations

from dataclasses import dataclass

from tts_server.strategies.adaptive import adaptive
from tts_server.strategies.auto import auto
from tts_server.strategies.beam_search import beam_search
from tts_server.strategies.best_of_n import best_of_n
from tts_server.strategies.common import StrategyFn
from tts_server.strategies.deepconf import deepconf
from tts_server.strategies.dvts import dvts
from tts_server.strategies.greedy import greedy
from tts_server.strategies.majority import majority
from tts_server.types import STRATEGY_NAMES


@dataclass(frozen=True)
class Strategy:
    run: StrategyFn
    # Scores candidates with the PRM (`auto` through its pilot and routes).
    needs_prm: bool
    # Splits its budget by a beam width (the width must divide the budget).
    uses_beam_width: bool = False
    # A client may name it; otherwise only a route of `auto` runs it.
    requestable: bool = True


REGISTRY: dict[str, Strategy] = {
    "auto": Strategy(auto, needs_prm=True),
    "greedy": Strategy(greedy, needs_prm=False),
    "majority": Strategy(majority, needs_prm=False),
    "best_of_n": Strategy(best_of_n, needs_prm=True),
    "beam_search": Strategy(beam_search, needs_prm=True, uses_beam_width=True),
    "dvts": Strategy(dvts, needs_prm=True, uses_beam_width=True),
    # Early stopping by vote (adaptive consistency) and by confidence (DeepConf online).
    "adaptive": Strategy(adaptive, needs_prm=False),
    "deepconf": Strategy(deepconf, needs_prm=False),
}
assert tuple(n for n, s in REGISTRY.items() if s.requestable) == STRATEGY_NAMES

__all__ = [
    "REGISTRY",
    "Strategy",
    "StrategyFn",
    "adaptive",
    "auto",
    "beam_search",
    "best_of_n",
    "dvts",
    "greedy",
    "majority",
]
