"""The interface every PRM backend implements: score the steps of a batch of solutions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

# One solution to score: (question, its steps).
ScoreItem = tuple[str, Sequence[str]]


class BackendError(Exception):
    """A backend cannot be built (unknown name, bad option, missing model files)."""


class PRMBackend(ABC):
    """A process reward model. `score_batch` is synchronous: the worker runs it in a thread.

    Calls are serialized by the worker (never concurrent), and every item has at least one step.
    """

    name: str
    model_name: str
    # Parameters doing multiply-adds per token (the FLOPs count's N); 0 for a rule-based checker.
    parameters: int = 0

    @abstractmethod
    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        """result[i][k] in [0, 1] scores step k of items[i]; len(result[i]) == len(steps)."""

    def count_tokens(self, item: ScoreItem) -> int:
        """Tokens the backend processes for `item` (for usage reports). Default: words."""
        question, steps = item
        return len(question.split()) + sum(len(step.split()) for step in steps)
