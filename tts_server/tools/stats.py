"""The statistics the eval reports, the plots and calibration share."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n problems (0 for none)."""
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def paired_difference(a: Sequence[bool], b: Sequence[bool]) -> tuple[float, float]:
    """Mean of a - b over the same problems, and its paired standard error: the per-problem
    differences, so the luck both runs share cancels (0 with fewer than two problems)."""
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return statistics.mean(diffs), se


def flops_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and mean FLOPs per answer and per correct answer (None when FLOPs unknown)."""
    counted = [r for r in records if r.get("flops") is not None]
    correct = sum(bool(r.get("correct")) for r in records)
    total = sum(int(r["flops"]) for r in counted)
    return {
        "accuracy_answered": correct / len(records) if records else None,
        "mean_flops": total / len(counted) if counted else None,
        "flops_per_correct": total / correct if counted and correct else None,
    }
