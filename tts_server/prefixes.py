"""Step scores by prefix: what lets a search score each step once.

A PRM reads a solution left to right, so the score of step k depends on the question and steps
0..k only: it can be kept under a key for exactly that prefix and reused by every beam that
copies it, and by every later iteration that extends it. A key chains digests, so a solution's
keys cost one hash per step (not per prefix length) and no text is kept.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def prefix_keys(question: str, steps: Sequence[str]) -> list[bytes]:
    """keys[k] names (question, steps[0..k]); equal keys mean equal prefixes."""
    digest = hashlib.blake2b(question.encode(), digest_size=16).digest()
    keys: list[bytes] = []
    for step in steps:
        # The length first: ("ab", "c") and ("a", "bc") must not chain alike.
        data = digest + len(step).to_bytes(8, "little") + step.encode()
        digest = hashlib.blake2b(data, digest_size=16).digest()
        keys.append(digest)
    return keys


class PrefixScores:
    """Score of a prefix's last step, by `prefix_keys`; least recently used evicted past
    `capacity` (None: unbounded, for one request's search, which is bounded by its budget)."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._scores: OrderedDict[bytes, float] = OrderedDict()

    def known(self, keys: Sequence[bytes], start: int = 0) -> list[float]:
        """The scores of keys[start:] up to the first one not kept (a run, maybe empty)."""
        run: list[float] = []
        for key in keys[start:]:
            score = self._scores.get(key)
            if score is None:
                break
            self._scores.move_to_end(key)
            run.append(score)
        return run

    def put(self, keys: Sequence[bytes], scores: Sequence[float]) -> None:
        """Keep scores[j] under keys[j] (the two aligned: a solution's tail and its scores)."""
        if self.capacity == 0:
            return
        for key, score in zip(keys, scores, strict=True):
            self._scores[key] = score
            self._scores.move_to_end(key)
        if self.capacity is not None:
            while len(self._scores) > self.capacity:
                self._scores.popitem(last=False)

    def __len__(self) -> int:
        return len(self._scores)
