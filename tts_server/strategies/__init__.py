"""Test-time-scaling strategies: one signature, registered by name."""

from __future__ import annotations

from tts_server.strategies.beam_search import beam_search
from tts_server.strategies.best_of_n import best_of_n
from tts_server.strategies.common import StrategyFn
from tts_server.strategies.dvts import dvts
from tts_server.strategies.greedy import greedy
from tts_server.strategies.majority import majority

STRATEGIES: dict[str, StrategyFn] = {
    "greedy": greedy,
    "majority": majority,
    "best_of_n": best_of_n,
    "beam_search": beam_search,
    "dvts": dvts,
}

__all__ = ["STRATEGIES", "StrategyFn", "beam_search", "best_of_n", "dvts", "greedy", "majority"]
