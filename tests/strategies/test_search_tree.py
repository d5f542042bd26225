"""The search trace of every strategy over the fakes: the tree recorded where the search decides
(beam selection, DVTS subtrees), its leaves the candidates, the selected path ending at the
answer, kept and pruned counts as the beam width says, the size bound, and the schema."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.strategies.test_strategies import PROBLEM, config, so_far, table_scores
from tests.support.fakes import FakePolicy, FakePRM, per_step
from tts_server.engine import Outcome
from tts_server.router import default_table
from tts_server.search_trace import TraceLimits, search_trace
from tts_server.search_tree import SearchTree
from tts_server.strategies import REGISTRY
from tts_server.types import DeepConfConfig, Job, Progress, SearchConfig, TextPrompt

SCHEMA = json.loads((Path(__file__).parents[2] / "docs" / "trace.schema.json").read_text())
WIDE = TraceLimits(max_nodes=10_000, max_text_chars=None)


def validate(trace: dict[str, Any]) -> None:
    jsonschema.validate(trace, SCHEMA, cls=jsonschema.Draft202012Validator)


async def run(
    strategy: str,
    cfg: SearchConfig,
    policy: FakePolicy,
    prm: FakePRM | None,
    limits: TraceLimits = WIDE,
) -> tuple[dict[str, Any], Outcome]:
    tree = SearchTree()
    result = await REGISTRY[strategy].run(PROBLEM, dataclasses.replace(cfg, tree=tree), policy, prm)
    job = Job(
        prompt=TextPrompt("Q"),
        strategy=strategy,  # type: ignore[arg-type]
        requested=strategy,
        budget=cfg.budget,
        beam_width=cfg.beam_width,
        aggregation=cfg.aggregation,
        selection=cfg.selection,
        temperature=cfg.temperature,
        top_p=1.0,
        max_tokens=cfg.max_tokens,
    )
    outcome = Outcome(job, result, 0.5, stages={"generation": 0.3}, tree=tree)
    trace = search_trace(outcome, limits)
    validate(trace)
    return trace, outcome


def children(trace: dict[str, Any]) -> Counter[int]:
    return Counter(n["parent"] for n in trace["nodes"] if n["parent"] is not None)


def check_leaves_and_path(trace: dict[str, Any], outcome: Outcome) -> None:
    """The candidates are exactly the leaves marked as candidates; the selected path goes from
    the root to the returned answer's node, and its steps make up the answer's text."""
    nodes = {n["id"]: n for n in trace["nodes"]}
    kids = children(trace)
    result = outcome.result
    assert [c["node"] for c in trace["candidates"]] == [c.node for c in result.candidates]
    for index, candidate in enumerate(trace["candidates"]):
        leaf = nodes[candidate["node"]]
        assert leaf["candidate"] == index and kids[leaf["id"]] == 0
        assert leaf["status"] == ("finished" if candidate["finished"] else "open")
    marked = sorted(n["candidate"] for n in trace["nodes"] if n["candidate"] is not None)
    assert marked == list(range(len(result.candidates)))
    # Finished nodes that are not candidates were cut by the final ranking: pruned.
    assert all(n["candidate"] is not None for n in trace["nodes"] if n["status"] == "finished")
    path = trace["selected_path"]
    assert path[0] == 0 and nodes[path[0]]["parent"] is None
    assert all(nodes[b]["parent"] == a for a, b in itertools.pairwise(path))
    assert path[-1] == result.best.node == trace["candidates"][trace["selected"]]["node"]
    assert "".join(nodes[i]["text"] for i in path) == result.best.text
    assert nodes[path[-1]]["answer"] == result.best.answer
    assert trace["answer"] == result.answer


async def test_beam_search_tree_keeps_n_over_m_each_iteration_and_ends_at_the_answer() -> None:
    first = [0.1, 0.9, 0.3, 0.8, 0.2, 0.5]
    second = [0.6, 0.2, 0.95, 0.4, 0.7, 0.1]

    def script(prompt: list[int], k: int) -> str:
        depth = so_far(prompt).count("\n\n")
        return f"The answer is {k % 2}." if depth == 2 else f"step{depth}.{k}\n\n"

    scores = {f"step0.{k}": s for k, s in enumerate(first)}
    scores |= {f"step1.{k}": s for k, s in enumerate(second)}
    policy, prm = FakePolicy(script), FakePRM(per_step(table_scores(scores)))
    trace, outcome = await run("beam_search", config(budget=6, beam_width=3), policy, prm)

    assert trace["kind"] == "tree"
    assert len(trace["nodes"]) == 1 + 6 * 3  # the prompt, then 6 beams a step for 3 steps
    # N = 6, M = 3: N/M = 2 kept each iteration, the other 4 pruned; all 6 finish at the end.
    assert [(lv["nodes"], lv["kept"], lv["pruned"], lv["finished"]) for lv in trace["levels"]] == [
        (6, 2, 4, 0),
        (6, 2, 4, 0),
        (6, 0, 0, 6),
    ]
    nodes = {n["id"]: n for n in trace["nodes"]}
    kept = [n for n in trace["nodes"] if n["status"] == "kept" and n["id"] != 0]
    assert sorted(n["text"] for n in kept if n["iteration"] == 1) == ["step0.1\n\n", "step0.3\n\n"]
    # Each kept beam's M copies each took one step: M children each; pruned ones have none.
    kids = children(trace)
    assert all(kids[n["id"]] == 3 for n in kept)
    assert all(kids[n["id"]] == 0 for n in trace["nodes"] if n["status"] == "pruned")
    # A node's score is the PRM's score of its step.
    assert nodes[kept[0]["id"]]["score"] == scores[kept[0]["text"].strip()]
    check_leaves_and_path(trace, outcome)
    assert len(trace["candidates"]) == 6


async def test_beam_search_finished_beams_past_the_best_n_are_pruned_leaves() -> None:
    first = {0: "The answer is 7.\n\nmore", 1: "Done", 2: "x = 1\n\n", 3: "y = 2\n\n"}

    def script(prompt: list[int], k: int) -> str:
        text = so_far(prompt)
        return first[k] if not text else f"The answer is {len(text)}."

    prm = FakePRM(per_step(table_scores({"x = 1": 0.9, "y = 2": 0.8, "Done": 0.1})))
    trace, outcome = await run(
        "beam_search", config(budget=4, beam_width=2), FakePolicy(script), prm
    )
    # 6 finished, the best 4 are the candidates; "Done" (the worst) is a pruned leaf.
    done = next(n for n in trace["nodes"] if n["text"] == "Done")
    assert done["status"] == "pruned" and done["candidate"] is None
    # It did end its solution (EOS): its finish is kept, the final ranking dropped it.
    assert done["finish_reason"] == "stop"
    # Statuses are final: of the first 4 steps, 2 were kept (N/M), 1 finished as a candidate,
    # 1 finished and was ranked out.
    level = trace["levels"][0]
    assert (level["nodes"], level["kept"], level["finished"], level["pruned"]) == (4, 2, 1, 1)
    check_leaves_and_path(trace, outcome)
    assert len(trace["candidates"]) == 4


async def test_dvts_tree_keeps_one_head_per_subtree_and_its_leaves_are_the_finished() -> None:
    plan = {
        "": ["a0\n\n", "a1\n\n", "a2\n\n", "a3\n\n"],
        "a0\n\n": ["The answer is 5.", "b1\n\n"],
        "a3\n\n": ["The answer is 6.", "b3\n\n"],
        "a3\n\nb3\n\n": ["The answer is 6.", "c\n\n"],
    }

    def script(prompt: list[int], k: int) -> str:
        options = plan[so_far(prompt)]
        return options[k % len(options)] if so_far(prompt) else options[k]

    scores = {"a0": 0.9, "a1": 0.8, "a2": 0.2, "a3": 0.3, "b1": 0.4, "b3": 0.7, "c": 0.2}

    def scorer(steps: Sequence[str]) -> list[float]:
        last = steps[-1].strip()
        final = {"The answer is 5.": 0.95, "The answer is 6.": 0.5 if len(steps) == 2 else 0.9}
        return [*(scores[s.strip()] for s in steps[:-1]), final.get(last, scores.get(last, 0))]

    # Seeded: the subtrees step in lockstep, one call for both, so the fake numbers the first
    # step's samples 0-3 across them (unseeded, each subtree calls on its own).
    cfg = config(budget=4, beam_width=2, selection="weighted", seed=7)
    trace, outcome = await run("dvts", cfg, FakePolicy(script), FakePRM(scorer))

    nodes = trace["nodes"]
    assert {n["subtree"] for n in nodes if n["id"] != 0} == {0, 1}
    # Subtree 1 keeps its own best first step (a3), not the globally better a1.
    first = {n["text"]: (n["subtree"], n["status"]) for n in nodes if n["iteration"] == 1}
    assert first == {
        "a0\n\n": (0, "kept"),
        "a1\n\n": (0, "pruned"),
        "a2\n\n": (1, "pruned"),
        "a3\n\n": (1, "kept"),
    }
    # Every subtree and iteration: M children, one head kept unless its head finished.
    for (_, _), group in _by_subtree_iteration(nodes).items():
        assert len(group) == 2
        assert sum(n["status"] == "kept" for n in group) <= 1
    # Children never cross subtrees.
    by_id = {n["id"]: n for n in nodes}
    assert all(by_id[n["parent"]]["subtree"] in (None, n["subtree"]) for n in nodes if n["id"] != 0)
    check_leaves_and_path(trace, outcome)
    assert trace["answer"] == "6"
    groups = {g["answer"]: g for g in trace["groups"]}
    assert groups["6"]["selected"] and not groups["5"]["selected"]
    assert sorted(groups["6"]["candidates"] + groups["5"]["candidates"]) == [0, 1, 2]
    assert groups["6"]["weight"] == pytest.approx(1.4)


def _by_subtree_iteration(nodes: list[dict[str, Any]]) -> dict[tuple[int, int], list[Any]]:
    out: dict[tuple[int, int], list[Any]] = {}
    for n in nodes:
        if n["id"] != 0:
            out.setdefault((n["subtree"], n["iteration"]), []).append(n)
    return out


def _whole(prompt: list[int], k: int) -> str:
    return f"We add.\n\nThe answer is {5 if k % 3 else 6}."


@pytest.mark.parametrize(
    ("strategy", "cfg", "needs_prm"),
    [
        ("greedy", config(budget=1), False),
        ("majority", config(budget=6, selection="majority"), False),
        ("best_of_n", config(budget=6), True),
        ("adaptive", config(budget=6, selection="majority"), False),
        (
            "deepconf",
            config(budget=6, deepconf=DeepConfConfig(warmup=2, keep=0.9, round_size=2)),
            False,
        ),
    ],
)
async def test_whole_solution_strategies_trace_their_flat_samples(
    strategy: str, cfg: SearchConfig, needs_prm: bool
) -> None:
    prm = FakePRM(per_step(lambda s: 0.9 if "6" in s else 0.4)) if needs_prm else None
    trace, outcome = await run(strategy, cfg, FakePolicy(_whole), prm)
    result = outcome.result
    assert trace["kind"] == "samples" and trace["nodes"] == [] and trace["selected_path"] == []
    assert [c["text"] for c in trace["candidates"]] == [c.text for c in result.candidates]
    assert all(c["node"] is None for c in trace["candidates"])
    assert trace["candidates"][trace["selected"]]["text"] == result.best.text
    # Every answered candidate is in exactly one group; the selected answer's group is marked.
    grouped = sorted(i for g in trace["groups"] for i in g["candidates"])
    answered = [i for i, c in enumerate(result.candidates) if c.answer is not None]
    if result.votes:
        assert grouped == answered
        chosen = [g for g in trace["groups"] if g["selected"]]
        assert len(chosen) == 1 and chosen[0]["answer"] == result.answer
        assert trace["selected"] in chosen[0]["candidates"]


async def test_the_size_bound_keeps_the_selected_path_and_says_what_it_left_out() -> None:
    def script(prompt: list[int], k: int) -> str:
        depth = so_far(prompt).count("\n\n")
        return f"The answer is {k % 2}." if depth == 3 else f"step {depth} of {k} " * 8 + "\n\n"

    prm = FakePRM(per_step(lambda s: (len(s) % 7) / 7))
    cfg = config(budget=8, beam_width=2, max_tokens=2000, max_step_tokens=200)
    whole, outcome = await run("beam_search", cfg, FakePolicy(script), prm)
    total = len(whole["nodes"])
    assert total == 1 + 8 * 4 and not whole["truncated"]["any"]

    small = search_trace(outcome, TraceLimits(max_nodes=12, max_text_chars=20))
    validate(small)
    assert len(small["nodes"]) == 12
    assert small["truncated"] == {
        "any": True,
        "nodes_omitted": total - 12,
        "texts_cut": small["truncated"]["texts_cut"],
        "max_nodes": 12,
        "max_text_chars": 20,
    }
    assert small["truncated"]["texts_cut"] > 0
    ids = {n["id"] for n in small["nodes"]}
    # The selected path is whole, and every kept node's parent is kept too.
    assert set(small["selected_path"]) <= ids
    assert all(n["parent"] is None or n["parent"] in ids for n in small["nodes"])
    assert all(len(n["text"]) <= 20 for n in small["nodes"])
    assert all(len(c["text"]) <= 20 for c in small["candidates"])
    # The bound bounds the body: far smaller than the whole trace.
    assert len(json.dumps(small)) < len(json.dumps(whole)) / 2


async def test_without_a_tree_nothing_is_recorded() -> None:
    policy = FakePolicy(lambda p, k: "a = 1\n\nThe answer is 1.")
    prm = FakePRM(per_step(lambda s: 0.5))
    result = await REGISTRY["beam_search"].run(PROBLEM, config(budget=4, beam_width=2), policy, prm)
    assert all(c.node is None for c in result.candidates)


async def test_auto_routed_to_beam_search_traces_its_tree_beside_the_pilots_samples() -> None:
    def disagreeing(prompt: list[int], sample: int) -> str:
        if so_far(prompt):  # a continuation: finish the step the search started
            return "The answer is 7."
        return f"{sample} + 1 = {sample + 1}\n\nThe answer is {sample + 1}."

    cfg = config(budget=8, beam_width=4, router=default_table(1000), progress=Progress())
    prm = FakePRM(per_step(lambda s: 0.2))
    trace, outcome = await run("auto", cfg, FakePolicy(disagreeing), prm)
    assert trace["kind"] == "tree"
    pilot = [c for c in trace["candidates"] if c["node"] is None]
    searched = [c for c in trace["candidates"] if c["node"] is not None]
    assert len(pilot) == 4 and searched  # the pilot's whole samples, then the search's leaves
    leaves = {n["id"] for n in trace["nodes"] if n["candidate"] is not None}
    assert leaves == {c["node"] for c in searched}
    assert trace["levels"][0]["nodes"] == 4  # one beam of width 4 after the pilot
    # The search's leaves agree on 7 and outweigh the pilot's four different answers.
    assert trace["answer"] == outcome.result.answer == "7"
    chosen = trace["candidates"][trace["selected"]]
    assert chosen["node"] is not None and trace["selected_path"][-1] == chosen["node"]


async def test_dvts_subtrees_stepping_apart_keep_one_head_each_per_step() -> None:
    """Unseeded, each subtree steps on its own (their calls interleave): the tree still keeps
    exactly one child per subtree and step, and its finished leaves are the candidates."""
    drawn = itertools.count()

    def script(prompt: list[int], k: int) -> str:
        i = next(drawn)  # every sample its own text, whichever subtree asks
        return "The answer is 5." if len(so_far(prompt)) > 12 else f"s{i}\n\n"

    cfg = config(budget=8, beam_width=2, selection="weighted")
    trace, outcome = await run("dvts", cfg, FakePolicy(script), FakePRM(per_step(lambda s: 0.5)))
    nodes = [n for n in trace["nodes"] if n["id"] != 0]
    assert {n["subtree"] for n in nodes} == {0, 1, 2, 3}
    steps = Counter((n["subtree"], n["iteration"]) for n in nodes)
    kept = Counter((n["subtree"], n["iteration"]) for n in nodes if n["status"] == "kept")
    assert set(steps.values()) == {2}  # M = 2 children per subtree and step
    last = {t: max(i for s, i in steps if s == t) for t in range(4)}  # depths differ here
    assert sorted(last.values()) == [4, 4, 4, 5]
    assert all(kept[(t, i)] == (1 if i < last[t] else 0) for t, i in steps)
    finished = [n for n in nodes if n["status"] == "finished"]
    assert len(finished) == len(outcome.result.candidates)
