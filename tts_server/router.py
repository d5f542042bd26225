"""The compute-optimal router: which strategy, N and beam width a question gets.

At serving time a cheap pilot (k whole samples, scored by the PRM) estimates the question's
difficulty, Snell et al.'s "model-predicted difficulty": the pilot's mean final score and its
answer agreement make one confidence in [0, 1], and thresholds place it in a bin. The bins are
absolute and mean what Liu et al.'s mean: easy = pass@1 of 50-100%, medium 10-50%, hard below
10%; `tts-server calibrate` fits the thresholds and the route per bin on a dataset. A route names
a strategy and the share of the client's budget it spends (the pilot's samples count in the
budget and stay candidates). "pilot" answers from the pilot alone.

"adaptive" keeps sampling after the pilot in small rounds and stops as soon as more samples are
unlikely to change the answer (Aggarwal et al.'s adaptive consistency): the leading answer is
`stop_margin` samples ahead of any other, or `give_up_after` samples hold no two equal answers (a
question the policy cannot settle rarely settles with a few more samples), or, Aggarwal et al.'s
Beta rule, the posterior probability that the leading answer is more likely than the second
reaches `beta_threshold`. The samples it does not draw are the compute it saves.

When calibration finds that no routing beats the best fixed strategy on its problems (the
difficulty estimate does not pay for its pilot on that model pair), the table names a fixed strategy
(`fixed_strategy`, with the share of the client's budget it spends and its beam width), and `auto`
runs it with no pilot. The share is below 1 when calibration found the strategy with fewer samples
as accurate as the best one with the whole budget: the compute-optimal N is not always the most.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tts_server.answers import group_answers
from tts_server.types import STRATEGY_NAMES, Candidate, Difficulty, StopRule

BINS = ("easy", "medium", "hard")
# What a table may fall back to: what a request may name, but `auto` itself.
FIXED_STRATEGIES = tuple(name for name in STRATEGY_NAMES if name != "auto")
# A route may also answer from the pilot alone (no client may name it).
ROUTE_STRATEGIES = ("pilot", *FIXED_STRATEGIES)
# pass@1 bounds of the bins (Liu et al.): a calibration problem's true bin.
PASS_AT_1_EASY = 0.5
PASS_AT_1_MEDIUM = 0.1


class RouterTableError(ValueError):
    """A router table that cannot be used (bad JSON, unknown strategy, bad numbers)."""


@dataclass(frozen=True)
class Route:
    strategy: str
    beam_width: int = 1
    # Share of the client's budget spent in all (pilot included), at least the pilot's samples.
    budget_share: float = 1.0
    # "adaptive" only: samples per round, and its stopping rules (None: not used).
    round_size: int = 2
    stop_margin: int | None = 2
    give_up_after: int | None = 4
    beta_threshold: float | None = None

    @property
    def stopping(self) -> StopRule:
        return StopRule(self.round_size, self.stop_margin, self.give_up_after, self.beta_threshold)


def lead_probability(lead: int, second: int) -> float:
    """P(p_lead > p_second) under Beta(lead + 1, second + 1), the posterior of the leading
    answer's share of the two (Aggarwal et al.). For whole counts it is exact and closed:
    P(X > 1/2) for X ~ Beta(a, b) is P(Binomial(a + b - 1, 1/2) <= a - 1)."""
    n = lead + second + 1
    return float(sum(math.comb(n, j) for j in range(lead + 1)) / 2**n)


def stops_sampling(answers: Sequence[str | None], route: Route | StopRule) -> bool:
    """Whether adaptive sampling stops with these answers drawn (equivalent answers count as one):
    the leading answer is `stop_margin` samples ahead of the next, or `give_up_after` samples
    hold no two equal answers, or the Beta posterior that the leader beats the second reaches
    `beta_threshold`. Unanswered samples vote for nothing."""
    counts = sorted(Counter(c for c in group_answers(answers) if c is not None).values())
    lead = counts[-1] if counts else 0
    runner_up = counts[-2] if len(counts) > 1 else 0
    if route.stop_margin is not None and lead - runner_up >= route.stop_margin:
        return True
    if (
        route.beta_threshold is not None
        and lead > 0
        and lead_probability(lead, runner_up) >= route.beta_threshold
    ):
        return True
    return route.give_up_after is not None and len(answers) >= route.give_up_after and lead < 2


@dataclass(frozen=True)
class RouterTable:
    pilot_samples: int = 4
    # confidence >= easy_min: easy; >= medium_min: medium; else hard.
    easy_min: float = 0.75
    medium_min: float = 0.45
    # Answer at once when the pilot agrees this much with a mean final score this high.
    early_exit_agreement: float = 1.0
    early_exit_score: float = 0.9
    routes: dict[str, Route] = field(default_factory=dict)
    source: str = "default"
    # Set: `auto` runs this strategy, no pilot, no routes, on this share of the client's budget,
    # with this beam width (None: the server's default).
    fixed_strategy: str | None = None
    fixed_budget_share: float = 1.0
    fixed_beam_width: int | None = None

    def exits_early(self, mean_score: float, agreement: float) -> bool:
        """The pilot answers alone: its samples agree this much with scores this high."""
        return agreement >= self.early_exit_agreement and mean_score >= self.early_exit_score

    def bin_of(self, confidence: float) -> str:
        if confidence >= self.easy_min:
            return "easy"
        if confidence >= self.medium_min:
            return "medium"
        return "hard"

    def summary(self) -> str:
        """What `auto` does with this table, in one line."""
        if self.fixed_strategy is not None:
            width = "" if self.fixed_beam_width is None else f", beam width {self.fixed_beam_width}"
            share = f"{self.fixed_budget_share:.0%} of the client's budget"
            return f"{self.fixed_strategy} on {share}{width}, no pilot"
        routes = ", ".join(
            f"{name}: {route.strategy}"
            + ("" if route.budget_share == 1.0 else f" ({route.budget_share:.0%} of the budget)")
            for name, route in self.routes.items()
        )
        return f"a pilot of {self.pilot_samples} samples, then {routes}"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["routes"] = {name: asdict(route) for name, route in self.routes.items()}
        return data


def default_table(policy_parameters: int | None, *, weak_prm: bool = False) -> RouterTable:
    """Liu et al.'s findings: under 7B, best-of-N on easy and beam search on medium and hard;
    7-72B, DVTS on easy and medium and beam search on hard; 72B and up, or with a weak PRM,
    best-of-N everywhere. An unknown size is treated as small."""
    size = policy_parameters or 0
    bon, beam, dvts = Route("best_of_n"), Route("beam_search", 4), Route("dvts", 4)
    if weak_prm or size >= 72_000_000_000:
        routes, source = dict.fromkeys(BINS, bon), "generic: best-of-N (72B+ or weak PRM)"
    elif size >= 7_000_000_000:
        routes, source = {"easy": dvts, "medium": dvts, "hard": beam}, "generic: 7-72B"
    else:
        routes, source = {"easy": bon, "medium": beam, "hard": beam}, "generic: under 7B"
    return RouterTable(routes=routes, source=source)


def load_table(path: Path) -> RouterTable:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RouterTableError(f"cannot read the router table {path.name}: {exc}") from exc
    return parse_table(data)


def parse_table(data: Any) -> RouterTable:
    if not isinstance(data, dict):
        raise RouterTableError("a router table is a JSON object")
    raw_routes = data.get("routes")
    if not isinstance(raw_routes, dict) or set(raw_routes) != set(BINS):
        raise RouterTableError(f"routes must name exactly the bins {', '.join(BINS)}")
    routes: dict[str, Route] = {}
    for name, raw in raw_routes.items():
        if not isinstance(raw, dict) or raw.get("strategy") not in ROUTE_STRATEGIES:
            raise RouterTableError(
                f"route {name!r}: strategy must be one of {', '.join(ROUTE_STRATEGIES)}"
            )
        try:
            route = Route(
                strategy=str(raw["strategy"]),
                beam_width=int(raw.get("beam_width", 1)),
                budget_share=float(raw.get("budget_share", 1.0)),
                round_size=int(raw.get("round_size", 2)),
                stop_margin=_optional_int(raw.get("stop_margin", 2)),
                give_up_after=_optional_int(raw.get("give_up_after", 4)),
                beta_threshold=_optional_float(raw.get("beta_threshold")),
            )
        except (TypeError, ValueError) as exc:
            raise RouterTableError(f"route {name!r}: bad number: {exc}") from exc
        if route.beam_width < 1 or not 0.0 < route.budget_share <= 1.0:
            raise RouterTableError(f"route {name!r}: beam_width >= 1, 0 < budget_share <= 1")
        if route.round_size < 1 or any(
            v is not None and v < 1 for v in (route.stop_margin, route.give_up_after)
        ):
            raise RouterTableError(
                f"route {name!r}: round_size, stop_margin and give_up_after are at least 1"
            )
        if route.beta_threshold is not None and not 0.5 < route.beta_threshold < 1.0:
            raise RouterTableError(f"route {name!r}: beta_threshold is in (0.5, 1)")
        routes[name] = route
    try:
        table = RouterTable(
            pilot_samples=int(data.get("pilot_samples", 4)),
            easy_min=float(data.get("easy_min", 0.75)),
            medium_min=float(data.get("medium_min", 0.45)),
            early_exit_agreement=float(data.get("early_exit_agreement", 1.0)),
            early_exit_score=float(data.get("early_exit_score", 0.9)),
            routes=routes,
            source=str(data.get("source", "file")),
            fixed_strategy=data.get("fixed_strategy"),
            fixed_budget_share=float(data.get("fixed_budget_share", 1.0)),
            fixed_beam_width=_optional_int(data.get("fixed_beam_width")),
        )
    except (TypeError, ValueError) as exc:
        raise RouterTableError(f"bad number in the router table: {exc}") from exc
    if table.fixed_strategy is not None and table.fixed_strategy not in FIXED_STRATEGIES:
        raise RouterTableError(f"fixed_strategy must be one of {', '.join(FIXED_STRATEGIES)}")
    if not 0.0 < table.fixed_budget_share <= 1.0:
        raise RouterTableError("fixed_budget_share must be in (0, 1]")
    if table.fixed_beam_width is not None and table.fixed_beam_width < 1:
        raise RouterTableError("fixed_beam_width must be at least 1 (or null: the server's)")
    if table.pilot_samples < 1 or not table.medium_min <= table.easy_min:
        raise RouterTableError("pilot_samples >= 1 and medium_min <= easy_min")
    return table


def _optional_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number or null, got {value!r}")
    return float(value)


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a whole number or null, got {value!r}")
    return int(value)


def pilot_features(candidates: Sequence[Candidate], votes: dict[str, float]) -> tuple[float, float]:
    """(mean final score, agreement): agreement is the share of pilot samples whose answer is the
    most frequent one; unanswered samples agree with nothing."""
    if not candidates:
        return 0.0, 0.0
    mean_score = sum(c.score or 0.0 for c in candidates) / len(candidates)
    counts = Counter(c.answer for c in candidates if c.answer is not None)
    agreement = max(counts.values(), default=0) / len(candidates)
    return mean_score, agreement


def confidence_of(mean_score: float, agreement: float) -> float:
    return 0.5 * mean_score + 0.5 * agreement


def estimate(table: RouterTable, candidates: Sequence[Candidate]) -> Difficulty:
    mean_score, agreement = pilot_features(candidates, {})
    confidence = confidence_of(mean_score, agreement)
    return Difficulty(table.bin_of(confidence), confidence, mean_score, agreement, len(candidates))


def true_bin(pass_at_1: float) -> str:
    if pass_at_1 >= PASS_AT_1_EASY:
        return "easy"
    if pass_at_1 >= PASS_AT_1_MEDIUM:
        return "medium"
    return "hard"
