"""`--veto arith`: the arith checker as a veto over a learned PRM.

A learned PRM, small ones especially, can score a step with a wrong sum highly; the arith
checker cannot be fooled about an equation it can read, and says nothing about the rest. So
the veto keeps the PRM's score of every step except one holding an equation the checker finds
wrong (`equations.check_step`: `3 + 4 = 8`), which scores 0. Steps without a checkable equation,
right ones and final answers keep the PRM's score: the veto only ever lowers a score.
"""

from __future__ import annotations

from collections.abc import Sequence

from tts_server.prm_worker.backends.base import (
    BackendError,
    ItemsRejected,
    PRMBackend,
    ScoreItem,
)
from tts_server.prm_worker.backends.equations import check_step

VETOES = ("arith",)


class ArithVeto(PRMBackend):
    """`inner`'s scores, a step with a wrong equation set to 0; everything else is inner's."""

    def __init__(self, inner: PRMBackend) -> None:
        if inner.name == "arith":
            raise BackendError("the arith backend is the checker already: no veto needed")
        self.inner = inner
        self.name = inner.name
        self.model_name = inner.model_name

    @property
    def parameters(self) -> int | None:  # the inner backend may learn it late (vllm)
        return self.inner.parameters

    @parameters.setter
    def parameters(self, value: int | None) -> None:
        self.inner.parameters = value

    def score_batch(self, items: Sequence[ScoreItem]) -> list[list[float]]:
        return self.score_tails(items, [0] * len(items))

    def score_tails(self, items: Sequence[ScoreItem], first: Sequence[int]) -> list[list[float]]:
        try:
            tails = self.inner.score_tails(items, first)
        except ItemsRejected as exc:
            vetoed = [
                _veto(s, steps[f:])
                for s, (_, steps), f in zip(exc.scores, items, first, strict=True)
            ]
            raise ItemsRejected(exc.reasons, vetoed, exc.too_long) from exc
        return [
            _veto(row, steps[f:]) for row, (_, steps), f in zip(tails, items, first, strict=True)
        ]

    def count_tokens(self, item: ScoreItem) -> int:
        return self.inner.count_tokens(item)

    def healthy(self) -> bool:
        return self.inner.healthy()

    def close(self) -> None:
        self.inner.close()


def _veto(scores: list[float], steps: Sequence[str]) -> list[float]:
    """A rejected item has no scores: nothing to veto."""
    if not scores:
        return scores
    return [
        0.0 if check_step(step).wrong else score for score, step in zip(scores, steps, strict=True)
    ]
