"""The interface every PRM backend implements: score the steps of a batch of solutions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

# One solution to score: (question, its steps).
ScoreItem = tuple[str, Sequence[str]]


class BackendError(Exception):
    """A backend cannot be built (unknown name, bad option, missing model files)."""


class BackendUnavailable(Exception):
    """The backend cannot score now (its model server is down, timing out or misconfigured):
    the worker answers 503, which the gateway retries and reads as the PRM being down. The
    message may reach clients: no prompt text, no addresses."""


class ItemsRejected(Exception):
    """Some items cannot be scored as given (over the PRM's context, refused by its server): the
    requests holding them are answered 400 with the reason; the others get `scores` (a row per
    item, [] for the rejected ones), so one bad solution does not fail the batch. `too_long`
    holds the items rejected for being over the PRM's context (the gateway tells its client to
    lower max_tokens)."""

    def __init__(
        self,
        reasons: dict[int, str],
        scores: list[list[float]],
        too_long: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__(f"{len(reasons)} of {len(scores)} solutions rejected")
        self.reasons = reasons
        self.scores = scores
        self.too_long = too_long


class PRMBackend(ABC):
    """A process reward model. `score_batch` is synchronous: the worker runs it in a thread.

    Calls are serialized by the worker (never concurrent), and every item has at least one step.
    """

    name: str
    model_name: str
    # Parameters doing multiply-adds per token (the FLOPs count's N); 0 for a rule-based checker,
    # None while unknown (the gateway then counts no FLOPs, unless TTS_PRM_PARAMS is set).
    parameters: int | None = 0

    @abstractmethod
    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        """result[i][k] in [0, 1] scores step k of items[i]; len(result[i]) == len(steps).

        Raises `ItemsRejected` or `BackendUnavailable`; any other exception is a 500.
        """

    def score_tails(self, items: Sequence[ScoreItem], first: Sequence[int]) -> list[list[float]]:
        """Scores of steps[first[i]:] of each item: the steps before are context, already scored
        (a step's score depends only on the question and the steps up to it).

        Default: score every step and drop the context's. A model that reads the whole prefix in
        one pass computes the same tokens either way; a backend that pays per step overrides it.
        Raises as `score_batch`, `ItemsRejected.scores` holding the tails.
        """
        try:
            rows = self.score_batch(items)
        except ItemsRejected as exc:
            tails = [row[f:] for row, f in zip(exc.scores, first, strict=True)]
            raise ItemsRejected(exc.reasons, tails, exc.too_long) from exc
        return [row[f:] for row, f in zip(rows, first, strict=True)]

    def close(self) -> None:
        """Release connections or models when the worker stops (default: nothing to release)."""
        return None

    def healthy(self) -> bool:
        """Whether the backend can score now (the worker's /health); run in a thread."""
        return True

    def count_tokens(self, item: ScoreItem) -> int:
        """Tokens the backend processes for `item` (for usage reports). Default: words."""
        question, steps = item
        return len(question.split()) + sum(len(step.split()) for step in steps)
